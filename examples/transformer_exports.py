"""Hugging Face transformer exports (tiny configs, random weights): JVP, VJP and HVP against torch.func.

    python examples/transformer_exports.py [--only bert,swin] [--exporter legacy|dynamo|both] [--float64]

Each model is built from a tiny config with a fixed seed (no weights are downloaded) and wrapped so that its one
float input is the embeddings (inputs_embeds) or the image (pixel_values) and its one output the last hidden state.
It is exported with torch.onnx.export (legacy: dynamo=False, opset 17; dynamo: the default torch.export-based
exporter), compiled with jacgraph.compile(emit="jvp" | "vjp" | "hvp"), and each emitted graph is run in onnxruntime
(CPU, float32, graph optimizations off, so that onnxruntime's fusions do not change the arithmetic being checked)
and compared with the same module in float64: torch.func.jvp, torch.autograd's vjp (J^T y_bar), and
forward-over-reverse torch.func.jvp(torch.func.grad(<f(x), y_bar>)) for H v. Errors are ||a - b|| / ||b||; the
"forward" column is the primal output's own float32-vs-float64 error, the scale the derivative errors are read
against. With --float64, each emitted graph's float64 copy also runs in onnx's reference evaluator (slow:
seconds per graph) against the same references, which separates float32 round-off from a wrong derivative (what
remains is the export's float32-rounded constants). Every emitted graph is also checked with onnx.checker
(full_check) and loaded with all optimizations on.
transformers is a test/example-only dependency of jacgraph.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import numpy as np
import onnx
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jacgraph  # noqa: E402
from jacgraph import runtime  # noqa: E402
from jacgraph.testing import check_jvp, reference_session, relative_error, run_reference, to_float64  # noqa: E402

SEQ, IMAGE = 5, 32


class LastHidden(torch.nn.Module):
    """model(**{key: x}).last_hidden_state: one float input, one float output."""

    def __init__(self, model, key):
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x):
        return self.model(**{self.key: x}).last_hidden_state


def _text(config_cls, model_cls, seq, config, size):
    """A text model from its tiny `config` updated by `size` (the larger configs); input 1 x seq x hidden."""
    config = {**config, **size}
    model = model_cls(config_cls(**config, attn_implementation="eager"))
    return LastHidden(model, "inputs_embeds"), (1, seq, config.get("hidden_size") or config.get("n_embd")
                                                or config["d_model"])


def _vision(config_cls, model_cls, config, size):
    config = {**config, **size}
    model = model_cls(config_cls(**config, attn_implementation="eager"))
    image = config["image_size"]
    return LastHidden(model, "pixel_values"), (1, config.get("num_channels", 3), image, image)


def bert(seq=SEQ, **size):
    from transformers import BertConfig, BertModel
    return _text(BertConfig, BertModel, seq, dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=37, vocab_size=99, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), size)


def bert_wide():
    return bert(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512)


def gpt2(seq=SEQ, **size):
    from transformers import GPT2Config, GPT2Model
    return _text(GPT2Config, GPT2Model, seq, dict(n_embd=32, n_layer=2, n_head=2, vocab_size=99, n_positions=64,
                 bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), size)


def llama(seq=SEQ, **size):
    from transformers import LlamaConfig, LlamaModel
    return _text(LlamaConfig, LlamaModel, seq, dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, intermediate_size=37, vocab_size=99, max_position_embeddings=64), size)


def t5_encoder(seq=SEQ, **size):
    from transformers import T5Config, T5EncoderModel
    return _text(T5Config, T5EncoderModel, seq, dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=2,
                                                     vocab_size=99, dropout_rate=0.0), size)


def vit(**size):
    from transformers import ViTConfig, ViTModel
    return _vision(ViTConfig, ViTModel, dict(image_size=IMAGE, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=37, hidden_dropout_prob=0.0,
                                             attention_probs_dropout_prob=0.0), size)


def swin(**size):
    # window_size 3 does not divide the 8x8 patch grid: Swin pads each window partition (the Pad that failed);
    # depth 2 per stage: the second block's windows are shifted (torch.roll, an attention mask)
    from transformers import SwinConfig, SwinModel
    return _vision(SwinConfig, SwinModel, dict(image_size=IMAGE, patch_size=4, embed_dim=16, depths=[2, 2],
                                               num_heads=[1, 2], window_size=3, hidden_dropout_prob=0.0,
                                               attention_probs_dropout_prob=0.0, drop_path_rate=0.0), size)


def swin_w7():
    # Swin's usual window 7 on a 16x16 patch grid (64x64 image): every partition pads 16 -> 21
    return swin(image_size=64, embed_dim=24, num_heads=[2, 4], window_size=7)


def convnext(**size):
    from transformers import ConvNextConfig, ConvNextModel
    config = {**dict(image_size=IMAGE, patch_size=4, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2,
                     drop_path_rate=0.0), **size}
    image = config["image_size"]
    return LastHidden(ConvNextModel(ConvNextConfig(**config)), "pixel_values"), (1, 3, image, image)


def hf_resnet(image=IMAGE, **size):
    # ResNet-50's layout in miniature: 7x7 stride-2 stem, 3x3 stride-2 max-pool, bottleneck stages; BatchNorm in eval
    from transformers import ResNetConfig, ResNetModel
    config = {**dict(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck"), **size}
    return LastHidden(ResNetModel(ResNetConfig(**config)), "pixel_values"), (1, 3, image, image)


def mobilevit(**size):
    # MobileNetV2 blocks (SiLU) and MobileViT blocks (unfold into 2x2 patches, transformer, fold back); image 64 so
    # every feature map (8, 4, 2) is a whole number of patches (a 32 image would interpolate a 1x1 map to 2x2)
    from transformers import MobileViTConfig, MobileViTModel
    wrapped, shape = _vision(MobileViTConfig, MobileViTModel, dict(
        image_size=64, patch_size=2, hidden_sizes=[12, 16, 20], neck_hidden_sizes=[8, 8, 16, 16, 32, 32, 32],
        num_attention_heads=2, expand_ratio=2.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), size)
    # HF's init draws BatchNorm scales from N(0, 0.02): without residuals the signal shrinks 1e-3 per block (the
    # output was ~1e-30). PyTorch's defaults (BN scale 1) and He-normal convs keep it at scale 1
    for module in wrapped.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.Linear, torch.nn.LayerNorm)):
            module.reset_parameters()
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight)
    return wrapped, shape


MODELS = {"bert": bert, "bert_wide": bert_wide, "gpt2": gpt2, "llama": llama, "t5_encoder": t5_encoder, "vit": vit,
          "swin": swin, "swin_w7": swin_w7, "convnext": convnext, "hf_resnet": hf_resnet,
          "mobilevit": mobilevit}


# The same architectures at sizes where kernels, not onnxruntime's per-node overhead, set the time (the tiny
# configs' forwards take 0.03-0.07 ms); for speed only (`examples/bench_suite.py --suite transformers_large`)
LARGE = {
    "bert_large": lambda: bert(seq=64, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                               intermediate_size=1024),
    "gpt2_large": lambda: gpt2(seq=64, n_embd=256, n_layer=4, n_head=4),
    "llama_large": lambda: llama(seq=64, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=688),
    "t5_encoder_large": lambda: t5_encoder(seq=64, d_model=256, d_kv=64, d_ff=1024, num_layers=4, num_heads=4),
    "vit_large": lambda: vit(image_size=224, patch_size=16, hidden_size=192, num_hidden_layers=4,
                             num_attention_heads=3, intermediate_size=768),  # ViT-Tiny's width, 4 layers
    "swin_large": lambda: swin(image_size=224, embed_dim=48, depths=[2, 2, 2], num_heads=[2, 4, 8], window_size=7),
    "convnext_large": lambda: convnext(image_size=224, hidden_sizes=[48, 96, 192, 384], depths=[1, 1, 3, 1],
                                       num_stages=4),
    "hf_resnet_large": lambda: hf_resnet(image=224, embedding_size=64, hidden_sizes=[64, 128, 256, 512],
                                         depths=[2, 2, 2, 2], layer_type="basic"),  # ResNet-18's layout
    "mobilevit_large": lambda: mobilevit(image_size=256, hidden_sizes=[64, 80, 96],  # MobileViT-XXS
                                         neck_hidden_sizes=[16, 16, 24, 48, 64, 80, 320]),
}


def build(name):
    """(module in eval mode, float32, seeded weights; example input x as float32 numpy); name from MODELS or LARGE."""
    torch.manual_seed(0)
    module, shape = {**MODELS, **LARGE}[name]()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    return module.eval(), x.numpy()


def export(module, x, exporter) -> onnx.ModelProto:
    xt = torch.from_numpy(x)
    if exporter == "legacy":
        import io
        buffer = io.BytesIO()
        torch.onnx.export(module, (xt,), buffer, input_names=["x"], output_names=["y"], opset_version=17,
                          dynamo=False)
        return onnx.load_from_string(buffer.getvalue())
    return torch.onnx.export(module, (xt,), dynamo=True, verbose=False).model_proto


def run(model, feeds, optimize=False):
    """Run in onnxruntime on the CPU (graph optimizations off unless optimize) -> {output name: array}."""
    return runtime.run(runtime.session(model, optimize=optimize, provider="CPUExecutionProvider"), feeds)


def emitted(model, emit, **options):
    """jacgraph.compile, then the checks every emitted graph must pass; (model, its metadata as a dict)."""
    out = jacgraph.compile(model, emit=emit, **options)
    onnx.checker.check_model(out, full_check=True)
    meta = {p.key: p.value for p in out.metadata_props}
    return out, meta


def torch_references(module, x, v, y_bar):
    """float64 torch: y, J v, J^T y_bar, H v for f = <module(x), y_bar>."""
    module = module.double()
    xt, vt, ut = (torch.from_numpy(a).double() for a in (x, v, y_bar))
    y, jv = torch.func.jvp(module, (xt,), (vt,))
    _, pullback = torch.func.vjp(module, xt)
    (vjp,) = pullback(ut)
    _, hv = torch.func.jvp(torch.func.grad(lambda z: (module(z) * ut).sum()), (xt,), (vt,))
    module.float()
    return {key: t.detach().numpy() for key, t in {"y": y, "jvp": jv, "vjp": vjp, "hvp": hv}.items()}


def run_float64(model, feeds):
    """The emitted graph's float64 copy in onnx's reference evaluator (float32 feeds widened exactly)."""
    return run_reference(reference_session(to_float64(model)), {k: a.astype(np.float64) for k, a in feeds.items()})


def central_difference_error(name, h=1e-5):
    """The legacy export's JVP graph as a float64 copy (reference evaluator) against float64 central differences of
    the export's own float64 copy at the same x and v: jacgraph's rules alone, with no torch in the comparison."""
    module, x = build(name)
    with warnings.catch_warnings():  # the tracer's warnings about Python branches on shapes: fixed shapes here
        warnings.simplefilter("ignore")
        source = export(module, x, "legacy")
    x_name = source.graph.input[0].name
    v = np.random.default_rng(2).standard_normal(x.shape)
    errors = check_jvp(to_float64(source), to_float64(jacgraph.compile(source, emit="jvp")),
                       {x_name: x.astype(np.float64)}, {x_name: v}, h=h)
    return float(np.max(list(errors.values())))  # np.max, not max(): a NaN error anywhere must come out as NaN


def check(name, exporter, float64=False):
    """One row: {model, exporter, ops (the op types), forward, jvp, vjp, hvp (relative errors or None), status};
    float64=True adds forward64, jvp64, vjp64, hvp64 (the float64 copies in the reference evaluator)."""
    module, x = build(name)
    row = {"model": name, "exporter": exporter, "ops": None, "forward": None, "jvp": None, "vjp": None,
           "hvp": None, "status": "ok"}
    t0 = time.perf_counter()
    try:
        source = export(module, x, exporter)
    except Exception as e:  # pylint: disable=broad-exception-caught  # an export failure is PyTorch's, not jacgraph's: say so and go on
        row["status"] = f"export failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        return row
    x_name = source.graph.input[0].name
    row["ops"] = sorted({n.op_type for n in source.graph.node})
    rng = np.random.default_rng(2)
    y_shape = module(torch.from_numpy(x)).shape
    v = rng.standard_normal(x.shape).astype(np.float32)
    y_bar = rng.standard_normal(tuple(y_shape)).astype(np.float32)
    ref = torch_references(module, x, v, y_bar)
    y_name = source.graph.output[0].name
    row["forward"] = relative_error(run(source, {x_name: x})[y_name], ref["y"])
    if float64:  # the source's own float64 copy: how far the export itself is from torch in float64
        row["forward64"] = relative_error(run_float64(source, {x_name: x})[y_name], ref["y"])
    failures = []
    for emit in ("jvp", "vjp", "hvp"):
        try:
            model, meta = emitted(source, emit, **({"y_bar": True} if emit == "hvp" else {}))
            if emit == "jvp":
                (dot,) = dict(json.loads(meta["jacgraph.tangent_inputs"])).values()
                feeds, out = {x_name: x, dot: v}, dict(json.loads(meta["jacgraph.tangent_outputs"]))[y_name]
            elif emit == "vjp":
                (bar,) = dict(json.loads(meta["jacgraph.cotangent_inputs"])).values()
                feeds, out = {x_name: x, bar: y_bar}, dict(json.loads(meta["jacgraph.gradient_outputs"]))[x_name]
            else:
                (dot,) = dict(json.loads(meta["jacgraph.tangent_inputs"])).values()
                (bar,) = dict(json.loads(meta["jacgraph.cotangent_inputs"])).values()
                feeds, out = {x_name: x, bar: y_bar, dot: v}, dict(json.loads(meta["jacgraph.hvp_outputs"]))[x_name]
            row[emit] = relative_error(run(model, feeds)[out], ref[emit])
            run(model, feeds, optimize=True)  # every emitted graph must also load and run fully optimized
            if float64:
                row[emit + "64"] = relative_error(run_float64(model, feeds)[out], ref[emit])
        except jacgraph.JacgraphError as e:
            failures.append(f"{emit}: {str(e).splitlines()[0][:200]}")
        except Exception as e:  # pylint: disable=broad-exception-caught  # a raw library error: a jacgraph bug to report, with its type
            failures.append(f"{emit}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    if failures:
        row["status"] = "; ".join(failures)
    row["seconds"] = time.perf_counter() - t0
    return row


def fmt(value):
    return "—" if value is None else f"{value:.1e}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated model names: " + ", ".join(MODELS))
    parser.add_argument("--exporter", choices=["legacy", "dynamo", "both"], default="both")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--float64", action="store_true",
                        help="also run each emitted graph's float64 copy in onnx's reference evaluator")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.only.split(",") if args.only else list(MODELS)
    exporters = ["legacy", "dynamo"] if args.exporter == "both" else [args.exporter]
    wide = " forward f64 | JVP f64 | VJP f64 | HVP f64 |" if args.float64 else ""
    print("| model | exporter | op types | forward | JVP | VJP | HVP |" + wide + " seconds | status |")
    print("|---|---|---|---|---|---|---|" + "---|" * (2 + 4 * args.float64))
    for name in names:
        for exporter in exporters:
            r = check(name, exporter, args.float64)
            errors = ["forward", "jvp", "vjp", "hvp"]
            errors += ["forward64", "jvp64", "vjp64", "hvp64"] if args.float64 else []
            print(f"| {r['model']} | {r['exporter']} | {len(r['ops']) if r['ops'] else '—'} | "
                  + " | ".join(fmt(r.get(key)) for key in errors)
                  + f" | {r.get('seconds', 0):.1f} | {r['status']} |", flush=True)


if __name__ == "__main__":
    main()

"""Time `jacgraph verify` on RecurJac graphs of examples/bounds_models.py models exported with a fixed batch of 1.

    python examples/bench_verify.py [--models unet_cnn resnet_cnn] [--samples 2000] [--eps 0.1]

Each model is exported from PyTorch at batch 1 with no dynamic axes (as a tracer without dynamic_axes writes
it), compiled with `jacgraph compile --emit recurjac --input-shape x=1,...`, then checked with `jacgraph
verify OUT --source MODEL --eps E --samples N` through the API. Prints wall time, the calling thread's CPU time
(time.thread_time: numpy and onnx.reference run in it; the machine's load shows in wall time only), the load
average and verify's checks. Set OMP_NUM_THREADS=1 for one-thread numbers.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from examples.bounds_models import INPUT_SHAPES, build, export_bytes  # noqa: E402
from jacgraph.cli import main as cli  # noqa: E402
from jacgraph.verify import verify  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["unet_cnn", "resnet_cnn"])
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--eps", type=float, default=0.1)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        for name in args.models:
            source, graph = os.path.join(d, f"{name}.onnx"), os.path.join(d, f"{name}.recurjac.onnx")
            with open(source, "wb") as f:
                f.write(export_bytes(build(name), INPUT_SHAPES[name], dynamic_batch=False))
            shape = ",".join(map(str, (1, *INPUT_SHAPES[name])))
            with contextlib.redirect_stdout(io.StringIO()):
                assert cli(["compile", source, "--emit", "recurjac", "--input-shape", f"x={shape}", "-o", graph]) == 0
            wall, cpu = time.perf_counter(), time.thread_time()
            _, checks = verify(graph, source=source, eps=args.eps, samples=args.samples)
            wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
            print(f"{name}: verify {wall:.1f} s wall, {cpu:.1f} s thread CPU, load {os.getloadavg()[0]:.1f}, "
                  f"{'OK' if all(c.ok for c in checks) else 'FAILED'}")
            for c in checks:
                print(f"  {c.name}: {c.value:.3g} (limit {c.limit:g}; {c.what})")


if __name__ == "__main__":
    main()

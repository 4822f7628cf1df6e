"""What a command reads and writes: output paths checked before any work, all-or-nothing writers, arrays.

Every output goes through `atomic_output`: a temporary `.jacgraph-*` file beside the target, renamed onto
it only when complete, so an interrupted or failed command leaves either the old file or none. The live
temporary names are kept in LIVE_TEMPORARIES so an interrupt can remove them before the process exits.
"""
from __future__ import annotations

import contextlib
import os
import tempfile

import numpy as np
import onnx

from ..errors import JacgraphError

LIVE_TEMPORARIES: set = set()
EXTERNAL_DATA_LIMIT = 2 << 30  # protobuf cannot serialize one message over 2 GiB


@contextlib.contextmanager
def atomic_output(path, suffix=".onnx", flag="-o"):
    """A temporary path beside `path`, renamed onto it when the block succeeds and removed when it fails."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise JacgraphError(f"the output folder {folder} does not exist. Create it or choose another {flag} path.")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".jacgraph-", suffix=suffix, dir=folder)
        os.close(fd)
        LIVE_TEMPORARIES.add(tmp)
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; an output is an ordinary file
        os.replace(tmp, path)
    except OSError as e:  # a read-only folder, a full disk: the user's to fix, and nothing is left behind
        raise JacgraphError(f"{path} could not be written ({e.strerror or type(e).__name__}). Check that its "
                            f"folder is writable and the disk has space, or choose another {flag} path.") from None
    finally:
        LIVE_TEMPORARIES.discard(tmp)
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def remove_live_temporaries():
    for tmp in list(LIVE_TEMPORARIES):
        with contextlib.suppress(OSError):
            os.remove(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output(path, suffix: str, inputs=(), flag="-o/--output"):
    """Refuse, before any work, an output path that cannot or must not be written.

    Empty, a folder, a missing parent folder, the wrong suffix for what is written, or one of the
    command's own inputs (same file, under any name) are JacgraphErrors.
    """
    if path is None:
        return None
    path = os.fspath(path)
    if not path.strip():
        raise JacgraphError(f"{flag} is empty. Give the file to write, e.g. {flag.split('/')[0]} result{suffix}.")
    if os.path.isdir(path):
        raise JacgraphError(f"{flag} {path} is a folder. Give a file name inside it, e.g. {os.path.join(path, 'result' + suffix)}.")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise JacgraphError(f"the output folder {folder} does not exist. Create it or choose another {flag} path.")
    if not path.endswith(suffix):
        raise JacgraphError(f"{flag} {path} does not end in {suffix}, but this command writes a {suffix} file. "
                            f"Name the output like {os.path.splitext(path)[0] or 'result'}{suffix}, so no file is "
                            "mistaken for another kind (or written over one).")
    for given in inputs:
        if given is not None and _same_file(path, os.fspath(given)):
            raise JacgraphError(f"{flag} {path} is an input of this command ({given}); writing it would destroy "
                                "the input. Choose another output path.")
    return path


def _same_file(a, b) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def output_paths(out: str, result) -> dict:
    """{path: ModelProto}: one file, or STEM.<name>.onnx for each graph of an emit that writes several."""
    if isinstance(result, onnx.ModelProto):
        return {out: result}
    stem = out[:-5] if out.endswith(".onnx") else out
    return {f"{stem}.{suffix}.onnx": model for suffix, model in result.items()}


def write_atomic(models: dict, inputs=(), external_data=False):
    """Write {path: ModelProto} all-or-nothing: every file is written before any is renamed into place.

    Weights are embedded, or with external_data (needed above 2 GiB) kept in PATH.data beside each file.
    """
    for path in models:
        check_output(path, ".onnx", inputs)
    with contextlib.ExitStack() as stack:
        for path, model in models.items():
            tmp = stack.enter_context(atomic_output(path))
            if external_data or model.ByteSize() > EXTERNAL_DATA_LIMIT:
                if not external_data:
                    raise JacgraphError(f"the graph for {path} is {model.ByteSize() / 2**30:.1f} GiB, over protobuf's "
                                        "2 GiB limit for one file. Add --external-data to keep its weights in "
                                        f"{os.path.basename(path)}.data beside it.")
                _save_with_external_data(model, tmp, path, stack)
            else:
                onnx.save(model, tmp)


def _save_with_external_data(model, tmp, path, stack):
    """Weights in `path`.data (a sibling written atomically too); the graph refers to it by its base name."""
    data_tmp = stack.enter_context(atomic_output(path + ".data", suffix=".data"))
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    # onnx writes the data file relative to the model it saves: save into the data file's temporary name
    onnx.save(copy, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
              location=os.path.basename(data_tmp), size_threshold=1024)
    for tensor in onnx.external_data_helper._get_all_tensors(copy):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = os.path.basename(path) + ".data"
    onnx.save(copy, tmp)


def save_npz(path, arrays: dict, inputs=()):
    """Arrays to a .npz, all-or-nothing."""
    check_output(path, ".npz", inputs)
    with atomic_output(path, ".npz") as tmp:
        np.savez(tmp, **arrays)


def save_npz_sparse(path, J, inputs=()):
    """A Jacobian (dense or sparse) as a scipy.sparse .npz, all-or-nothing."""
    import scipy.sparse as sp

    check_output(path, ".npz", inputs)
    with atomic_output(path, ".npz") as tmp:
        sp.save_npz(tmp, sp.csr_matrix(J))


def parse_shape(text):
    """'1,3,32,32' or '1x3x32x32' -> (1, 3, 32, 32); every dimension a positive integer."""
    try:
        shape = tuple(int(d) for d in str(text).replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise JacgraphError(f"--input-shape {text!r} is not a shape; write it like 1,3,32,32.") from None
    if not shape or any(d < 1 for d in shape):
        raise JacgraphError(f"--input-shape {text!r} is not a shape of positive sizes; write it like 1,3,32,32.")
    return shape


def parse_input_shapes(texts):
    """--input-shape values: NAME=DIMS (repeatable; dims may be names, which stay symbolic) -> {name: dims},
    and at most one bare DIMS (the recurjac/autolip input shape)."""
    named, bare = {}, []
    for text in texts:
        if "=" not in text:
            bare.append(parse_shape(text))
            continue
        name, dims = text.rsplit("=", 1)
        named[name.strip()] = [int(d) if d.strip().lstrip("-").isdigit() else d.strip()
                               for d in dims.replace("x", ",").split(",") if d.strip()]
        if not name.strip() or not named[name.strip()]:
            raise JacgraphError(f"--input-shape {text!r} is not NAME=DIMS; write it like x=1,3,224,224.")
        if any(isinstance(d, int) and d < 1 for d in named[name.strip()]):
            raise JacgraphError(f"--input-shape {text!r} has a size below 1; every dimension is a positive integer "
                                "or a name (kept symbolic).")
    if len(bare) > 1:
        raise JacgraphError("--input-shape without a NAME= may be given once; name each input: --input-shape x=1,3,32,32.")
    return named, (bare[0] if bare else None)


def load_array(path, flag="--x0"):
    """A real, finite, non-empty numpy array from a .npy file (no pickles), or a JacgraphError that says why."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isfile(path):
        raise JacgraphError(f"{flag} {path} is not a regular file. Save the array with numpy.save('x.npy', x).")
    if not os.path.isfile(path):
        raise JacgraphError(f"{flag} {path}: no such file. Save the array with numpy.save('x.npy', x).")
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as e:
        raise JacgraphError(f"{flag} {path} is not a .npy array ({type(e).__name__}). Save it with "
                            "numpy.save('x.npy', x).") from None
    if isinstance(array, np.lib.npyio.NpzFile):
        names = ", ".join(array.files) or "none"
        array.close()
        raise JacgraphError(f"{flag} {path} is a .npz archive (arrays: {names}), not one .npy array. Save the one "
                            "array with numpy.save('x.npy', x).")
    return check_array(array, flag)


def check_array(array, flag="--x0"):
    """The array if it is real (float, int or uint), non-empty and finite; else a JacgraphError."""
    array = np.asarray(array)
    if array.dtype.kind not in "fiu":
        what = {"c": "complex", "U": "string", "S": "bytes", "O": "object", "b": "boolean"}.get(array.dtype.kind,
                                                                                                 str(array.dtype))
        raise JacgraphError(f"{flag} holds {what} values (dtype {array.dtype}); it must be a real float or integer "
                            "array. Convert it, e.g. x.real.astype(numpy.float32), and save it again.")
    if array.size == 0:
        raise JacgraphError(f"{flag} is empty (shape {list(array.shape)}); give at least one point.")
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        bad = int(np.sum(~np.isfinite(array)))
        raise JacgraphError(f"{flag} holds {bad} NaN or infinite value(s); replace them with finite numbers.")
    return array

"""``trd-hpc export RUN --format torchscript|onnx|pt2 --out FILE``: the model without trd-hpc.

The network of a run's bundle is traced (TorchScript), exported (``torch.export``, saved as a
``.pt2`` ExportedProgram) or exported to ONNX (the dynamo exporter), with the batch size left
free; then the exported model is run on another batch of another size and compared with the
PyTorch model (max |difference| <= 1e-4 on every output, printed).  Loading it needs only
torch (or onnxruntime):

    torch.jit.load("emt.ts")(fmri, snp, clinical)
    torch.export.load("emt.pt2").module()(fmri, snp, clinical)
    onnxruntime.InferenceSession("emt.onnx").run(None, {"fmri": ..., "snp": ..., "clinical": ...})

Inputs are as ``trd-hpc predict`` prepares them (bundle/preprocessing.json): float32 fMRI /
volume with the channel axis, uint8 genotypes (as a cohort stores them), standardised clinical
values.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from trd_hpc.bundle import load_bundle
from trd_hpc.errors import ConfigError, TrdError, WriteError
from trd_hpc.fsio import HOST, _disk_full, explain, remove_stale_temps

FORMATS = ("torchscript", "onnx", "pt2")
TOLERANCE = 1e-4


class ExportError(TrdError, RuntimeError):
    """The model cannot be exported to the format asked for."""


def example_inputs(b, batch: int, seed: int) -> dict[str, torch.Tensor]:
    """Inputs of the bundle's schema in the ranges the model sees (the task's own, else
    trd_hpc.tasks.base.example_inputs)."""
    from trd_hpc.tasks import spec_for
    from trd_hpc.tasks.base import example_inputs as generic

    g = torch.Generator().manual_seed(seed)
    return (spec_for(b.cfg).example_inputs or generic)(b.schema, batch, g)


def _outputs(y) -> dict[str, np.ndarray]:
    if isinstance(y, dict):
        return {k: v.detach().numpy() for k, v in y.items()}
    if isinstance(y, (list, tuple)):
        return {str(i): v.detach().numpy() if torch.is_tensor(v) else np.asarray(v) for i, v in enumerate(y)}
    return {"logit": y.detach().numpy()}


def export_model(source: str | Path, fmt: str, out: str | Path) -> dict:
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: one of {', '.join(FORMATS)}")
    b = load_bundle(source)
    model = b.build_model()
    names = [c["name"] for c in b.schema["inputs"]]
    x = example_inputs(b, 2, 0)
    args = tuple(x[n] for n in names)
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out.parent, name_prefix=out.name)  # of an export killed with -9
        # Exported and checked in a fresh folder beside OUT (the exporters may write files next
        # to theirs, and some read the suffix), then renamed over OUT: a failed export (full
        # disk, an operator the exporter lacks) leaves the previous OUT as it was.
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{HOST}-{os.getpid()}-r", suffix="", dir=out.parent))
    except OSError as e:
        raise WriteError(f"cannot write {out}: {explain(e)}") from None
    try:
        tmp = work / out.name
        diff = _export_into(b, model, fmt, names, args, tmp)
        # the exporter's side files first (ONNX's external weights, NAME.data, which NAME
        # names relative to itself), NAME last: a reader never finds NAME without its data
        for side in sorted(p for p in work.iterdir() if p != tmp):
            os.replace(side, out.parent / side.name)
        os.replace(tmp, out)
    except OSError as e:
        raise WriteError(f"cannot write {out}: {explain(e)}; the previous file (if any) is unchanged") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"out": str(out), "format": fmt, "max_abs_diff": diff, "tolerance": TOLERANCE}


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _export_into(b, model, fmt: str, names: list, args: tuple, out: Path) -> float:
    batch = torch.export.Dim("batch", min=1, max=4096)
    dyn = {n: {0: batch} for n in names}
    try:
        # TorchScript and .pt2 are serialised in memory, then written by Python: torch's C++
        # zip writer aborts the whole process (SIGABRT, no Python exception) on a full disk.
        if fmt == "torchscript":
            buf = io.BytesIO()
            with torch.no_grad():
                torch.jit.save(torch.jit.trace(model, args, strict=False, check_trace=False), buf)
            _write(out, buf.getvalue())
        elif fmt == "pt2":
            buf = io.BytesIO()
            torch.export.save(torch.export.export(model, args, dynamic_shapes=dyn), buf)
            _write(out, buf.getvalue())
        else:
            try:
                import onnx  # noqa: F401
                import onnxscript  # noqa: F401
            except ImportError:
                raise ConfigError(
                    "--format onnx needs the onnx and onnxscript packages: pip install onnx onnxscript"
                ) from None
            torch.onnx.export(model, args, str(out), input_names=names, dynamo=True, dynamic_shapes=dyn)
    except ConfigError:
        raise
    except OSError:
        raise
    except Exception as e:  # the exporters raise many types for an operator they cannot handle
        if _disk_full(out.parent):  # torch's writers report ENOSPC as RuntimeError
            raise OSError(errno.ENOSPC, "No space left on device") from e
        msg = " ".join(str(e).split())[:300]
        raise ExportError(f"{b.cfg.model.name} cannot be exported to {fmt}: {type(e).__name__}: {msg}") from None
    return check_export(b, model, fmt, out)


def check_export(b, model, fmt: str, path: Path) -> float:
    """The exported model against the PyTorch one on a batch of 3 (another size and values)."""
    x = example_inputs(b, 3, 1)
    names = [c["name"] for c in b.schema["inputs"]]
    with torch.no_grad():
        want = _outputs(model(**x))
        if fmt == "torchscript":
            got = _outputs(torch.jit.load(str(path))(*[x[n] for n in names]))
        elif fmt == "pt2":
            got = _outputs(torch.export.load(str(path)).module()(*[x[n] for n in names]))
        else:
            try:
                import onnxruntime as ort
            except ImportError:
                raise ConfigError("checking an ONNX export needs onnxruntime: pip install onnxruntime") from None
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            res = sess.run(None, {n: x[n].numpy() for n in names})
            got = dict(zip(want, res))
    if set(got) != set(want) and len(got) == len(want):
        got = dict(zip(want, got.values()))
    diff = max(float(np.abs(np.asarray(got[k], dtype=np.float64) - want[k]).max()) for k in want)
    if not diff <= TOLERANCE:
        raise ExportError(f"{path}: the exported model's outputs differ from PyTorch's by {diff:.3g} (> {TOLERANCE})")
    return diff

"""``--to onnx``: a trained task network as an ONNX graph with a dynamic batch, checked with onnxruntime.

An ONNX graph is the whole network, not a renaming of its weights, so it is built by the task package that
owns the network: each task's ``predict`` module exposes ``onnx_module(path, checkpoint)`` -> :class:`OnnxModule`
(the trained network in eval mode, an example input, the names of inputs and outputs, what it covers).  The
command line (``pipeline/convert.py``, whose table names each task's ``predict`` module) asks it for that; this
module knows no task package.

What each graph covers:

* classification: normalised images (B, 3, S, S) -> logits (B, classes) (the evaluation transform, resize and
  centre crop, stays on the host);
* segmentation: one sliding window, normalised (B, 3, crop, crop) -> logits (B, classes, crop, crop) (the
  windows, their averaging and the resize back to the image stay on the host);
* detection: the backbone, normalised padded images (B, 3, S, S) -> the pyramid p2..p6 (torchvision's RPN and
  RoI heads, with their NMS and mask pasting, stay in PyTorch).

Attention is exported through its explicit softmax path (:func:`maecore.models.layers.set_fused_attention`; the same
numbers up to rounding): the exporter has no fused kernel to map SDPA to, and its decomposition of SDPA with a
relative-position bias fails.  After writing, the graph runs in onnxruntime on a batch of another size than
the example's and its outputs must match PyTorch's within ``tol`` (1e-4), or nothing is left behind.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from maecore.errors import UserError

TOL = 1e-4
EXTERNAL_DATA_BYTES = 1_800_000_000  # ONNX protobuf files stop at 2 GB: larger weights go to DST.data beside


@dataclass
class OnnxModule:
    """What a task hands to :func:`export_onnx`."""

    module: nn.Module  # eval mode; tensors in, a tensor or a tuple of tensors out
    example: torch.Tensor  # one input, batch 2 (the batch is made dynamic; torch.export specialises a batch of 1)
    input_name: str
    output_names: list[str]
    covers: str  # one line: what the graph computes and what stays on the host


def require_onnx() -> None:
    missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if not _importable(m)]
    if missing:
        raise UserError(f"--to onnx needs {', '.join(missing)}: pip install 'mae-toolkit[onnx]' (onnx, onnxruntime, onnxscript)")


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def export_onnx(spec: OnnxModule, dst: str | os.PathLike, force: bool = False, tol: float = TOL) -> dict[str, object]:
    """Write ``spec.module`` as ONNX (opset of the dynamo exporter, dynamic batch) to ``dst`` and check it with
    onnxruntime against PyTorch; returns what was checked (batch sizes, largest difference per output)."""
    require_onnx()
    import onnxruntime as ort

    from maecore.models.layers import set_fused_attention

    dst = Path(dst)
    if dst.is_dir():
        raise UserError(f"{dst} is a directory; give a file name (model.onnx)")
    if dst.exists() and not force:
        raise UserError(f"{dst} exists (use --force to overwrite)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    model = spec.module.eval().float()
    set_fused_attention(model, False)
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    example = spec.example.float()
    # written in a folder beside DST under DST's own name (an external weights file is referenced by name), moved when checked
    work = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    tmp, data = work / dst.name, work / f"{dst.name}.data"
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(tmp), input_names=[spec.input_name], output_names=spec.output_names,
                              dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                              external_data=n_bytes > EXTERNAL_DATA_BYTES, verbose=False)
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        batch = example.shape[0] + 1  # another batch size than the traced one: the batch is really dynamic
        x = torch.randn((batch, *example.shape[1:]), generator=torch.Generator().manual_seed(0))
        got = session.run(None, {spec.input_name: x.numpy()})
        with torch.no_grad():
            ref = model(x)
        refs = list(ref) if isinstance(ref, (tuple, list)) else [ref]
        diffs = {name: float((torch.from_numpy(g) - r.float()).abs().max()) for name, g, r in zip(spec.output_names, got, refs)}
        if len(got) != len(refs) or any(g.shape != tuple(r.shape) for g, r in zip(got, refs)):
            raise UserError(f"the ONNX graph's outputs {[g.shape for g in got]} differ from PyTorch's {[tuple(r.shape) for r in refs]}")
        worst = max(diffs.values())
        if not worst <= tol:
            raise UserError(f"the ONNX graph differs from PyTorch by {worst:.3g} (> {tol:g}) on a batch of {batch}: not written")
        os.replace(tmp, dst)
        if data.exists():
            os.replace(data, Path(str(dst) + ".data"))
    except UserError:
        raise
    except Exception as e:  # the exporter's own failures are long; their first line says what broke
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"ONNX export failed: {type(e).__name__}: {first}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"batch_checked": batch, "max_abs_diff": diffs, "external_data": n_bytes > EXTERNAL_DATA_BYTES}

"""Export a distilled student as one deployable file (ONNX or TorchScript), written and checked by
``export_student``. The graph maps ``images`` ``[batch, 3, S, S]`` (float32, preprocessed) to
``logits`` ``[batch, N]`` (q_s = s · norm(f_e) · Wᵀ over the stored class names), dynamic batch.
The file's metadata holds what a caller needs around the graph:

* ``comkd.preprocess``: ``{"image_size", "mean", "std", "interpolation", "resize", "crop"}``:
  RGB, resize the shorter side to ``image_size`` with ``interpolation``, centre crop
  ``image_size``², scale to [0, 1], subtract ``mean`` and divide by ``std`` per channel (the
  project's ``EvalTransform``);
* ``comkd.classnames``: the N class names, in logit order;
* ``comkd.input`` / ``comkd.output``: the tensor layouts in words;
* ``comkd.student_config`` (and ``comkd.teacher`` when known): copied from the student file.

ONNX keeps them in the model's ``metadata_props``; TorchScript in the archive's extra file
``comkd.json``.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..fileio import atomic_path
from ..models.backbones import PREPROCESS_STEPS, ModelError, spec_json

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}
EXTRA_FILE = "comkd.json"


class LogitsHead(nn.Module):
    """The student as a plain ``images [B, 3, S, S] -> logits [B, N]`` module (what is exported)."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.student(images).logits


def export_metadata(student: nn.Module, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The metadata written into an export (see the module docstring)."""
    s = student.preprocess.image_size
    n = len(student.classnames)
    return {
        "comkd.format_version": "1",
        "comkd.preprocess": json.dumps({**spec_json(student.preprocess), **PREPROCESS_STEPS}),
        "comkd.classnames": json.dumps(list(student.classnames)),
        "comkd.input": f"images: float32 [batch, 3, {s}, {s}], RGB, preprocessed as comkd.preprocess says",
        "comkd.output": f"logits: float32 [batch, {n}] in comkd.classnames order; softmax gives probabilities",
        **(extra or {}),
    }


def export_onnx(student: nn.Module, path: str | Path, meta: dict[str, str], opset: int = 17) -> Path:
    """Write ``student`` as ONNX (dynamic batch) with ``meta`` in ``metadata_props``, checked."""
    try:
        import onnx  # checked up front, so a missing extra is named before any work
    except ImportError:
        raise ModelError("ONNX export needs the onnx package: pip install 'comkd[onnx]'") from None
    path = Path(path)
    head, dummy = _head_and_input(student)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    with atomic_path(path) as tmp:
        torch.backends.mha.set_fastpath_enabled(False)  # ONNX has no op for PyTorch's fused attention kernel
        try:
            with torch.no_grad(), warnings.catch_warnings():
                # the tracer's notes on constant shapes of W (fixed by design)
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    head,
                    (dummy,),
                    str(tmp),
                    input_names=["images"],
                    output_names=["logits"],
                    dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                    opset_version=opset,
                    dynamo=False,
                )
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
        model = onnx.load(str(tmp))
        for k, v in meta.items():
            model.metadata_props.add(key=k, value=v)
        onnx.checker.check_model(model)
        onnx.save(model, str(tmp))
    return path


def _head_and_input(student: nn.Module) -> tuple[nn.Module, torch.Tensor]:
    """The ``LogitsHead`` to trace (eval mode) and a zero batch ``[2, 3, S, S]`` on its device."""
    s = student.preprocess.image_size
    return LogitsHead(student).eval(), torch.zeros(2, 3, s, s, device=next(student.parameters()).device)


def export_torchscript(student: nn.Module, path: str | Path, meta: dict[str, str]) -> tuple[Path, nn.Module]:
    """Trace ``student`` (batch-size independent: checked by the caller on another batch size) and
    save it with ``meta`` as the extra file ``comkd.json``. Returns the path and the traced module."""
    path = Path(path)
    head, dummy = _head_and_input(student)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(head, dummy, check_trace=False)
    with atomic_path(path) as tmp:
        torch.jit.save(traced, str(tmp), _extra_files={EXTRA_FILE: json.dumps(meta)})
    return path, traced


def compare(
    reference: Callable[[torch.Tensor], torch.Tensor],
    others: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    batches: Iterable[torch.Tensor],
    labels: Sequence[int] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run ``reference`` and each of ``others`` (``[B, 3, S, S] -> [B, N]``) over ``batches`` in one
    pass. For each other: the images whose top-1 class agrees with the reference's, and the largest
    absolute logit difference; with ``labels`` (in batch order) also the top-1 accuracy (%) of every
    function, the reference under ``"reference"``."""
    stats = {k: {"agree": 0, "max_diff": 0.0, "correct": 0} for k in others}
    ref_correct = n = 0
    for x in batches:
        a = reference(x).float().cpu()
        pa = a.argmax(-1)
        y = torch.as_tensor(labels[n : n + len(x)]) if labels is not None else None
        if y is not None:
            ref_correct += int((pa == y).sum())
        for k, fn in others.items():
            b = fn(x).float().cpu()
            if a.shape != b.shape:
                raise ModelError(f"{k} gives logits {list(b.shape)}, the student {list(a.shape)}")
            pb = b.argmax(-1)
            st = stats[k]
            st["agree"] += int((pa == pb).sum())
            st["max_diff"] = max(st["max_diff"], float((a - b).abs().max()))
            if y is not None:
                st["correct"] += int((pb == y).sum())
        n += len(x)
    out: dict[str, dict[str, Any]] = {}
    for k, st in stats.items():
        out[k] = {
            "images": n,
            "top1_agree": st["agree"],
            "top1_agreement": st["agree"] / n if n else float("nan"),
            "max_abs_logit_diff": st["max_diff"],
        }
        if labels is not None:
            out[k]["accuracy"] = 100.0 * st["correct"] / n
    if labels is not None:
        out["reference"] = {"images": n, "accuracy": 100.0 * ref_correct / n}
    return out


def folder_labels(paths: Sequence[str], classnames: Sequence[str]) -> list[int] | None:
    """The label of each image from its parent folder's name (case and ``_``/space-insensitive), or
    None unless every folder names one of ``classnames``."""
    index = {c.lower().replace("_", " "): i for i, c in enumerate(classnames)}
    labels = [index.get(Path(p).parent.name.lower().replace("_", " ")) for p in paths]
    return None if any(y is None for y in labels) else labels  # type: ignore[return-value]


def export_student(
    student_path: str | Path,
    fmt: str,
    out: str | Path | None = None,
    *,
    check_images: Sequence[str] = (),
    batch_size: int = 64,
    quantize: str | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Export the student file ``student_path`` to ``fmt`` (``onnx`` or ``torchscript``) and check it.

    ``check_images``: image files checked against the PyTorch student (else 16 random inputs, as the
    report says); in folders named after the classes, the top-1 accuracy is reported too.
    ``quantize='int8'`` (ONNX only) also writes ``<out>.int8.onnx`` (ONNX Runtime dynamic weight
    quantisation) with its agreement with the float student (and, with class folders, its accuracy
    and the change in points). An export whose top-1 disagrees on any image is refused."""
    from ..models.io import load_student
    from ..models.predict import iter_batches, student_logits

    if fmt not in FORMATS:
        raise ModelError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if quantize not in (None, "int8"):
        raise ModelError(f"--quantize must be int8, got {quantize!r}")
    if quantize and fmt != "onnx":
        raise ModelError("--quantize int8 is for --format onnx")
    from ..models.hub import student_and_out

    student_path, out = student_and_out(student_path, out, SUFFIX[fmt])
    student = load_student(student_path, device)
    out = out or student_path.with_suffix(SUFFIX[fmt])
    out.parent.mkdir(parents=True, exist_ok=True)
    from safetensors import safe_open

    with safe_open(str(student_path), framework="pt") as f:
        file_meta = f.metadata() or {}
    meta = export_metadata(
        student, {k: v for k, v in file_meta.items() if k in ("comkd.student_config", "comkd.teacher")}
    )
    labels = folder_labels(check_images, student.classnames) if check_images else None
    if check_images:  # through the student's preprocess, lazily; else 16 seeded random inputs
        source = f"{len(check_images)} images"
        batches: Iterable[torch.Tensor] = (
            x for x, _ in iter_batches(student, list(check_images), batch_size)
        )
    else:
        source = "16 random inputs (no --check-images given)"
        s = student.preprocess.image_size
        batches = [torch.randn(16, 3, s, s, generator=torch.Generator().manual_seed(0))]
    report: dict[str, Any] = {
        "format": fmt,
        "file": str(out),
        "checked_on": source,
        "classes": len(student.classnames),
        "image_size": student.preprocess.image_size,
    }
    others = _write_and_load(student, fmt, out, meta, quantize)
    res = compare(student_logits(student), others, batches, labels)  # one pass over the images
    report["parity"] = {k: v for k, v in res["export"].items() if k != "accuracy"}
    if labels is not None:  # class folders named after the classes: accuracy is measurable
        report["accuracy"] = res["reference"]["accuracy"]
    if "int8" in res:  # its size and agreement with the float student (and accuracy change, labelled)
        qpath, q = out.with_name(out.stem + ".int8.onnx"), res["int8"]
        report["int8"] = {
            "file": str(qpath),
            "bytes": qpath.stat().st_size,
            "parity": {k: v for k, v in q.items() if k != "accuracy"},
        }
        if labels is not None:
            report["int8"].update(
                accuracy=q["accuracy"],
                float_accuracy=res["reference"]["accuracy"],
                accuracy_change=q["accuracy"] - res["reference"]["accuracy"],
            )
    report["bytes"] = out.stat().st_size
    p = report["parity"]
    if p["top1_agree"] != p["images"]:
        out.unlink(missing_ok=True)
        raise ModelError(
            f"{fmt} export of {student_path} disagrees with the PyTorch student on top-1 for "
            f"{p['images'] - p['top1_agree']} of {p['images']} images (max |Δ logit| {p['max_abs_logit_diff']:.3g}); "
            "not written"
        )
    log.info(
        "exported %s: top-1 agreement %d/%d, max |Δ logit| %.3g",
        out,
        p["top1_agree"],
        p["images"],
        p["max_abs_logit_diff"],
    )
    return report


def _write_and_load(
    student, fmt: str, out: Path, meta: dict, quantize: str | None
) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Write the export (and its int8 copy) and return each as ``images -> logits``."""
    if fmt == "onnx":
        from .onnx_runtime import OnnxStudent

        export_onnx(student, out, meta)
        others = {"export": OnnxStudent(out).predict_logits}
        if quantize:
            qpath = out.with_name(out.stem + ".int8.onnx")
            quantize_onnx(out, qpath)
            others["int8"] = OnnxStudent(qpath).predict_logits
        return others
    _, traced = export_torchscript(student, out, meta)
    device = next(student.parameters()).device

    def run_traced(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return traced(x.to(device))

    return {"export": run_traced}


def quantize_onnx(src: str | Path, dst: str | Path) -> Path:
    """ONNX Runtime dynamic int8 quantisation of the weights of ``src`` (metadata kept)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst = Path(dst)
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    m, q = onnx.load(str(src)), onnx.load(str(dst))
    have = {p.key for p in q.metadata_props}
    for p in m.metadata_props:
        if p.key not in have:
            q.metadata_props.add(key=p.key, value=p.value)
    onnx.save(q, str(dst))
    return dst

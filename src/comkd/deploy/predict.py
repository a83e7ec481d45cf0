"""``comkd predict``: top-k class names and probabilities of image files as CSV or JSON lines,
from a student file (PyTorch) or its ONNX export (ONNX Runtime), through ``comkd.models.predict``."""

from __future__ import annotations

import contextlib
import csv
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch

from ..data.dataset import load_image_file
from ..data.errors import DataError
from ..fileio import atomic_path
from ..models.backbones import ModelError
from ..models.predict import Prediction, iter_batches, logits_fn, topk_predictions


def _writer(fmt: str, f: TextIO, k: int) -> Callable[[Prediction], None]:
    if fmt == "jsonl":
        return lambda p: f.write(json.dumps(p.to_dict()) + "\n")
    w = csv.writer(f)
    w.writerow(["path", *[c for r in range(1, k + 1) for c in (f"class_{r}", f"prob_{r}")]])

    def row(p: Prediction) -> None:
        w.writerow([p.path, *(x for c, q in zip(p.classes, p.probs, strict=True) for x in (c, f"{q:.6f}"))])

    return row


def output_format(out: Path | None, fmt: str | None) -> str:
    """``csv`` or ``jsonl``: ``fmt`` if given, else from the suffix of ``out`` (default csv)."""
    if fmt is None:
        fmt = "jsonl" if out is not None and out.suffix.lower() in (".jsonl", ".json", ".ndjson") else "csv"
    if fmt not in ("csv", "jsonl"):
        raise ValueError(f"--format must be csv or jsonl, got {fmt!r}")
    return fmt


def predict_files(
    model: Any,
    paths: Sequence[str],
    out: Path | None = None,
    *,
    fmt: str | None = None,
    top_k: int = 5,
    batch_size: int = 64,
    progress: bool = True,
    skip_bad: bool = False,
) -> dict[str, Any]:
    """Predict every image of ``paths`` and write one row per image to ``out`` (stdout if None)
    as CSV (``path,class_1,prob_1,...``) or JSON lines. Unreadable files raise ``DataError``
    naming the file, or with ``skip_bad`` are left out and listed in the returned summary."""
    from ..engine.utils import progress_bar

    if out is not None and out.is_dir():  # checked before anything is written
        raise ValueError(f"--out {out} is a folder; give the file to write (e.g. {out / 'predictions.csv'})")
    fmt = output_format(out, fmt)
    k = min(int(top_k), len(model.classnames))
    if k < 1:
        raise ValueError(f"--top-k must be >= 1, got {top_k}")
    if batch_size < 1:  # before the table's header is written
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    fn = logits_fn(model)
    skipped: list[tuple[str, str]] = []
    if skip_bad:
        good = []
        for p in paths:
            try:
                load_image_file(p)
                good.append(p)
            except DataError as e:
                skipped.append((p, str(e)))
        paths = good
    counts: dict[str, int] = {}
    # written whole or not at all: an error on image 900 of 1,000 leaves no half table (nor a changed old one)
    with contextlib.ExitStack() as stack:
        if out is not None:
            tmp = stack.enter_context(atomic_path(out))
            f = stack.enter_context(open(tmp, "w", newline="", encoding="utf-8"))
        else:
            f = sys.stdout
        write = _writer(fmt, f, k)
        bar = progress_bar(len(paths), "predict", progress, leave=False)
        if bar is not None:
            stack.enter_context(bar)
        for x, batch_paths in iter_batches(model, list(paths), batch_size):
            bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
            if bool(bad.any()):
                raise ModelError(
                    f"{batch_paths[int(bad.nonzero()[0])]}: NaN/inf values after preprocessing; "
                    "the model's preprocessing is damaged"
                )
            logits = fn(x)
            finite = torch.isfinite(logits).all(dim=-1)
            if not bool(finite.all()):
                first = batch_paths[int((~finite).nonzero()[0])]
                raise ModelError(
                    f"{getattr(model, 'path', 'the model')} gave NaN/inf scores for {first}; "
                    "its weights or preprocessing are damaged"
                )
            for p in topk_predictions(logits, model.classnames, k, batch_paths):
                write(p)
                counts[p.top1] = counts.get(p.top1, 0) + 1
            if bar is not None:
                bar.update(len(batch_paths))
    return {
        "images": len(paths),
        "out": str(out) if out is not None else None,
        "format": fmt,
        "top_k": k,
        "top1_counts": dict(sorted(counts.items())),
        "skipped": [{"path": p, "reason": r} for p, r in skipped],
    }


def load_predictor(path: str | Path, runtime: str = "auto", device: str = "auto") -> Any:
    """The model ``comkd predict`` runs: a student file in PyTorch (``torch``) or an ONNX export in
    ONNX Runtime (``onnx``); ``auto`` picks by the file's suffix. TorchScript files are refused:
    they are programs, and comkd only reads weights as data."""
    from ..models.hub import ONNX_FILENAME, STUDENT_FILENAME, student_path

    if runtime not in ("auto", "torch", "onnx"):
        raise ModelError(f"--runtime must be auto, torch or onnx, got {runtime!r}")
    # hf-hub:ORG/NAME: its student file, or its ONNX export with --runtime onnx
    path = student_path(path, ONNX_FILENAME if runtime == "onnx" else STUDENT_FILENAME)
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth", ".jit", ".ts"):
        raise ModelError(
            f"{path}: comkd does not load TorchScript/pickle files (they can run code); give the "
            "student .safetensors file, or its .onnx export with --runtime onnx"
        )
    if runtime == "onnx" or (runtime == "auto" and suffix == ".onnx"):
        if suffix != ".onnx":
            raise ModelError(
                f"--runtime onnx takes an .onnx export (comkd export {path} --format onnx), got {path}"
            )
        from .onnx_runtime import OnnxStudent

        return OnnxStudent(path)
    from ..engine.utils import resolve_device
    from ..models.io import load_student

    return load_student(path, resolve_device(device))

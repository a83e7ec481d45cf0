"""Predictions of a deployed student: top-k class names and probabilities for images.

Works with anything that has ``preprocess`` (PIL image -> ``[3, S, S]`` tensor), ``classnames``
and ``predict_logits(batch [B, 3, S, S]) -> [B, N]``: the PyTorch ``Student`` (through
``student_logits``) and ``OnnxStudent`` (ONNX Runtime). Probabilities are the softmax of the
logits q = s · cos(f_e, W) over the stored class names.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from PIL import Image

from ..data.dataset import load_image_file
from ..data.errors import DataError
from ..fileio import atomic_path

ImageLike = str | os.PathLike | Image.Image


@dataclass
class Prediction:
    """The top-k classes of one image, best first.

    Attributes:
        classes: class names, ``[k]``.
        probs: softmax probabilities over all N classes, ``[k]``.
        indices: indices into the stored class names, ``[k]``.
        path: the image file, when the image came from one.
    """

    classes: list[str]
    probs: list[float]
    indices: list[int]
    path: str | None = None

    @property
    def top1(self) -> str:
        return self.classes[0]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def student_logits(student: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``[B, 3, S, S]`` -> ``[B, N]`` logits of a PyTorch student, on its own device, no gradient."""
    device = next(student.parameters()).device

    def fn(x: torch.Tensor) -> torch.Tensor:
        student.eval()
        with torch.no_grad():
            return student(x.to(device)).logits.float().cpu()

    return fn


def _logits_fn(model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    fn = getattr(model, "predict_logits", None)
    return fn if fn is not None else student_logits(model)


def topk_predictions(
    logits: torch.Tensor, classnames: Sequence[str], k: int, paths: Sequence[str | None] | None = None
) -> list[Prediction]:
    """Top-``k`` (at most N) of each row of ``logits`` ``[B, N]`` as ``Prediction``s."""
    if logits.ndim != 2 or logits.shape[1] != len(classnames):
        raise ValueError(f"logits {list(logits.shape)} do not fit {len(classnames)} class names")
    probs = logits.float().softmax(dim=-1)
    p, i = probs.topk(min(int(k), probs.shape[1]), dim=-1)
    paths = list(paths) if paths is not None else [None] * len(logits)
    return [
        Prediction([classnames[j] for j in row_i], [float(v) for v in row_p], [int(j) for j in row_i], path)
        for row_p, row_i, path in zip(p.tolist(), i.tolist(), paths, strict=True)
    ]


def _load(item: ImageLike) -> tuple[Image.Image, str | None]:
    if isinstance(item, Image.Image):
        return item.convert("RGB"), None
    path = os.fspath(item)
    return load_image_file(path), path


def iter_batches(
    model: Any, images: Sequence[ImageLike], batch_size: int, workers: int = 4
) -> Iterator[tuple[torch.Tensor, list[str | None]]]:
    """Decode and preprocess ``images`` (threads) in batches: ``([B, 3, S, S], paths)``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    def prep(item: ImageLike) -> tuple[torch.Tensor, str | None]:
        img, path = _load(item)
        return model.preprocess(img), path

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(images), batch_size):
            done = list(pool.map(prep, images[start : start + batch_size]))
            yield torch.stack([t for t, _ in done]), [p for _, p in done]


def predict_images(
    model: Any,
    images: ImageLike | Sequence[ImageLike] | torch.Tensor,
    *,
    top_k: int = 5,
    batch_size: int = 64,
) -> list[Prediction]:
    """Top-k predictions of ``model`` for PIL images or image files (one or a list), or for a batch
    ``[B, 3, S, S]`` already preprocessed with ``model.preprocess``."""
    fn = _logits_fn(model)
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"a tensor batch must be [B, 3, H, W], got {list(images.shape)}")
        return topk_predictions(fn(images), model.classnames, top_k)
    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    out: list[Prediction] = []
    for x, paths in iter_batches(model, list(images), batch_size):
        out.extend(topk_predictions(fn(x), model.classnames, top_k, paths))
    return out


# -- the `comkd predict` command ---------------------------------------------------------------
def _writer(fmt: str, f: TextIO, k: int) -> Callable[[Prediction], None]:
    if fmt == "jsonl":
        return lambda p: f.write(json.dumps(p.to_dict()) + "\n")
    w = csv.writer(f)
    w.writerow(["path", *[c for r in range(1, k + 1) for c in (f"class_{r}", f"prob_{r}")]])

    def row(p: Prediction) -> None:
        cells: list[Any] = [p.path]
        for c, q in zip(p.classes, p.probs, strict=True):
            cells += [c, f"{q:.6f}"]
        w.writerow(cells)

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
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from ..engine.utils import show_progress

    if out is not None and out.is_dir():  # checked before anything is written
        raise ValueError(f"--out {out} is a folder; give the file to write (e.g. {out / 'predictions.csv'})")
    fmt = output_format(out, fmt)
    k = min(int(top_k), len(model.classnames))
    if k < 1:
        raise ValueError(f"--top-k must be >= 1, got {top_k}")
    fn = _logits_fn(model)
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
    # a file is written whole or not at all: an error on image 900 of 1,000 leaves no half table
    # (and an earlier file of that name as it was)
    with contextlib.ExitStack() as stack:
        if out is not None:
            tmp = stack.enter_context(atomic_path(out))
            f = stack.enter_context(open(tmp, "w", newline="", encoding="utf-8"))
        else:
            f = sys.stdout
        write = _writer(fmt, f, k)
        bar = Progress(
            "predict",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            disable=not show_progress(progress),
            transient=True,
        )
        with bar:
            task = bar.add_task("predict", total=len(paths))
            for x, batch_paths in iter_batches(model, list(paths), batch_size):
                logits = fn(x)
                finite = torch.isfinite(logits).all(dim=-1)
                if not bool(finite.all()):
                    from ..models.backbones import ModelError

                    first = batch_paths[int((~finite).nonzero()[0])]
                    raise ModelError(
                        f"{getattr(model, 'path', 'the model')} gave NaN/inf scores for {first}; "
                        "its weights or preprocessing are damaged"
                    )
                for p in topk_predictions(logits, model.classnames, k, batch_paths):
                    write(p)
                    counts[p.top1] = counts.get(p.top1, 0) + 1
                bar.advance(task, len(batch_paths))
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
    from ..models.backbones import ModelError

    path = Path(path)
    if runtime not in ("auto", "torch", "onnx"):
        raise ModelError(f"--runtime must be auto, torch or onnx, got {runtime!r}")
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

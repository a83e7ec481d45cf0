"""The prediction core: top-k class names and probabilities (the softmax of q = s · cos(f_e, W)
over the stored class names) for any model with ``preprocess`` (PIL image -> ``[3, S, S]``),
``classnames`` and either ``predict_logits(batch [B, 3, S, S]) -> [B, N]`` (``OnnxStudent``) or a
``forward`` whose output has ``.logits`` (``Student``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import torch
from PIL import Image

from ..data.dataset import load_image_file

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


def logits_fn(model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model.predict_logits`` when it has one (``OnnxStudent``), else ``student_logits(model)``."""
    return getattr(model, "predict_logits", None) or student_logits(model)


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


def iter_batches(
    model: Any, images: Sequence[ImageLike], batch_size: int, workers: int = 4
) -> Iterator[tuple[torch.Tensor, list[str | None]]]:
    """Decode and preprocess ``images`` (threads) in batches: ``([B, 3, S, S], paths)``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    def prep(item: ImageLike) -> tuple[torch.Tensor, str | None]:
        if isinstance(item, Image.Image):  # an RGB PIL image and its path (None for a PIL image)
            return model.preprocess(item.convert("RGB")), None
        path = os.fspath(item)
        return model.preprocess(load_image_file(path)), path

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
    ``[B, 3, S, S]`` already preprocessed with ``model.preprocess``. ``top_k`` below 1 is
    refused, as ``comkd predict --top-k`` refuses it."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    fn = logits_fn(model)
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"a tensor batch must be [B, 3, H, W], got {list(images.shape)}")
        return topk_predictions(fn(images), model.classnames, top_k)
    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    batches = iter_batches(model, list(images), batch_size)
    return [p for x, paths in batches for p in topk_predictions(fn(x), model.classnames, top_k, paths)]

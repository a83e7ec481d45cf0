"""Image transforms with explicit random generators, so an augmented view can be replayed exactly:
a train transform (RandomResizedCrop as torchvision samples it, horizontal flip) called with
``generator=torch.Generator().manual_seed(s)`` draws every random number from that generator, so
the same seed on the same image gives the same tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_INTERP = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


#: the interpolation names a ``PreprocessSpec`` may record
INTERPOLATIONS = tuple(_INTERP)


def transform_fingerprint(
    image_size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    interpolation: str = "bicubic",
    train: bool = False,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
) -> str:
    """A stable string describing every parameter that changes a transform's output.

    Used as a key by teacher-output caches: two transforms with equal fingerprints give equal
    tensors for equal images and seeds.
    """

    def f(xs: Sequence[float]) -> str:
        return ",".join(f"{float(x):.6g}" for x in xs)

    parts = [
        f"v1|{'train' if train else 'test'}",
        f"size={int(image_size)}",
        f"interp={interpolation}",
        f"mean={f(mean)}",
        f"std={f(std)}",
    ]
    if train:
        parts += [f"scale={f(scale)}", f"ratio={f(ratio)}", f"hflip={float(hflip):.6g}"]
    return "|".join(parts)


class _Base:
    train: bool  # set by each subclass

    def __init__(
        self, image_size: int, mean: Sequence[float], std: Sequence[float], interpolation: str
    ) -> None:
        if int(image_size) < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got mean={list(mean)} std={list(std)}")
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.interpolation = interpolation
        if interpolation not in _INTERP:
            raise ValueError(f"unknown interpolation {interpolation!r}; valid: {', '.join(_INTERP)}")
        self.resample = _INTERP[interpolation]
        self._mean_t = torch.tensor(self.mean).view(3, 1, 1)
        self._std_t = torch.tensor(self.std).view(3, 1, 1)

    def to_tensor(self, img: Image.Image) -> torch.Tensor:
        """RGB PIL image -> normalised float tensor [3, H, W]."""
        arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
        t = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
        return (t - self._mean_t) / self._std_t

    @property
    def fingerprint(self) -> str:
        aug = (self.scale, self.ratio, self.hflip) if self.train else ()
        return transform_fingerprint(
            self.image_size, self.mean, self.std, self.interpolation, self.train, *aug
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.fingerprint})"


class EvalTransform(_Base):
    """Resize the shorter side to ``image_size`` (keeping aspect ratio), centre crop, normalise."""

    train = False

    def __call__(self, img: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        s = self.image_size
        w, h = img.size
        if w <= h:
            nw, nh = s, max(s, int(s * h / w))
        else:
            nw, nh = max(s, int(s * w / h)), s
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), self.resample)
        left = int(round((nw - s) / 2.0))
        top = int(round((nh - s) / 2.0))
        return self.to_tensor(img.crop((left, top, left + s, top + s)))


class TrainTransform(_Base):
    """RandomResizedCrop + horizontal flip + normalise, with every random draw from ``generator``."""

    train = True

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: str = "bicubic",
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
    ) -> None:
        super().__init__(image_size, mean, std, interpolation)
        if not (0 < scale[0] <= scale[1] <= 1) or not (0 < ratio[0] <= ratio[1]) or not 0 <= hflip <= 1:
            raise ValueError(f"bad augmentation parameters: scale={scale} ratio={ratio} hflip={hflip}")
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip = float(hflip)

    def crop_params(
        self, width: int, height: int, generator: torch.Generator | None = None
    ) -> tuple[int, int, int, int]:
        """Sample a crop box ``(top, left, h, w)`` as torchvision's RandomResizedCrop does."""
        area = width * height
        log_r = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            u = torch.rand(2, generator=generator).tolist()
            target = area * (self.scale[0] + u[0] * (self.scale[1] - self.scale[0]))
            aspect = math.exp(log_r[0] + u[1] * (log_r[1] - log_r[0]))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
                left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
                return top, left, h, w
        # Fallback: centre crop with the aspect ratio clamped into range.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        top, left, h, w = self.crop_params(img.width, img.height, generator)
        s = self.image_size
        img = img.resize((s, s), self.resample, box=(left, top, left + w, top + h))
        if float(torch.rand(1, generator=generator)) < self.hflip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return self.to_tensor(img)


def build_transform(
    image_size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    interpolation: str = "bicubic",
    train: bool = False,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
) -> TrainTransform | EvalTransform:
    """Build the train (augmenting, seedable) or test (deterministic) transform.

    Both are callables ``(pil_image, generator=None) -> Tensor[3, image_size, image_size]`` and
    have a ``fingerprint`` string equal to ``transform_fingerprint`` of the same arguments.
    """
    if train:
        return TrainTransform(image_size, mean, std, interpolation, scale, ratio, hflip)
    return EvalTransform(image_size, mean, std, interpolation)

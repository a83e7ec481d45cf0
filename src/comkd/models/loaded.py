"""What loading a backbone gives (``LoadedModel``, ``PreprocessSpec``) and ``ModelError``; below
``backbones`` and ``real_towers``, which both build them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn


class ModelError(ValueError):
    """A model name, weight file or size that does not fit; the message names the culprit."""


@dataclass
class PreprocessSpec:
    """What a backbone expects of its input images."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    def __call__(self, image):
        """The test-time transform: PIL image -> normalised ``[3, image_size, image_size]`` tensor
        (resize the shorter side, centre crop; ``comkd.data.transforms.EvalTransform``)."""
        from ..data.transforms import build_transform

        return build_transform(self.image_size, self.mean, self.std, self.interpolation, train=False)(image)


def timm_preprocess(model: nn.Module, image_size: int | None = None) -> PreprocessSpec:
    """timm's mean, std and interpolation for ``model``, at ``image_size`` (None: timm's input size)."""
    import timm

    cfg = timm.data.resolve_data_config({}, model=model)
    return PreprocessSpec(
        image_size=image_size or int(cfg["input_size"][-1]),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        interpolation=cfg.get("interpolation", "bicubic"),
    )


@dataclass
class LoadedModel:
    """A backbone as loaded: the module, how to feed it, and where it came from."""

    model: nn.Module
    name: str
    pretrained: str | None
    preprocess: PreprocessSpec
    tokenizer: Any | None = None
    config: dict = field(default_factory=dict)

    @property
    def is_timm(self) -> bool:
        return self.name.startswith("timm:")

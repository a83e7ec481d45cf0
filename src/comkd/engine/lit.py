"""LiT for stage 0 (``pretrain.lock``, ``pretrain.fit``): towers kept frozen so that only their
projections learn, by gradient steps or, for few labelled pairs, in closed form.

The projections are the linear maps after each tower's trunk: ``visual.head.proj`` (an open_clip
``TimmModel``, the ``real:`` towers) or ``visual.proj`` (an open_clip ViT) for images,
``text.proj`` (an ``HFTextEncoder``) or ``text_projection`` (open_clip's own text tower) for text.
A locked tower is every other parameter of that side (open_clip's ``lock_image_tower`` /
``lock_text_tower`` with no unlocked groups, its projection left to learn) and stays in eval mode
(no BatchNorm statistics or dropout change).

The closed form (``fit_ridge``), with both towers locked: X ``[n, D]`` the frozen trunk features of
the ``n`` labelled images (evaluation preprocessing); the text projection is kept as it is (for the
``real:`` towers a seeded random Gaussian map from 384 to 512 dimensions, which keeps the MiniLM
sentence space's inner products up to a small distortion: Johnson-Lindenstrauss); Y ``[n, E]`` row
i the caption feature of image i's class c: normalise(mean over the dataset's templates j of
normalise(text_proj(text_trunk(template_j(c))))) (the class weights zero-shot scoring uses); then
the image projection A ``[E, D]`` = argmin ‖X Aᵀ − Y‖² + λ'‖A‖² = Yᵀ X (XᵀX + λ'I)⁻¹, with
λ' = ``pretrain.ridge_lambda`` x the mean diagonal of XᵀX (``models.projector.ridge_origin``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..models import ModelError
from ..models.projector import ridge_origin
from .evaluation import clip_class_weights

IMAGE_PROJECTIONS = ("visual.head.proj.", "visual.proj")
TEXT_PROJECTIONS = ("text.proj.", "text_projection")
#: the text side of an open_clip CLIP (its own transformer) or of a CustomTextCLIP (``text``)
TEXT_PARTS = (
    "text.",
    "transformer.",
    "token_embedding.",
    "positional_embedding",
    "ln_final.",
    "text_projection",
)
LOCKED = {"none": (), "image": ("image",), "text": ("text",), "both": ("image", "text")}


def tower_of(name: str) -> str | None:
    """``image``, ``text`` or None (the logit scale and bias) for a CLIP parameter name."""
    if name.startswith("visual."):
        return "image"
    return "text" if name.startswith(TEXT_PARTS) else None


def is_projection(name: str) -> bool:
    return name.startswith(IMAGE_PROJECTIONS + TEXT_PROJECTIONS)


def lock_towers(clip: nn.Module, lock: str) -> list[nn.Module]:
    """Freeze the towers ``lock`` names (``none``, ``image``, ``text``, ``both``), their projections
    excepted; returns the locked towers' modules, which the caller keeps in eval mode."""
    towers = LOCKED[lock]
    for name, p in clip.named_parameters():
        if tower_of(name) in towers and not is_projection(name):
            p.requires_grad_(False)
    text = clip.text if hasattr(clip, "text") else clip.transformer
    return [m for side, m in (("image", clip.visual), ("text", text)) if side in towers]


def trunk_features(clip: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``[B, D]`` image features before the image projection."""
    v = clip.visual
    if hasattr(v, "trunk") and isinstance(getattr(getattr(v, "head", None), "proj", None), nn.Linear):
        return v.trunk(images)
    if isinstance(getattr(v, "proj", None), nn.Parameter):  # open_clip ViT: pooled @ proj
        proj, v.proj = v.proj, None
        try:
            return v(images)
        finally:
            v.proj = proj
    raise ModelError(
        f"pretrain.fit: ridge needs an image tower with a linear projection after its trunk (timm or "
        f"ViT); {type(v).__name__} has none: use pretrain.fit=contrastive"
    )


@torch.no_grad()
def set_image_projection(clip: nn.Module, a: torch.Tensor) -> None:
    """Make the image projection the map ``x -> a x`` (``a`` ``[E, D]``)."""
    v = clip.visual
    if hasattr(v, "trunk"):
        proj = v.head.proj
        if proj.bias is not None:
            proj.bias.zero_()
        proj.weight.copy_(a.to(proj.weight.dtype))
    else:
        v.proj.copy_(a.t().to(v.proj.dtype))


@torch.no_grad()
def set_logit_scale(clip: nn.Module, scale: float) -> None:
    clip.logit_scale.fill_(math.log(scale))


@torch.no_grad()
def ridge_head(features, ds, w: torch.Tensor, lam: float, device, batch_size: int = 64):
    """``ridge_origin`` of ``features(images)`` ``[B, D]`` over the labelled ``ds`` (every image, in
    order) onto ``w[label]`` (``w`` ``[C, E]``): returns ``A`` ``[E, D]`` (float64), the features and
    the labels."""
    feats, labels = [], []
    for images, y, _ in DataLoader(ds, batch_size=batch_size, shuffle=False):
        feats.append(features(images.to(device)).float())
        labels.append(y.to(device))
    x, y = torch.cat(feats), torch.cat(labels)
    return ridge_origin(x, w[y].float(), lam), x, y


@torch.no_grad()
def fit_ridge(clip: nn.Module, tokenizer, ds, lam: float, device, batch_size: int = 64) -> dict[str, Any]:
    """The closed-form fit of the module docstring on the labelled ``ds``: sets the image
    projection and returns the number of images and their accuracy after the fit (of the images
    it fitted: not an estimate of anything else)."""
    clip.eval()
    w = clip_class_weights(clip, tokenizer, ds.classnames, ds.templates, device)  # [C, E]
    a, x, y = ridge_head(lambda im: trunk_features(clip, im), ds, w, lam, device, batch_size)
    set_image_projection(clip, a)
    fitted = (x.double() @ a.t()).float() @ w.t()
    return {"images": len(x), "fit_acc": 100.0 * float((fitted.argmax(-1) == y).float().mean())}

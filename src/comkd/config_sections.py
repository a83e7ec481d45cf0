"""The config's sections of the data, the two models and a stage's optimiser and augmentation
(``comkd.config`` holds the stage sections, ``RunConfig`` and the loading; it re-exports these).
A field a command may set carries its flag (``config_io.flag``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from .choices import Attend, BatchPer, EduMode, EduScale, LrScaling, Projector, ProjectorBN, Scope
from .config_io import ConfigError, at_least, flag, positive_finite

_WEIGHTS = (
    "{} weights: an open_clip tag, a local file, or none (random); an hf-hub:ORG/NAME model names its own"
)


@dataclass
class DataConfig:
    dataset: str = flag(
        "digits", help="Dataset name: a CoOp dataset, imagefolder, csv, unlabelled, wds or digits"
    )
    root: str | None = flag(
        None, help="Dataset root: a CoOp dataset folder, an image folder, a CSV file or WebDataset shards"
    )
    split_file: str | None = flag(None, help="CoOp split_zhou_*.json file (default: the dataset's own)")
    subdir: str | None = None
    num_shots: int = flag(16, help="Labelled images per class for the teacher's prompts")
    image_size: int | None = None  # default: the student's input size
    num_workers: int = 0
    # keep the training loader's workers across epochs (map-style data; each item carries its epoch,
    # so the views are the ones fresh workers would draw): no re-fork of num_workers every epoch
    persistent_workers: bool = False
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

    def validate(self, prefix: str) -> None:
        if self.num_shots <= 0:
            raise ConfigError(f"{prefix}num_shots: must be > 0, got {self.num_shots}")
        at_least(self.shuffle_buffer, 0, f"{prefix}shuffle_buffer", " (0: no shuffling)")


@dataclass
class TeacherConfig:
    model: str = flag(
        "ViT-L-14", name="teacher", help="Teacher open_clip model (e.g. ViT-L-14, comkd-tiny-teacher)"
    )
    pretrained: str | None = flag(None, name="teacher-pretrained", help=_WEIGHTS.format("Teacher"), none=True)
    prompts: str | None = flag(None, name="teacher-prompts", help="Teacher prompts file from train-teacher")
    text_ctx: int = 4
    text_depth: int | None = None  # None: min(9, layers)
    ctx_init: str | None = "a photo of a"
    vision_tokens: int = 4
    vision_depth: int | None = None
    quick_gelu: bool = False


@dataclass
class StudentConfig:
    model: str = flag(
        "ViT-B-16",
        name="student",
        help="Student open_clip model (e.g. ViT-B-16, comkd-tiny-student) or timm:NAME",
    )
    pretrained: str | None = flag(None, name="student-pretrained", help=_WEIGHTS.format("Student"), none=True)
    vision_tokens: int = 4
    vision_depth: int | None = None
    edu_heads: int = 1
    edu_attn_dim: int | None = None
    edu_shared_fc: bool = False
    attend: Attend = "all"
    logit_scale: float | None = None  # None: the student CLIP's own (PromptKD)
    quick_gelu: bool = False
    # docs/method.md, "Extensions"; the first value of each is the paper's reading
    edu_mode: EduMode = "paper"
    edu_scale: EduScale = "sqrt_c"  # paper mode: Q·Kᵀ / √C, or / C
    renorm_fused: bool = True  # logits from norm(f_e); False: f_e as the gate left it
    projector: Projector = "mlp"
    projector_bn: ProjectorBN = "train"
    scope: Scope = "prompts"  # full: the tower's weights learn too


@dataclass
class OptimConfig:
    """Optimiser and schedule of one stage. ``sgd``: cosine per epoch after a constant warm-up
    (PromptKD); ``adamw``: per-step one-cycle cosine with linear warm-up (stage 0)."""

    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = flag(0.005, help="This stage's learning rate")
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = flag(20, help="This stage's epochs")
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    warmup_frac: float = 0.1  # adamw only
    # batch_per rank: the global batch is batch_size x processes, what a GPU user of timm or open_clip expects
    batch_size: int = flag(
        8,
        help="This stage's batch size: images a step over all processes; per process with "
        "<stage>.optim.batch_per=rank (lr rule: <stage>.optim.lr_scaling)",
    )
    batch_per: BatchPer = "global"
    grad_accum: int = 1
    # the lr rule when the global batch differs from lr_base_batch (0: batch_size x grad_accum, the
    # batch lr was set for): none keeps lr; linear multiplies every lr of the stage by global/base,
    # sqrt by its square root (timm's --lr-base-scale); opt-in, so the evidence reruns identically
    lr_scaling: LrScaling = "none"
    lr_base_batch: int = 0
    amp: Literal["auto", "on", "off"] = "auto"
    grad_clip: float | None = None
    # speed switches for a GPU, each opt-in (comkd.engine.speed): torch.compile of the trainable and
    # frozen modules; frozen modules held in the autocast dtype during the stage; TF32 on CUDA
    compile: bool = False
    hold_frozen_dtype: bool = False
    tf32: bool = False

    def validate(self, prefix: str) -> None:
        for name in ("lr", "epochs", "batch_size", "grad_accum"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{prefix}{name}: must be > 0, got {getattr(self, name)}")
        at_least(self.lr_base_batch, 0, f"{prefix}lr_base_batch", " (0: batch_size x grad_accum)")
        positive_finite(self.lr, f"{prefix}lr")
        positive_finite(self.warmup_lr, f"{prefix}warmup_lr")
        positive_finite(self.weight_decay, f"{prefix}weight_decay", allow_zero=True)
        positive_finite(self.momentum, f"{prefix}momentum", allow_zero=True)
        positive_finite(self.grad_clip, f"{prefix}grad_clip")  # None: no clipping; 0 would clip to nothing
        # each optimiser's own warm-up: epochs for sgd (cut to epochs - 1, so a short schedule still
        # runs one cosine epoch), a fraction of the steps for adamw
        if self.optimizer == "sgd":
            at_least(self.warmup_epochs, 0, f"{prefix}warmup_epochs", " for sgd")
        if self.optimizer == "adamw" and not (math.isfinite(self.warmup_frac) and 0 <= self.warmup_frac < 1):
            raise ConfigError(f"{prefix}warmup_frac: must be in [0, 1) for adamw, got {self.warmup_frac}")

    @property
    def sgd_warmup_epochs(self) -> int:
        """The sgd warm-up in effect: ``warmup_epochs``, at most ``epochs - 1``."""
        return max(0, min(self.warmup_epochs, self.epochs - 1))


@dataclass
class AugmentConfig:
    """Train augmentation: RandomResizedCrop(scale=(crop_scale_min, 1)) + horizontal flip."""

    crop_scale_min: float = 0.08
    hflip: float = 0.5

    def validate(self, prefix: str) -> None:
        if not (0 < self.crop_scale_min <= 1 and 0 <= self.hflip <= 1):
            raise ConfigError(f"{prefix}crop_scale_min must be in (0, 1] and hflip in [0, 1]")

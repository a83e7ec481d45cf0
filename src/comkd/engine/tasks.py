"""The ``Task`` protocol, the three training stages as ``Task``s, and ``predict``/``accuracy``."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import IFALIGN_ON, ComKDLoss, ifalign_pair
from ..models import PreprocessSpec, Student, Teacher
from .utils import amp_context, gather_batch, gather_loader_rows


@runtime_checkable
class Task(Protocol):
    """A training stage as ``engine.loop.fit`` drives it: every hook the loop calls.

    ``modules``, ``parameter_groups`` and ``step`` are what a stage must write; ``TaskBase``
    gives the rest a default (no DDP modules to swap in, no extra state, no extra metrics).
    """

    name: str  # the stage's name in checkpoints and metrics

    def modules(self) -> dict[str, nn.Module]:
        """Modules whose trainable state is checkpointed (and wrapped by DDP when distributed)."""

    def parameter_groups(self) -> list[dict]:
        """Optimiser parameter groups (``{"params": [...], "lr": ..., "lr_scale": ...}``; lr optional)."""

    def step(self, batch: Any, epoch: int) -> dict[str, torch.Tensor]:
        """Named losses of one batch; ``loss`` is back-propagated."""

    def wrap(self, wrapped: dict[str, nn.Module]) -> None:
        """Receive the DDP-wrapped ``modules()`` (same keys) to use in ``step`` (distributed runs)."""

    def state_dict(self) -> dict | None:
        """State of the task itself (RNG draws, ...) to checkpoint; None: nothing to keep."""

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned, on ``--resume``."""

    def extra_metrics(self) -> dict[str, float]:
        """Numbers logged with every step and epoch record (e.g. the gate α)."""


class TaskBase:
    """Defaults for the optional ``Task`` hooks; DDP-wrapped modules replace the plain ones in
    ``step`` through ``_m``."""

    name = "task"

    def __init__(self) -> None:
        self._wrapped: dict[str, nn.Module] = {}

    def wrap(self, wrapped: dict[str, nn.Module]) -> None:
        self._wrapped = wrapped

    def _m(self, key: str, module: nn.Module) -> nn.Module:
        return self._wrapped.get(key, module)

    def state_dict(self) -> dict | None:
        return None  # the loop checkpoints None as "no task state" and skips load_state_dict

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore by default."""

    def extra_metrics(self) -> dict[str, float]:
        return {}


def adapt_images(images: torch.Tensor, src: PreprocessSpec, dst: PreprocessSpec) -> torch.Tensor:
    """Re-express a batch normalised for ``src`` (size, mean/std) as ``dst`` expects it, so the
    teacher sees the same augmented view as the student even when their preprocessing differs."""
    if src.mean != dst.mean or src.std != dst.std:
        m_s, s_s, m_d, s_d = (
            images.new_tensor(v).view(1, 3, 1, 1) for v in (src.mean, src.std, dst.mean, dst.std)
        )
        images = (images * s_s + m_s - m_d) / s_d
    if images.shape[-1] != dst.image_size or images.shape[-2] != dst.image_size:
        images = F.interpolate(
            images, size=(dst.image_size, dst.image_size), mode="bicubic", align_corners=False
        )
    return images


# -- stage 0 -----------------------------------------------------------------------------------
class PretrainTask(TaskBase):
    """Contrastive CLIP training with class-name captions: cross-entropy of each image's
    similarities to the captions of all classes (one random template per class and step)."""

    name = "pretrain"

    def __init__(
        self,
        clip: nn.Module,
        tokenizer,
        classnames: list[str],
        templates: list[str],
        lr: float | None = None,
        frozen: list[nn.Module] | tuple = (),
    ):
        super().__init__()
        self.clip, self.lr, self.frozen = clip, lr, list(frozen)  # frozen: locked towers, kept in eval mode
        # [T, N, L]: every template's caption of every class
        self.tokens = torch.stack([tokenizer([t.format(c) for c in classnames]) for t in templates])
        self.gen = torch.Generator().manual_seed(0)

    def modules(self) -> dict[str, nn.Module]:
        return {"clip": self.clip}

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state()}  # the template draws, so a resumed run is exact

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])

    def parameter_groups(self) -> list[dict]:
        g = {"params": [p for p in self.clip.parameters() if p.requires_grad]}
        if self.lr is not None:
            g["lr"] = self.lr
        return [g]

    def step(self, batch, epoch: int) -> dict[str, torch.Tensor]:
        images, labels, _ = batch
        clip = self._m("clip", self.clip)
        for m in self.frozen:
            m.eval()
        t = torch.randint(len(self.tokens), (self.tokens.shape[1],), generator=self.gen)
        tokens = self.tokens[t, torch.arange(self.tokens.shape[1])].to(images.device)
        img, txt, scale = clip(images, tokens)[:3]
        logits = scale * img @ txt.t()
        loss = F.cross_entropy(logits, labels)
        acc = (logits.argmax(-1) == labels).float().mean()
        return {"loss": loss, "acc": acc}


# -- stage 1 -----------------------------------------------------------------------------------
def gaussian_epoch_weights(epochs: int, mean: float | None = None, std: float = 1.0) -> list[float]:
    """PromptSRC's Gaussian prompt-aggregation weights for epochs 1..``epochs``: the normal density
    at each epoch number (``mean`` default 0.75 x epochs), normalised to sum to 1."""
    mean = 0.75 * epochs if mean is None else float(mean)
    dens = [math.exp(-0.5 * ((e - mean) / std) ** 2) for e in range(1, epochs + 1)]
    total = sum(dens)
    if not total > 0:
        raise ValueError(
            f"gaussian prompt averaging: no weight on epochs 1..{epochs} (mean {mean}, std {std})"
        )
    return [d / total for d in dens]


class TeacherPromptTask(TaskBase):
    """PromptSRC prompt learning: CE on labelled shots plus the self-regularisers (L1 to frozen
    text features averaged over templates, L1 to frozen image features, KL to frozen zero-shot
    logits)."""

    name = "train_teacher"

    def __init__(
        self,
        teacher: Teacher,
        classnames: list[str],
        templates: list[str],
        text_l1_weight: float = 25.0,
        image_l1_weight: float = 10.0,
        kl_weight: float = 1.0,
        epoch_weights: list[float] | None = None,
    ):
        super().__init__()
        self.teacher, self.classnames = teacher, list(classnames)
        self.w_text, self.w_img, self.w_kl = text_l1_weight, image_l1_weight, kl_weight
        self.frozen_text = teacher.encode_templates(self.classnames, templates)  # [N, d]
        for p in teacher.prompt_parameters():
            p.requires_grad_(True)
        # Gaussian prompt aggregation: the running sum of w_e x prompts after epoch e (checkpointed
        # with the task, so a resumed run averages the same epochs)
        self.epoch_weights = epoch_weights
        self.averaged: dict[str, torch.Tensor] | None = None

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        """Add this epoch's prompts to the weighted average (``epoch`` counts from 0)."""
        if self.epoch_weights is None:
            return {}
        w = self.epoch_weights[epoch]
        now = {k: v.detach().float().cpu() for k, v in self.teacher.prompt_state_dict().items()}
        if self.averaged is None:
            self.averaged = {k: torch.zeros_like(v) for k, v in now.items()}
        for k, v in now.items():
            self.averaged[k] += w * v
        return {"gpa_weight": w}

    def averaged_prompts(self) -> dict[str, torch.Tensor] | None:
        """The aggregated prompts, cast to the prompts' own dtype (None without averaging)."""
        if self.averaged is None:
            return None
        own = self.teacher.prompt_state_dict()
        return {k: v.to(own[k].dtype) for k, v in self.averaged.items()}

    def state_dict(self) -> dict | None:
        return None if self.averaged is None else {"averaged": self.averaged}

    def load_state_dict(self, state: dict) -> None:
        self.averaged = {k: v.float().cpu() for k, v in state["averaged"].items()}

    def modules(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher}

    def parameter_groups(self) -> list[dict]:
        return [{"params": self.teacher.prompt_parameters()}]

    def step(self, batch, epoch: int) -> dict[str, torch.Tensor]:
        images, labels, _ = batch
        t = self.teacher
        scale = t.logit_scale
        text = t.encode_text(self.classnames, prompted=True)
        img = t.encode_image(images, prompted=True)
        logits = scale * img @ text.t()
        ce = F.cross_entropy(logits, labels)
        with torch.no_grad():
            frozen_img = t.encode_image(images, prompted=False)
            zs_log_p = F.log_softmax(scale * frozen_img @ self.frozen_text.t(), dim=-1)  # zero-shot
        l_text = F.l1_loss(text, self.frozen_text.to(text.dtype)) * self.w_text
        l_img = F.l1_loss(img, frozen_img) * self.w_img
        log_p = F.log_softmax(logits, dim=-1)
        kl = F.kl_div(log_p, zs_log_p, reduction="sum", log_target=True) / logits.numel()
        loss = ce + l_text + l_img + self.w_kl * kl
        acc = (logits.argmax(-1) == labels).float().mean()
        return {"loss": loss, "ce": ce, "text_l1": l_text, "image_l1": l_img, "kl": kl, "acc": acc}


# -- stage 2 -----------------------------------------------------------------------------------
class TeacherOutputs:
    """Teacher image features u_t for a batch, online (running the frozen teacher)."""

    def __init__(self, teacher: Teacher, student_spec: PreprocessSpec):
        self.teacher, self.spec = teacher, student_spec

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, indices: torch.Tensor, epoch: int) -> torch.Tensor:
        return self.teacher.encode_image(adapt_images(images, self.spec, self.teacher.preprocess))


@dataclass
class TeacherSide:
    """One teacher as stage 2 reads it (``Method.make_task`` receives a list of them).

    Attributes:
        outputs: ``outputs(images, indices, epoch)`` -> u_t ``[B, d_t]``, the teacher's unit-norm
            image features of a batch (online, or read from a teacher cache).
        w: ``[N, d_t]`` its prompted class text features, in the dataset's class order.
        logit_scale: its s_t (teacher logits are ``s_t · u_t Wᵀ``).
        identity: what the student file records of it (model, digests, sources).
    """

    outputs: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
    w: torch.Tensor
    logit_scale: float
    identity: dict[str, Any]

    def logits(self, images: torch.Tensor, indices: torch.Tensor, epoch: int) -> torch.Tensor:
        """``s_t · u_t Wᵀ`` ``[B, N]`` in float32 on the images' device."""
        u_t = self.outputs(images, indices, epoch).to(images.device)
        return self.logit_scale * u_t.float() @ self.w.to(images.device).float().t()


class DistillTask(TaskBase):
    """Stage 2: the student learns from the teacher's image features and logits on unlabelled
    images (labels in the batch are never read)."""

    name = "distill"

    def __init__(
        self,
        student: Student,
        teacher_outputs,
        text_features: torch.Tensor,
        teacher_logit_scale: float,
        loss: ComKDLoss,
        edu_lr_scale: float = 1.0,
        ifalign_on: str = "features",
        tower_lr_scale: float = 1.0,
    ):
        super().__init__()
        self.student, self.teacher_outputs, self.loss = student, teacher_outputs, loss
        self.edu_lr_scale, self.tower_lr_scale = edu_lr_scale, tower_lr_scale
        if ifalign_on not in IFALIGN_ON:  # checked here too: a task may be built without a config
            raise ValueError(f"ifalign_on must be one of {', '.join(IFALIGN_ON)}, got {ifalign_on!r}")
        self.ifalign_on = ifalign_on
        self.w = text_features
        self.s_t = float(teacher_logit_scale)
        self.sides: list[TeacherSide] = []  # every teacher's, when built by from_sides

    @classmethod
    def from_sides(cls, student: Student, sides: list[TeacherSide], loss: ComKDLoss, **recipe: Any):
        """The task of a method from its inputs (``Method.make_task``'s signature): the first
        teacher side's u_t, W and s_t; the sides are kept as ``self.sides`` for subclasses."""
        first = sides[0]
        task = cls(student, first.outputs, first.w, first.logit_scale, loss, **recipe)
        task.sides = list(sides)
        return task

    def modules(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def frozen_modules(self) -> dict[str, nn.Module]:
        """The online teachers' image towers (what ``optim.compile`` and ``hold_frozen_dtype`` act
        on besides the student); none when u_t is read from a cache."""
        outs = [s.outputs for s in self.sides] or [self.teacher_outputs]
        return {f"teacher{i}": o.teacher.visual for i, o in enumerate(outs) if isinstance(o, TeacherOutputs)}

    def parameter_groups(self) -> list[dict]:
        """The main group (prompts, projector), then EduAttention at ``edu_lr_scale`` and the tower
        (``scope: full``) at ``tower_lr_scale`` where those scales are not 1."""
        edu = self.student.edu_attention
        scaled = []
        if edu is not None and self.edu_lr_scale != 1.0:
            scaled.append((list(edu.parameters()), self.edu_lr_scale))
        tower = self.student.tower_parameters()
        if tower and self.tower_lr_scale != 1.0:
            scaled.append((tower, self.tower_lr_scale))
        taken = {id(p) for ps, _ in scaled for p in ps}
        rest = [p for p in self.student.trainable_parameters() if id(p) not in taken]
        return [{"params": rest}, *({"params": ps, "lr_scale": sc} for ps, sc in scaled)]

    def teacher_logits(
        self, images: torch.Tensor, indices: torch.Tensor, epoch: int, u_t: torch.Tensor
    ) -> torch.Tensor:
        """The KD target's logits ``[B, N]`` (float32): ``s_t · u_t Wᵀ`` of the first teacher. A
        method with several teachers overrides this (``self.sides`` holds them all)."""
        return self.s_t * u_t.float() @ self.w.to(device=images.device).float().t()

    def step(self, batch, epoch: int) -> dict[str, torch.Tensor]:
        images, _, indices = batch  # labels withheld by design
        u_t = self.teacher_outputs(images, indices, epoch).to(images.device)
        q_t = self.teacher_logits(images, indices, epoch, u_t)
        out = self._m("student", self.student)(images)
        # IFAlign's batch statistics are those of the global batch: under DDP every rank gathers
        # all ranks' features (differentiably); a single process uses its batch as it is
        align, targets = ifalign_pair(
            gather_batch(out.features, grad=True) if self.ifalign_on == "features" else None,
            gather_batch(out.projected, grad=True) if self.ifalign_on != "features" else None,
            gather_batch(u_t.detach()),
            self.ifalign_on,
        )
        return self.loss(out.logits, q_t, out.features, u_t, align_features=align, align_targets=targets)

    def extra_metrics(self) -> dict[str, float]:
        edu = self.student.edu_attention
        return {"alpha": float(edu.alpha.detach())} if edu is not None else {}


# -- evaluation --------------------------------------------------------------------------------
@torch.no_grad()
def predict(fn, loader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``fn(images) -> logits`` over a loader (under autocast on a GPU); returns (predictions,
    labels) on the CPU, of every item in order. Under torchrun a loader of a ``RankShare``
    (``builders.eval_loader``'s) runs this rank's share and the ranks exchange their predictions."""
    autocast, _ = amp_context(device, "auto")
    preds, labels = [], []
    for images, y, _ in loader:
        with autocast:
            logits = fn(images.to(device, non_blocking=True))
        preds.append(logits.argmax(-1).cpu())
        labels.append(torch.as_tensor(y))
    return gather_loader_rows(torch.cat(preds), loader), gather_loader_rows(torch.cat(labels), loader)


def accuracy(preds: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * float((preds == labels).float().mean()) if len(labels) else float("nan")

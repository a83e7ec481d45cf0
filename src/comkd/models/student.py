"""The student: a small frozen image tower with deep visual prompts, a projector to the teacher's
embedding size, EduAttention over the teacher's stored class text features W, and the gate α.

It never runs a text encoder: W (``[N, d]``) is stored in the student (a buffer, saved with its
weights) and reused at training and at inference.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import nn

from ..choices import Attend, EduScale, Projector, ProjectorBN, Scope, check
from .backbones import LoadedModel, ModelError, arch_from_options, load_arch, uses_quick_gelu
from .edu_attention import EduAttention
from .identity import check_teacher, teacher_identity
from .projector import build_projector
from .prompts import PromptedVisionTower


def _exporting() -> bool:
    """Tracing, scripting or ONNX export: the graph must not hold a loop over one example's batch."""
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()


def check_finite_images(images: torch.Tensor) -> None:
    """A ``ModelError`` naming the first image of a batch with NaN or inf values: a model maps it
    to NaN scores (``comkd predict`` refuses such scores the same way)."""
    bad = ~torch.isfinite(images.reshape(images.shape[0], -1)).all(dim=1)
    if bool(bad.any()):
        raise ModelError(
            f"input image {int(bad.nonzero()[0])} of the batch holds NaN or inf values "
            f"({int(bad.sum())} of {images.shape[0]} images); images must be finite"
        )


@dataclass
class StudentOutput:
    """Outputs of one student forward pass.

    Attributes:
        features: u_s = norm(P(f_img(x))), ``[B, d]``.
        projected: P(f_img(x)) before the normalisation, ``[B, d]``.
        fused: f_e = u_s + α·FC_o(f_att), ``[B, d]`` (equal to u_s without EduAttention).
        logits: q_s = s · norm(f_e) · Wᵀ, ``[B, N]`` or ``[B, |subset|]``.
    """

    features: torch.Tensor
    fused: torch.Tensor
    logits: torch.Tensor
    projected: torch.Tensor | None = None


@dataclass
class StudentArch:
    """What a student is: every option that shapes its modules, in one object (as open_clip's
    ``vision_cfg``). A student file stores it with ``dataclasses.asdict`` and rebuilds from it.

    ``model`` is any open_clip model (its image tower) or ``timm:<name>``; ``teacher_dim`` the
    teacher's joint embedding size d. ``vision_depth`` None: min(9, layers) for a ViT (0 without
    tokens). ``edu_attention``: whether EduAttention (and α) is part of the student. ``projector``:
    ``mlp`` (the paper's) or ``linear``. ``projector_bn``: ``train`` (the paper's: batch statistics
    in training) or ``frozen`` (running statistics always, needed after a warm start). ``edu_mode``:
    EduAttention's ``paper`` or ``cosine`` reading. ``scope``: ``prompts`` (the paper: the tower is
    frozen) or ``full`` (the tower trains too, at ``distill.tower_lr_scale``). ``image_size`` None:
    the model's own; ``quick_gelu`` None/False: as the model name says.

    A CNN tower (an open_clip ResNet, or ``timm:<name>``) takes no visual prompts (deep prompts are
    tokens of a ViT), and its batch-norm statistics stay frozen whatever the scope (the tower runs
    in eval mode).
    """

    model: str
    teacher_dim: int
    vision_tokens: int = 4
    vision_depth: int | None = None
    edu_attention: bool = True
    edu_heads: int = 1
    edu_attn_dim: int | None = None
    edu_shared_fc: bool = False
    attend: str = "all"
    edu_mode: str = "paper"
    edu_scale: str = "sqrt_c"
    renorm_fused: bool = True
    projector: str = "mlp"
    projector_bn: str = "train"
    scope: str = "prompts"
    image_size: int | None = None
    quick_gelu: bool | None = None


class Student(nn.Module):
    """Frozen image tower + deep visual prompts + projector + EduAttention (+ α), built from a
    ``StudentArch``. ``arch`` holds the options as built (prompt depth, input size and QuickGELU
    resolved), which is what a student file records.
    """

    frozen_prefixes = ("visual.",)  # the frozen tower; its prompts are trainable and kept

    def __init__(self, loaded: LoadedModel, arch: StudentArch, *, logit_scale: float | None = None):
        super().__init__()
        for value, choice, what in (
            (arch.attend, Attend, "attend"),
            (arch.projector, Projector, "projector"),
            (arch.projector_bn, ProjectorBN, "projector_bn"),
            (arch.edu_scale, EduScale, "edu_scale"),
            (arch.scope, Scope, "scope"),
        ):
            check(value, choice, what, ModelError)
        self.model_name = loaded.name
        self.preprocess = loaded.preprocess
        teacher_dim, vision_tokens, vision_depth = arch.teacher_dim, arch.vision_tokens, arch.vision_depth
        tower = loaded.model if loaded.is_timm else loaded.model.visual
        tower.requires_grad_(arch.scope == "full")  # frozen, unless the tower trains too
        if isinstance(tower, VisionTransformer):
            layers = len(tower.transformer.resblocks)
            depth = (min(9, layers) if vision_tokens else 0) if vision_depth is None else vision_depth
            self.visual = PromptedVisionTower(tower, vision_tokens, depth)
        else:
            if vision_tokens and vision_depth:
                raise ModelError(
                    f"student.vision_depth={vision_depth}: student '{loaded.name}' is a CNN "
                    f"({type(tower).__name__}), deep visual prompts need a ViT; set it to 0 or leave it unset"
                )
            self.visual = tower
        out_dim = int(getattr(tower, "output_dim", 0) or getattr(tower, "num_features", 0))
        if not out_dim:
            raise ModelError(f"cannot tell the output size of student tower {type(tower).__name__}")
        self.projector = build_projector(arch.projector, out_dim, teacher_dim)
        if logit_scale is None:
            if loaded.is_timm:
                raise ModelError(
                    "a timm student has no CLIP logit scale: set student.logit_scale (e.g. the teacher's)"
                )
            logit_scale = float(loaded.model.logit_scale.detach().exp().reshape(()))
        self.edu_attention = (
            EduAttention(
                teacher_dim,
                arch.edu_attn_dim,
                arch.edu_heads,
                arch.edu_shared_fc,
                mode=arch.edu_mode,
                init_temperature=float(logit_scale),
                scale=arch.edu_scale,
            )
            if arch.edu_attention
            else None
        )
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))
        self.register_buffer("text_features", torch.zeros(0, teacher_dim))
        self.classnames: list[str] = []
        self.teacher_identity: dict | None = None  # the teacher that produced W, when known
        # every teacher it was distilled from, in order (W's first), when there were several
        self.teacher_identities: list[dict] | None = None
        self.arch = replace(
            arch,
            vision_tokens=int(getattr(self.visual, "n_tokens", 0)),
            vision_depth=int(getattr(self.visual, "depth", 0)),
            image_size=int(self.preprocess.image_size),
            quick_gelu=uses_quick_gelu(self.visual),
        )

    @classmethod
    def build(
        cls,
        arch: StudentArch,
        pretrained: str | None = None,
        *,
        logit_scale: float | None = None,
        device: str | torch.device = "cpu",
    ) -> Student:
        """Load ``arch.model``'s tower (``pretrained``: open_clip tag, weight file, ``none`` or None)
        and build the student on ``device``. ``logit_scale``: as for ``create_student``."""
        if arch.model.startswith("real:"):  # before its text tower is loaded for nothing
            raise ModelError(
                f"student.model {arch.model!r}: a student is an image tower alone; give it as "
                "'timm:<tower>' (student.pretrained: imagenet reads the same packaged weights)"
            )
        return cls(load_arch(arch, pretrained, device), arch, logit_scale=logit_scale).to(device)

    # -- options (views of ``arch``) --------------------------------------------------------
    @property
    def teacher_dim(self) -> int:
        return self.arch.teacher_dim

    @property
    def attend(self) -> str:
        """``all`` classes of W or the evaluated ``subset`` are what EduAttention sees."""
        return self.arch.attend

    @attend.setter
    def attend(self, value: str) -> None:
        check(value, Attend, "attend", ModelError)
        self.arch = replace(self.arch, attend=value)

    @property
    def scope(self) -> str:
        return self.arch.scope

    @property
    def projector_bn(self) -> str:
        return self.arch.projector_bn

    # -- class text features W --------------------------------------------------------------
    def set_text_features(self, text_features: torch.Tensor, classnames: list[str] | None = None) -> None:
        """Store the teacher's W (``[N, d]``); it is part of the student's state from then on."""
        if text_features.ndim != 2 or text_features.shape[1] != self.teacher_dim:
            raise ModelError(
                f"text features must be [N, {self.teacher_dim}] (the teacher's size), got {list(text_features.shape)}"
            )
        if classnames is not None and len(classnames) != text_features.shape[0]:
            raise ModelError(f"{len(classnames)} class names for {text_features.shape[0]} text features")
        self.text_features = text_features.detach().clone().to(self.logit_scale.device)
        self.classnames = list(classnames) if classnames is not None else []

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # W is saved with the student; size the buffer to the saved W before loading it.
        w = state_dict.get(prefix + "text_features")
        if w is not None and w.ndim == 2 and w.shape[1] == self.teacher_dim:
            self.text_features = torch.empty_like(w, device=self.logit_scale.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    # -- forward -----------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """u_s = norm(P(f_img(x))): ``[B, 3, H, W]`` → ``[B, d]``."""
        return F.normalize(self.projector(self.visual(images)), dim=-1)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """The image embedding the classifier uses, as open_clip's ``encode_image``: f_e (u_s after
        EduAttention), ``[B, 3, H, W]`` → ``[B, d]`` in the teacher's space, unit-norm with
        ``normalize``; ``logit_scale * encode_image(x) @ W.T`` equals ``forward(x).logits``."""
        out = self.forward(images)
        return F.normalize(out.fused, dim=-1) if normalize else out.fused

    def set_classes(self, names: list[str], teacher, *, force: bool = False) -> None:
        """New class names, zero-shot: W = the teacher's prompted text features of ``names`` (what
        ``comkd classes`` does). ``teacher`` must be the one recorded in the student (model,
        weights and prompts digests; else ``ModelError`` naming the digest) unless ``force``."""
        current = teacher_identity(teacher)
        if not force:
            check_teacher(self.teacher_identity, current, Path("the student"))
        self.set_text_features(teacher.class_text_features(list(names)), list(names))
        self.teacher_identity = {**(self.teacher_identity or {}), **current}

    def tower_parameters(self) -> list[nn.Parameter]:
        """Trainable weights of the image tower itself (empty unless ``scope='full'``); prompts excluded."""
        prompts = getattr(self.visual, "prompts", None)
        return [p for p in self.visual.parameters() if p.requires_grad and p is not prompts]

    #: CPU inference (eval mode, no autograd) runs a batch in chunks of at most this many input
    #: pixels (8 images at 224 px): past that a ViT's activations leave the CPU's caches and its
    #: memory-bound ops slow down per image (ViT-B/16, one thread: `comkd bench --only eager`,
    #: docs/performance.md). Each image's outputs are the same. 0: never chunk (see ``_chunk``).
    infer_chunk_pixels: int = 8 * 224 * 224

    def forward(
        self, images: torch.Tensor, class_subset: torch.Tensor | list[int] | None = None
    ) -> StudentOutput:
        """Student features, fused features and logits against the stored W.

        ``class_subset``: indices into W; logits are sliced to those classes (base-to-novel
        evaluation). With ``attend='subset'`` EduAttention also only sees those classes. In eval
        mode, images with NaN or inf values are refused (a ``ModelError`` naming the first).
        """
        if not self.training and not _exporting():  # training: one attribute check
            check_finite_images(images)
        n = self._chunk(images) if not self.training else 0
        if n:
            parts = [self._forward(images[i : i + n], class_subset) for i in range(0, images.shape[0], n)]
            return StudentOutput(
                *(torch.cat([getattr(q, f.name) for q in parts]) for f in fields(StudentOutput))
            )
        return self._forward(images, class_subset)

    def _chunk(self, images: torch.Tensor) -> int:
        """Images per chunk for this inference batch; 0: run it whole (small batch, GPU, autograd on,
        tracing or export)."""
        if images.device.type != "cpu" or torch.is_grad_enabled() or _exporting():
            return 0
        n = max(1, self.infer_chunk_pixels // max(1, images.shape[-1] * images.shape[-2]))
        return n if self.infer_chunk_pixels and images.shape[0] > n else 0

    def _forward(self, images: torch.Tensor, class_subset) -> StudentOutput:
        w = self.text_features
        if w.shape[0] == 0:
            raise ModelError("the student has no class text features; call set_text_features(W) first")
        if class_subset is not None:
            class_subset = torch.as_tensor(class_subset, device=w.device, dtype=torch.long)
        projected = self.projector(self.visual(images))
        u_s = F.normalize(projected, dim=-1)
        if self.edu_attention is not None:
            w_att = w[class_subset] if (class_subset is not None and self.attend == "subset") else w
            f_e = self.edu_attention(u_s, w_att.to(u_s.dtype))
        else:
            f_e = u_s
        w_out = w if class_subset is None else w[class_subset]
        # renorm_fused: q = s·cos(f_e, W) (f_e made unit-norm again after the gate), else s·f_e·Wᵀ
        f_out = F.normalize(f_e, dim=-1) if self.arch.renorm_fused else f_e
        logits = self.logit_scale * f_out @ w_out.to(f_e.dtype).t()
        return StudentOutput(features=u_s, fused=f_e, logits=logits, projected=projected)

    def predict(self, images, top_k: int = 5, batch_size: int = 64) -> list:
        """``comkd.models.predict.predict_images`` of this student: top-k ``Prediction``s (best first)
        for PIL images or image files (one or a list), or a batch ``[B, 3, S, S]`` already preprocessed."""
        from .predict import predict_images

        return predict_images(self, images, top_k=top_k, batch_size=batch_size)

    def train(self, mode: bool = True) -> Student:
        super().train(mode)
        self.visual.eval()  # the tower is frozen (or fine-tuned gently): norms/dropout in inference mode
        if self.projector_bn == "frozen":
            for m in self.projector.modules():
                if isinstance(m, nn.BatchNorm1d):
                    m.eval()
        return self


def create_student(
    model_name: str = "ViT-B-16",
    pretrained: str | None = None,
    *,
    teacher_dim: int,
    logit_scale: float | None = None,
    device: str | torch.device = "cpu",
    **options: Any,
) -> Student:
    """Build a student for a teacher whose joint embedding size is ``teacher_dim``.

    ``model_name`` is any open_clip model (its image tower is used) or ``timm:<name>``;
    ``options`` are ``StudentArch`` fields (``vision_tokens``, ``edu_attention``, ``scope``, ...).
    ``logit_scale``: s; default the student CLIP's own exp(log-scale) (PromptKD's choice).
    """
    arch = arch_from_options(
        StudentArch, "create_student", options, model=model_name, teacher_dim=teacher_dim
    )
    return Student.build(arch, pretrained, logit_scale=logit_scale, device=device)

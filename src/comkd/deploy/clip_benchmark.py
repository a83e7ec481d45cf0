"""A comkd student as a model of CLIP_benchmark (the ``clip_benchmark`` package on PyPI), which
loads ``(model, transform, tokenizer)`` and calls ``model.encode_image`` and
``model.encode_text(tokenizer(texts))``. ``model_name`` is the student file, ``transform`` its
``preprocess``, ``encode_image`` its fused features f_e (so its logits rank classes as the
student's own do); the text side (``pretrained``):

* ``"stored"`` (default): each prompt maps to the stored class name it contains (the longest;
  case-insensitive) and its row of W; a class the student does not store is an error.
* ``"teacher:CONFIG.yaml"``: the student's own teacher (the ``teacher`` section of a run's config,
  checked against the student file's record) runs its prompted text tower on the prompts: with the
  template "a photo of a {c}." it gives W itself, and any class name works. EduAttention still
  attends over the stored W.

``register()`` adds the model type ``comkd`` (``load_clip("comkd", "student.safetensors", ...)``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models.backbones import ModelError

MODEL_TYPE = "comkd"


class StoredNamesTokenizer:
    """Prompts -> indices of the stored class names they contain, ``[len(texts)]`` (long)."""

    def __init__(self, classnames: list[str]) -> None:
        self.classnames = list(classnames)
        self._by_length = sorted(range(len(classnames)), key=lambda i: -len(classnames[i]))

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        out = []
        for t in texts:
            low = t.lower()
            hit = next((i for i in self._by_length if self.classnames[i].lower() in low), None)
            if hit is None:
                raise ModelError(
                    f"prompt {t!r} names none of the student's {len(self.classnames)} stored classes; "
                    "use pretrained='teacher:CONFIG.yaml' for other class names"
                )
            out.append(hit)
        return torch.tensor(out, dtype=torch.long)


class ComkdClip(nn.Module):
    """``encode_image``: the student (f_e, ``[B, d]``); ``encode_text``: the stored W (token ids are
    class indices) or the teacher's prompted text tower (token ids are the teacher's tokens)."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.student(images).fused

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.teacher is None:
            return self.student.text_features[tokens.to(self.student.text_features.device)]
        return F.normalize(self.teacher.text(tokens, prompted=True), dim=-1)


def load_comkd(
    model_name: str,
    pretrained: str | None = "stored",
    cache_dir: str | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, Any, Any]:
    """CLIP_benchmark's loader signature: ``(model, transform, tokenizer)`` for the student file
    ``model_name``; ``pretrained``: ``stored`` or ``teacher:CONFIG.yaml`` (see the module docstring)."""
    from ..engine.builders import build_teacher
    from ..engine.utils import seed_everything
    from ..models.identity import check_teacher, teacher_identity
    from ..models.io import load_student

    device = torch.device(device)
    student = load_student(model_name, device)
    spec = pretrained or "stored"
    if spec == "stored":
        model, tokenizer = ComkdClip(student), StoredNamesTokenizer(student.classnames)
    elif spec.startswith("teacher:"):
        from ..config import load_config

        cfg = load_config(spec[len("teacher:") :])
        if student.teacher_identity is not None and cfg.data.image_size is None:
            cfg.data.image_size = student.teacher_identity["image_size"]
        seed_everything(cfg.seed)
        teacher = build_teacher(cfg, device).eval()
        check_teacher(student.teacher_identity, teacher_identity(teacher), Path(model_name))
        model, tokenizer = ComkdClip(student, teacher), teacher.text.tokenize
    else:
        raise ModelError(f"pretrained must be 'stored' or 'teacher:CONFIG.yaml', got {pretrained!r}")
    return model.eval(), student.preprocess, tokenizer


def register() -> None:
    """Add the model type ``comkd`` (``load_comkd``) to CLIP_benchmark, before its CLI is imported."""
    try:
        import clip_benchmark.models as cbm
    except ImportError:
        raise ModelError("CLIP_benchmark is not installed: pip install clip-benchmark") from None
    cbm.TYPE2FUNC[MODEL_TYPE] = load_comkd
    if MODEL_TYPE not in cbm.MODEL_TYPES:
        cbm.MODEL_TYPES.append(MODEL_TYPE)
    _fix_accuracy()


def accuracy_numpy2(output: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...] = (1,)) -> list[float]:
    """CLIP_benchmark's ``zeroshot_classification.accuracy`` (the fraction of the ``[N]`` targets
    among each top-k of the ``[N, C]`` logits), with each count taken as a Python scalar."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    n = len(target)
    return [float(correct[:k].reshape(-1).float().sum().item()) / n for k in topk]


def _fix_accuracy() -> None:
    """Put ``accuracy_numpy2`` in CLIP_benchmark's zero-shot module when its own ``accuracy``
    raises the NumPy >= 2.4 error on a 2-image check: CLIP_benchmark 1.6.2 (the newest release)
    takes ``float()`` of a 1-element array, which NumPy >= 2.4 refuses ("only 0-dimensional arrays
    ..."), so its ``evaluate`` crashed after classifying every image. One that works is kept."""
    import clip_benchmark.metrics.zeroshot_classification as zs

    if zs.accuracy is accuracy_numpy2:
        return
    try:
        zs.accuracy(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]), topk=(1,))
    except TypeError as e:
        if "0-dimensional" not in str(e):
            raise
        zs.accuracy = accuracy_numpy2

"""A comkd student as a model of CLIP_benchmark (the ``clip_benchmark`` package on PyPI).

CLIP_benchmark loads a model as ``(model, transform, tokenizer)`` and needs ``model.encode_image``
and ``model.encode_text(tokenizer(texts))``. Here:

* ``model_name``: the student file; ``transform``: its ``preprocess``; ``encode_image(images
  [B, 3, S, S]) -> [B, d]``: the student's fused features f_e (normalised by the benchmark), so
  its logits rank classes exactly as the student's own do.
* ``pretrained="stored"`` (default): the text side is the stored W. The tokenizer maps each
  prompt (any template) to the stored class name it contains (the longest one; case-insensitive)
  and ``encode_text`` returns that row of W; a class the student does not store is an error.
* ``pretrained="teacher:CONFIG.yaml"``: the text side is the student's own teacher (the
  ``teacher`` section of a run's config: model, weights, prompts; checked against the student
  file's record) running its prompted text tower on the benchmark's prompts: the learned context
  replaces the prompt's first tokens, so with the template "a photo of a {c}." it gives W itself,
  and any other class names work. EduAttention still attends over the stored W.

Use: ``register()`` adds the model type ``comkd`` to CLIP_benchmark, then
``clip_benchmark.models.load_clip("comkd", "student.safetensors", "stored", None, device)`` and
its ``zeroshot_classification`` functions take the student, ``evaluate`` included.

CLIP_benchmark 1.6.2 (the newest release) computes top-k accuracy as ``float()`` of a 1-element
NumPy array, which NumPy >= 2.4 refuses (``TypeError: only 0-dimensional arrays can be converted
to Python scalars``), so its ``zeroshot_classification.evaluate`` (and its ``clip_benchmark eval``)
crash after classifying every image. ``register()`` therefore replaces that module's ``accuracy``
with the same computation taken as a Python scalar (``accuracy_numpy2``), and only where the
installed one fails: a CLIP_benchmark that works under the installed NumPy is left as it is.
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
    raises the NumPy >= 2.4 error on a 2-image check (see the module docstring)."""
    import clip_benchmark.metrics.zeroshot_classification as zs

    if zs.accuracy is accuracy_numpy2:
        return
    try:
        zs.accuracy(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]), topk=(1,))
    except TypeError as e:
        if "0-dimensional" not in str(e):
            raise
        zs.accuracy = accuracy_numpy2

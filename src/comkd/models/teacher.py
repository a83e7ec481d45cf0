"""The teacher: a frozen CLIP with deep prompts in both towers (PromptSRC/IVLP style), and its class
text features W (``[N, d]``, L2-normalised; ``Teacher.class_text_features``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.hf_model import HFTextEncoder
from torch import nn

from .backbones import LoadedModel, ModelError, arch_from_options, load_arch, read_state_dict, weights_version
from .prompts import PromptedHFTextEncoder, PromptedTextEncoder, PromptedVisionTower


def _default_depth(requested: int | None, layers: int, n: int) -> int:
    if n == 0:
        return 0
    return min(9, layers) if requested is None else requested


@dataclass
class TeacherArch:
    """What a teacher is: every option that shapes its modules, in one object (as ``StudentArch``).

    ``model``: open_clip name, tiny config (``comkd-tiny-teacher``), config .json, ``hf-hub:`` id
    or ``real:`` towers. ``text_ctx``, ``text_depth``, ``ctx_init``: learnable text context tokens,
    deep text prompt depth (None: min(9, layers); 1 for a Hugging Face text tower, which takes no
    deep prompts) and the phrase that initialises the context. ``vision_tokens``, ``vision_depth``:
    deep visual prompts (None: depth min(9, layers) on a ViT, none on a CNN tower, which refuses a
    depth above 0). ``image_size``, ``quick_gelu``: as in ``StudentArch``.
    """

    model: str
    text_ctx: int = 4
    text_depth: int | None = None
    ctx_init: str | None = "a photo of a"
    vision_tokens: int = 4
    vision_depth: int | None = None
    image_size: int | None = None
    quick_gelu: bool | None = None


class Teacher(nn.Module):
    """A frozen CLIP whose only trainable parameters are its prompts.

    Attributes:
        clip: the open_clip model (frozen).
        visual: ``PromptedVisionTower`` over ``clip.visual``.
        text: ``PromptedTextEncoder`` over the text tower.
    """

    def __init__(self, loaded: LoadedModel, arch: TeacherArch):
        super().__init__()
        self.arch = arch
        if loaded.is_timm:
            raise ModelError(f"the teacher must be a CLIP with a text tower; '{loaded.name}' is image-only")
        self.clip = loaded.model
        self.model_name = loaded.name
        self.preprocess = loaded.preprocess
        self.clip.requires_grad_(False)
        vlayers = (
            len(self.clip.visual.transformer.resblocks) if hasattr(self.clip.visual, "transformer") else 0
        )
        if vlayers or (arch.vision_tokens and arch.vision_depth):  # a CNN asked for prompts: refused there
            depth = _default_depth(arch.vision_depth, vlayers, arch.vision_tokens)
            self.visual = PromptedVisionTower(self.clip.visual, arch.vision_tokens, depth)
        else:  # a CNN tower (open_clip ResNet, timm) without visual prompts
            self.visual = self.clip.visual
        tower = self.clip.text if hasattr(self.clip, "text") else self.clip
        if isinstance(tower, HFTextEncoder):  # learned context only (no deep prompts)
            depth = (1 if arch.text_ctx else 0) if arch.text_depth is None else arch.text_depth
            encoder = PromptedHFTextEncoder
        else:
            depth = _default_depth(arch.text_depth, len(tower.transformer.resblocks), arch.text_ctx)
            encoder = PromptedTextEncoder
        self.text = encoder(self.clip, loaded.tokenizer, arch.text_ctx, depth, arch.ctx_init)
        self._w_cache: tuple[tuple, torch.Tensor] | None = None

    @classmethod
    def build(
        cls,
        arch: TeacherArch,
        pretrained: str | None = None,
        *,
        prompts: str | Path | None = None,
        device: str | torch.device = "cpu",
    ) -> Teacher:
        """Load ``arch.model`` (``pretrained``: open_clip tag, local weight file, ``none`` or None
        for random weights), build the frozen prompted teacher on ``device`` and load ``prompts``
        (a file of learned prompts from ``comkd train-teacher``) when given."""
        teacher = cls(load_arch(arch, pretrained, device), arch).to(device)
        if prompts:
            teacher.load_prompts(prompts)
        return teacher.eval()

    # -- sizes and scales -------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        return int(getattr(self.clip.visual, "output_dim", 0) or self.clip.text.output_dim)  # timm: none

    @property
    def logit_scale(self) -> torch.Tensor:
        """s_t = exp(learned log-scale), a detached scalar."""
        return self.clip.logit_scale.detach().exp().reshape(())

    @property
    def logit_bias(self) -> torch.Tensor | None:
        """b_t, the learned logit bias of a SigLIP-style CLIP (a detached scalar); None without one."""
        b = getattr(self.clip, "logit_bias", None)
        return None if b is None else b.detach().reshape(())

    def prompt_parameters(self) -> list[nn.Parameter]:
        prompts = getattr(self.visual, "prompts", None)  # None on a CNN tower without prompts
        return [p for p in (prompts, self.text.ctx, self.text.deep) if p is not None]

    frozen_prefixes = ("clip.", "visual.")  # checkpoints keep only what trains: the prompts

    def prompt_state_dict(self) -> dict[str, torch.Tensor]:
        """Just the learned prompts (what stage 1 produces)."""
        ids = {id(p) for p in self.prompt_parameters()}
        names = {n for n, p in self.named_parameters() if id(p) in ids}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def load_prompts(self, state: dict[str, torch.Tensor] | str | Path) -> None:
        """Load prompts saved by ``prompt_state_dict`` (a dict or a safetensors/torch file)."""
        if not isinstance(state, dict):
            state = {k.removeprefix("teacher."): v for k, v in read_state_dict(state)[0].items()}
        own = self.prompt_state_dict()
        for k, v in state.items():
            if k not in own:
                raise ModelError(f"prompt weights: unexpected key '{k}' (teacher has {sorted(own)})")
            if own[k].shape != v.shape:
                raise ModelError(
                    f"prompt weights: '{k}' has shape {list(v.shape)}, teacher expects {list(own[k].shape)}"
                )
        if missing := set(own) - set(state):
            raise ModelError(f"prompt weights: missing keys {sorted(missing)}")
        self.load_state_dict(state, strict=False)

    # -- encoders ---------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor, prompted: bool = True) -> torch.Tensor:
        """``[B, 3, H, W]`` → L2-normalised ``[B, d]`` (u_t)."""
        feats = self.visual(images) if prompted else self.clip.visual(images)
        return F.normalize(feats, dim=-1)

    def encode_text(self, classnames: list[str], prompted: bool = True) -> torch.Tensor:
        """Class names → L2-normalised ``[N, d]`` text features from the learnable prompt."""
        texts = self.text.prompt_texts(classnames) if prompted else [f"a photo of a {c}." for c in classnames]
        return F.normalize(self.text(self.text.tokenize(texts), prompted=prompted), dim=-1)

    @torch.no_grad()
    def encode_templates(self, classnames: list[str], templates: list[str]) -> torch.Tensor:
        """PromptSRC's frozen text target ``[N, d]``: the frozen (un-prompted) CLIP's text features,
        un-normalised, averaged over ``templates``, then normalised."""
        feats = []
        for t in templates:
            tokens = self.text.tokenize([t.replace("{}", c) for c in classnames])
            feats.append(self.text(tokens, prompted=False).float())
        return F.normalize(torch.stack(feats).mean(0), dim=-1)

    @torch.no_grad()
    def class_text_features(self, classnames: list[str]) -> torch.Tensor:
        """W ``[N, d]`` for ``classnames``: computed once, reused until the weights change (the cache
        is keyed on the class names and the version of every weight: new prompts invalidate it)."""
        key = (tuple(classnames), weights_version(self))
        if self._w_cache is None or self._w_cache[0] != key:
            was_training = self.training
            self.eval()
            w = self.encode_text(list(classnames), prompted=True)
            self.train(was_training)
            self._w_cache = (key, w)
        return self._w_cache[1]

    def forward(self, images: torch.Tensor, classnames: list[str]) -> torch.Tensor:
        """Teacher logits q_t = s_t · u_t · Wᵀ (+ b_t where the CLIP has a logit bias), ``[B, N]``
        (no gradient). b_t is the same for every class, so softmaxes and argmaxes of q_t (the KD
        target, the prompt loss, predictions) do not see it; stage 2 reads s_t and W alone."""
        with torch.no_grad():
            q = self.logit_scale * self.encode_image(images) @ self.class_text_features(classnames).t()
            return q if self.logit_bias is None else q + self.logit_bias

    def train(self, mode: bool = True) -> Teacher:
        super().train(mode)
        self.clip.eval()  # frozen: no dropout, no batch-norm updates, whatever the stage
        return self


def create_teacher(
    model_name: str = "ViT-L-14",
    pretrained: str | None = None,
    *,
    prompts: str | Path | None = None,
    device: str | torch.device = "cpu",
    **options: Any,
) -> Teacher:
    """Build a frozen, prompted teacher CLIP.

    Args:
        model_name: ``TeacherArch.model``.
        pretrained: open_clip tag, local weight file, or None (random weights).
        prompts: a file of learned prompts (from ``comkd train-teacher``) to load.
        options: the other ``TeacherArch`` fields (``text_ctx``, ``vision_depth``, ...).
    """
    arch = arch_from_options(TeacherArch, "create_teacher", options, model=model_name)
    return Teacher.build(arch, pretrained, prompts=prompts, device=device)

"""Deep prompts around open_clip towers, without editing open_clip (VPT-deep / IVLP / PromptSRC):
``PromptedVisionTower``, ``PromptedTextEncoder`` and, for a Hugging Face text tower (the ``real:``
models' MiniLM), ``PromptedHFTextEncoder``. Depth 0 or no tokens switches prompts off and
reproduces the tower exactly.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from open_clip.transformer import VisionTransformer, text_global_pool
from torch import nn

from .backbones import ModelError

#: most prompt tokens (visual, or text context) a config or a file may ask for; a text context is
#: also bounded by its tower's own context length (77 for CLIP). Checked before any allocation.
MAX_PROMPT_TOKENS = 1024
#: deepest prompt depth a file may record (each tower also refuses a depth above its layer count)
MAX_PROMPT_DEPTH = 1024


def _run_blocks(
    transformer: nn.Module, x: torch.Tensor, hook, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Run an open_clip ``Transformer``'s blocks on batch-first ``x``; ``hook(i, x)`` may edit
    the tokens before block ``i``."""
    batch_first = getattr(transformer, "batch_first", True)
    for i, block in enumerate(transformer.resblocks):
        x = hook(i, x)
        if batch_first:
            x = block(x, attn_mask=attn_mask)
        else:
            x = block(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)
    return x


def _splice(x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """``x`` ``[N, L, width]`` with the tokens at positions ``1..n`` replaced by ``ctx`` ``[n, width]``."""
    return torch.cat([x[:, :1], ctx.to(x.dtype).expand(x.shape[0], -1, -1), x[:, 1 + len(ctx) :]], dim=1)


class PromptedVisionTower(nn.Module):
    """An open_clip ViT image tower with deep visual prompts: ``n_tokens`` prompt tokens appended
    after the patch tokens at the input, replaced by that layer's own before each of the next
    ``depth - 1`` blocks.

    Input ``[B, 3, H, W]`` images; output ``[B, D]`` un-normalised image embeddings (``D`` the
    tower's output size). Only ``prompts`` (``[depth, n_tokens, width]``) is meant to be trained.
    """

    def __init__(self, visual: nn.Module, n_tokens: int = 4, depth: int = 9, init_std: float = 0.02):
        super().__init__()
        if not isinstance(visual, VisionTransformer):
            raise ModelError(
                f"deep visual prompts need an open_clip VisionTransformer tower, got {type(visual).__name__} "
                "(a CNN): set teacher.vision_depth (or student.vision_depth) to 0 for this backbone"
            )
        layers = len(visual.transformer.resblocks)
        if depth > layers:
            raise ModelError(f"visual prompt depth {depth} exceeds the tower's {layers} layers")
        if n_tokens < 0 or depth < 0:
            raise ModelError(f"prompt tokens and depth must be >= 0, got n_tokens={n_tokens}, depth={depth}")
        if n_tokens > MAX_PROMPT_TOKENS:  # checked before the prompts are allocated
            raise ModelError(f"{n_tokens} visual prompt tokens are more than the {MAX_PROMPT_TOKENS} allowed")
        self.visual = visual
        self.n_tokens = n_tokens if depth > 0 else 0
        self.depth = depth if n_tokens > 0 else 0
        width = visual.transformer.width
        if self.n_tokens:
            self.prompts = nn.Parameter(torch.randn(self.depth, self.n_tokens, width) * init_std)
        else:
            self.register_parameter("prompts", None)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = v.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.patch_dropout(x)
        n = self.n_tokens
        if n:
            x = torch.cat([x, self.prompts[0].to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
        x = v.ln_pre(x)

        def inject(i: int, t: torch.Tensor) -> torch.Tensor:
            if n and 0 < i < self.depth:
                t = torch.cat([t[:, :-n], self.prompts[i].to(t.dtype).expand(t.shape[0], -1, -1)], dim=1)
            return t

        x = _run_blocks(v.transformer, x, inject)
        if n:
            x = x[:, :-n]
        pooled, _ = v._pool(x)
        if v.proj is not None:
            pooled = pooled @ v.proj
        return pooled


class _TextParts:
    """The pieces of an open_clip text tower, for both ``CLIP`` and ``CustomTextCLIP``."""

    def __init__(self, clip: nn.Module):
        owner = clip.text if hasattr(clip, "text") else clip
        needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
        if not all(hasattr(owner, a) for a in needed) or getattr(owner, "cls_emb", None) is not None:
            raise ModelError(
                f"text prompts need an open_clip transformer text tower; {type(owner).__name__} is not supported"
            )
        self.owner = owner
        self.pool_type = getattr(clip, "text_pool_type", getattr(owner, "pool_type", "argmax"))
        self.eos_id = getattr(clip, "text_eos_id", getattr(owner, "eos_id", None))


class PromptedTextEncoder(nn.Module):
    """An open_clip text tower with learnable context and deep text prompts: the class prompt
    ``"X X X X {class}."`` whose ``n_ctx`` placeholder embeddings are learnable context vectors
    (initialised from ``ctx_init``), and deep prompts that replace the same positions before each
    of the next ``depth - 1`` blocks.

    ``forward(tokens)`` maps ``[N, L]`` token ids to ``[N, D]`` un-normalised text embeddings;
    ``prompted=False`` runs the plain tower (equal to ``clip.encode_text``).
    """

    def __init__(
        self,
        clip: nn.Module,
        tokenizer,
        n_ctx: int = 4,
        depth: int = 9,
        ctx_init: str | None = "a photo of a",
        init_std: float = 0.02,
    ):
        super().__init__()
        self.parts = _TextParts(clip)
        self.tokenizer = tokenizer
        owner = self.parts.owner
        layers = len(owner.transformer.resblocks)
        self._set_sizes(n_ctx, depth)
        if depth > layers:
            raise ModelError(f"text prompt depth {depth} exceeds the text tower's {layers} layers")
        context = int(owner.positional_embedding.shape[0])
        if n_ctx > context - 3:  # checked before the context is allocated
            raise ModelError(
                f"text context of {n_ctx} tokens does not fit the text tower's context of {context} tokens "
                f"(at most {context - 3}: a start, an end and one class-name token are needed too)"
            )
        width = owner.transformer.width
        if self.n_ctx:
            ids = tokenizer([ctx_init])[0] if ctx_init else None
            body = None if ids is None else ids[1 : int(ids.argmax())]  # between SOT and EOT
            self._init_context(owner.token_embedding, body, init_std)
            self.deep = nn.Parameter(torch.randn(max(self.depth - 1, 0), self.n_ctx, width) * init_std)
        else:
            self.register_parameter("ctx", None)
            self.register_parameter("deep", None)

    def _set_sizes(self, n_ctx: int, depth: int) -> None:
        """Context tokens and prompt depth, both 0 when either is (prompts off)."""
        if n_ctx < 0 or depth < 0:
            raise ModelError(f"text prompt tokens and depth must be >= 0, got n_ctx={n_ctx}, depth={depth}")
        self.n_ctx = n_ctx if depth > 0 else 0
        self.depth = depth if n_ctx > 0 else 0

    def _init_context(self, words: nn.Embedding, body: torch.Tensor | None, init_std: float) -> None:
        """``ctx`` ``[n_ctx, width]``: the word embeddings of ``body`` (``ctx_init``'s tokens) when it
        has ``n_ctx`` of them, else random."""
        ctx = torch.randn(self.n_ctx, words.embedding_dim) * init_std
        if body is not None and len(body) == self.n_ctx:
            with torch.no_grad():
                ctx = words(body.to(words.weight.device)).float().cpu()
        self.ctx = nn.Parameter(ctx)

    def prompt_texts(self, classnames: list[str]) -> list[str]:
        """The strings behind the learnable prompts: ``"X X X X {class}."``."""
        prefix = " ".join(["X"] * self.n_ctx)
        return [f"{prefix} {c}." if prefix else f"{c}." for c in classnames]

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts)

    def forward(self, tokens: torch.Tensor, prompted: bool = True) -> torch.Tensor:
        o = self.parts.owner
        dtype = o.transformer.get_cast_dtype() if hasattr(o.transformer, "get_cast_dtype") else torch.float32
        tokens = tokens.to(o.token_embedding.weight.device)
        x = o.token_embedding(tokens).to(dtype)
        n = self.n_ctx if prompted else 0
        if n:
            x = _splice(x, self.ctx)
        x = x + o.positional_embedding[: x.shape[1]].to(dtype)
        attn_mask = getattr(o, "attn_mask", None)
        if attn_mask is not None:
            attn_mask = attn_mask[: x.shape[1], : x.shape[1]]

        def inject(i: int, t: torch.Tensor) -> torch.Tensor:
            return _splice(t, self.deep[i - 1]) if n and 0 < i < self.depth else t

        x = _run_blocks(o.transformer, x, inject, attn_mask=attn_mask)
        x = o.ln_final(x)
        pooled = text_global_pool(x, tokens, self.parts.pool_type, eos_token_id=self.parts.eos_id)
        proj = o.text_projection
        if proj is not None:
            pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
        return pooled


class PromptedHFTextEncoder(PromptedTextEncoder):
    """Learned context (CoOp) in an open_clip ``HFTextEncoder``, depth 1 only (no deep prompts):
    ``forward(tokens)`` maps ``[N, L]`` token ids of ``"X X X X {class}."`` (``[CLS] x x x x ...
    [SEP]`` and padding) to ``[N, D]`` un-normalised text embeddings. The word embeddings at
    positions ``1..n_ctx`` are replaced by ``ctx`` (``[n_ctx, width]``) and the sequence runs
    through the HF model as ``inputs_embeds`` with the padding mask (its embedding layer adds
    positions and token types and normalises, as for ids); the tower's pooler and projection
    follow. ``prompted=False`` is the tower's own forward (``clip.encode_text``).
    """

    def __init__(
        self, clip: nn.Module, tokenizer, n_ctx: int = 4, depth: int = 1, ctx_init: str | None = None
    ):
        nn.Module.__init__(self)
        owner = clip.text
        if depth > 1:
            raise ModelError(
                f"deep text prompts (depth {depth}) are not built for a Hugging Face text tower "
                f"({type(owner.transformer).__name__}): set teacher.text_depth to 1 (learned context) or 0"
            )
        self._set_sizes(n_ctx, depth)
        context = int(tokenizer.context_length)
        if n_ctx > context - 3:  # checked before the context is allocated
            raise ModelError(
                f"text context of {n_ctx} tokens does not fit the tokenizer's context of {context} tokens"
            )
        # the HFTextEncoder is held outside the module tree (part of the teacher's frozen CLIP, saved there)
        self.parts, self.tokenizer = SimpleNamespace(owner=owner), tokenizer
        self.register_parameter("deep", None)
        if not self.n_ctx:
            self.register_parameter("ctx", None)
            return
        ids = tokenizer([ctx_init])[0] if ctx_init else None  # the body: between [CLS] and [SEP]
        body = None if ids is None else ids[1 : int((ids != owner.config.pad_token_id).sum()) - 1]
        self._init_context(owner.transformer.get_input_embeddings(), body, 0.02)

    def forward(self, tokens: torch.Tensor, prompted: bool = True) -> torch.Tensor:
        o = self.parts.owner
        tokens = tokens.to(o.transformer.device)
        if not (prompted and self.n_ctx):
            return o(tokens)
        mask = (tokens != o.config.pad_token_id).long()
        x = _splice(o.transformer.get_input_embeddings()(tokens), self.ctx)
        out = o.transformer(inputs_embeds=x, attention_mask=mask)
        return o.proj(o.pooler(out, mask))

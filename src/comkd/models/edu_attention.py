"""EduAttention (docs/method.md, "EduAttention"): the student's image feature asks the teacher's class
text features how to fuse, gated by a learnable scalar ``alpha`` that starts at 0.

Two readings (``mode``):

* ``paper``: scaled dot-product scores ``Q Kᵀ / √(C/h)`` and the open gate ``u_s + α·FC_o(f_att)``.
  On unit-norm inputs with nn.Linear's default init the scores barely differ between classes,
  so the softmax is uniform and stays so (docs/method.md, "EduAttention": a measured property).
* ``cosine`` (docs/method.md, "Extensions"): scores ``τ_e · norm(Q) · norm(K)ᵀ`` with a learnable
  temperature τ_e started at the CLIP logit scale, FC_q/FC_k/FC_v started at the identity (so
  the attention begins as the student's own class posterior over W and f_att as the expected
  class vector), and a bounded gate ``u_s + tanh(α)·norm(FC_o(f_att))``. α = 0 still makes
  step 0 exactly PromptKD.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..choices import EduMode, EduScale, check


class EduAttention(nn.Module):
    """Cross-attention from image features to class text features.

    ``Q = FC_q(u_s)`` ``[B, C]``, ``K = FC_k(W)``, ``V = FC_v(W)`` ``[N, C]``,
    ``paper``: ``f_att = softmax(Q Kᵀ / √(C/h)) V`` per head, ``f_e = u_s + α · FC_o(f_att)``.
    ``cosine``: ``f_att = softmax(τ_e · norm(Q) norm(K)ᵀ) V`` per head,
    ``f_e = u_s + tanh(α) · norm(FC_o(f_att))``. Both ``[B, d]``.

    Args:
        dim: d, the size of both the image features and the class text features.
        attn_dim: C, the attention width (default d; ``FC_o`` is the identity when C = d).
        heads: number of attention heads h (C must be divisible by h).
        shared_fc: one Linear shared by Q, K and V instead of three separate ones.
        mode: ``paper`` or ``cosine`` (see the module docstring).
        init_temperature: τ_e at init for ``cosine`` (the CLIP logit scale, 100 for OpenAI CLIP).
        scale: ``paper`` mode's divisor of Q Kᵀ: ``sqrt_c`` √(C/h) (the paper's plain reading) or
            ``temperature`` C/h.
    """

    def __init__(
        self,
        dim: int,
        attn_dim: int | None = None,
        heads: int = 1,
        shared_fc: bool = False,
        mode: str = "paper",
        init_temperature: float = 100.0,
        scale: str = "sqrt_c",
    ):
        super().__init__()
        attn_dim = dim if attn_dim is None else attn_dim
        if heads < 1 or attn_dim % heads:
            raise ValueError(f"EduAttention: attn_dim {attn_dim} is not divisible by heads {heads}")
        check(mode, EduMode, "EduAttention: mode")
        check(scale, EduScale, "EduAttention: scale")
        self.scale = scale
        if mode == "cosine" and not init_temperature > 0:
            raise ValueError(f"EduAttention: init_temperature must be > 0, got {init_temperature}")
        self.dim, self.attn_dim, self.heads, self.mode = dim, attn_dim, heads, mode
        self.fc_q = nn.Linear(dim, attn_dim)
        self.fc_k = self.fc_q if shared_fc else nn.Linear(dim, attn_dim)
        self.fc_v = self.fc_q if shared_fc else nn.Linear(dim, attn_dim)
        self.fc_o = nn.Identity() if attn_dim == dim else nn.Linear(attn_dim, dim)
        self.alpha = nn.Parameter(torch.zeros(()))
        if mode == "cosine":
            self.log_temperature = nn.Parameter(torch.tensor(math.log(init_temperature)))
            for fc in (self.fc_q, self.fc_k, self.fc_v, self.fc_o):  # a shared one twice: still the identity
                if isinstance(fc, nn.Linear):
                    _identity_(fc)
        self._kv_cache: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    def _keys_values(self, text_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """FC_k(W), FC_v(W). Without autograd (inference) they are computed once per W and weights:
        a deployed student then pays for EduAttention's key/value projections only once."""
        if torch.is_grad_enabled():
            return self.fc_k(text_features), self.fc_v(text_features)
        key = (
            text_features.data_ptr(),
            text_features._version,
            tuple(text_features.shape),
            text_features.dtype,
            *((p.data_ptr(), p._version) for p in (*self.fc_k.parameters(), *self.fc_v.parameters())),
        )
        if self._kv_cache is None or self._kv_cache[0] != key:
            self._kv_cache = (key, self.fc_k(text_features), self.fc_v(text_features))
        return self._kv_cache[1], self._kv_cache[2]

    def attend(
        self, image_features: torch.Tensor, text_features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``FC_o(f_att)`` ``[B, d]`` and the attention weights ``[B, h, N]``."""
        if image_features.ndim != 2 or text_features.ndim != 2:
            raise ValueError(
                f"EduAttention expects image features [B, d] and text features [N, d], got "
                f"{list(image_features.shape)} and {list(text_features.shape)}"
            )
        if image_features.shape[1] != self.dim or text_features.shape[1] != self.dim:
            raise ValueError(
                f"EduAttention(dim={self.dim}): image features have {image_features.shape[1]} channels and "
                f"text features {text_features.shape[1]}"
            )
        b, n, h = image_features.shape[0], text_features.shape[0], self.heads
        hd = self.attn_dim // h
        q = self.fc_q(image_features).view(b, h, hd).transpose(0, 1)  # [h, B, hd]
        k, v = (t.view(n, h, hd).transpose(0, 1) for t in self._keys_values(text_features))  # [h, N, hd]
        if self.mode == "cosine":
            scores = (
                self.log_temperature.exp() * F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(1, 2)
            )
        else:
            scores = q @ k.transpose(1, 2) / (math.sqrt(hd) if self.scale == "sqrt_c" else hd)
        attn = torch.softmax(scores, dim=-1)  # [h, B, N]
        out = (attn @ v).transpose(0, 1).reshape(b, self.attn_dim)  # [B, C]
        return self.fc_o(out), attn.transpose(0, 1)

    def gate(self) -> torch.Tensor:
        """The factor the attention output is added with: α (``paper``) or tanh(α) (``cosine``)."""
        return torch.tanh(self.alpha) if self.mode == "cosine" else self.alpha

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """``[B, d]`` image features and ``[N, d]`` class text features to fused ``[B, d]``."""
        delta, _ = self.attend(image_features, text_features)
        if self.mode == "cosine":
            delta = F.normalize(delta, dim=-1)
        return image_features + self.gate().to(delta.dtype) * delta


def _identity_(fc: nn.Linear) -> None:
    """Weight = identity (on the leading block when not square), bias = 0."""
    nn.init.eye_(fc.weight)
    if fc.bias is not None:
        nn.init.zeros_(fc.bias)

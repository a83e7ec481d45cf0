"""EduAttention (METHOD.md section 4): the student's image feature asks the teacher's class
text features how to fuse, gated by a learnable scalar ``alpha`` that starts at 0."""

from __future__ import annotations

import math

import torch
from torch import nn


class EduAttention(nn.Module):
    """Cross-attention from image features to class text features.

    ``Q = FC_q(u_s)`` ``[B, C]``, ``K = FC_k(W)``, ``V = FC_v(W)`` ``[N, C]``,
    ``f_att = softmax(Q Kᵀ / √(C/h)) V`` per head, ``f_e = u_s + α · FC_o(f_att)`` ``[B, d]``.

    Args:
        dim: d, the size of both the image features and the class text features.
        attn_dim: C, the attention width (default d; ``FC_o`` is the identity when C = d).
        heads: number of attention heads h (C must be divisible by h).
        shared_fc: one Linear shared by Q, K and V instead of three separate ones.
    """

    def __init__(self, dim: int, attn_dim: int | None = None, heads: int = 1, shared_fc: bool = False):
        super().__init__()
        attn_dim = dim if attn_dim is None else attn_dim
        if heads < 1 or attn_dim % heads:
            raise ValueError(f"EduAttention: attn_dim {attn_dim} is not divisible by heads {heads}")
        self.dim, self.attn_dim, self.heads = dim, attn_dim, heads
        self.fc_q = nn.Linear(dim, attn_dim)
        self.fc_k = self.fc_q if shared_fc else nn.Linear(dim, attn_dim)
        self.fc_v = self.fc_q if shared_fc else nn.Linear(dim, attn_dim)
        self.fc_o = nn.Identity() if attn_dim == dim else nn.Linear(attn_dim, dim)
        self.alpha = nn.Parameter(torch.zeros(()))
        self._kv_cache: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    def _keys_values(self, text_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """FC_k(W), FC_v(W). Without autograd (inference) they are computed once per W and weights:
        a deployed student then pays for EduAttention's key/value projections only once."""
        if torch.is_grad_enabled():
            return self.fc_k(text_features), self.fc_v(text_features)
        key = (text_features.data_ptr(), text_features._version, tuple(text_features.shape), text_features.dtype,
               *((p.data_ptr(), p._version) for p in (*self.fc_k.parameters(), *self.fc_v.parameters())))
        if self._kv_cache is None or self._kv_cache[0] != key:
            self._kv_cache = (key, self.fc_k(text_features), self.fc_v(text_features))
        return self._kv_cache[1], self._kv_cache[2]

    def attend(self, image_features: torch.Tensor, text_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
        k, v = self._keys_values(text_features)
        k = k.view(n, h, hd).transpose(0, 1)  # [h, N, hd]
        v = v.view(n, h, hd).transpose(0, 1)  # [h, N, hd]
        attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd), dim=-1)  # [h, B, N]
        out = (attn @ v).transpose(0, 1).reshape(b, self.attn_dim)  # [B, C]
        return self.fc_o(out), attn.transpose(0, 1)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """``[B, d]`` image features and ``[N, d]`` class text features to fused ``[B, d]``."""
        delta, _ = self.attend(image_features, text_features)
        return image_features + self.alpha.to(delta.dtype) * delta

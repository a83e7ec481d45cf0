"""``benchmarks.timing.count_flops`` counts attention, whatever kernel runs it: open_clip's ViT-B/16
image tower at 224 px against a count made here from its architecture alone."""

from __future__ import annotations

import open_clip
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.timing import count_flops


def vit_flops(width: int, layers: int, patch: int, image: int, mlp: int, out_dim: int) -> int:
    """FLOPs (2 per multiply-add) of a CLIP ViT image tower on one image: the patch convolution,
    per layer the QKV and output projections, QK^T and AV over all tokens (CLS included) and the
    MLP, then the final projection; norms, softmax, GELU and biases count nothing."""
    patches = (image // patch) ** 2
    tokens = patches + 1
    embed = 2 * patches * width * (3 * patch * patch)
    projections = 2 * tokens * (3 * width * width + width * width)
    attention = 2 * 2 * tokens * tokens * width
    mlp_flops = 2 * tokens * 2 * width * mlp
    return embed + layers * (projections + attention + mlp_flops) + 2 * width * out_dim


def bare_count(fn) -> int:
    """What the bench counted before: ``FlopCounterMode`` alone."""
    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


@pytest.fixture(scope="module")
def vit_b16():
    torch.manual_seed(0)
    return open_clip.create_model("ViT-B-16", pretrained=None).eval()


def test_count_flops_counts_vit_b16_attention(vit_b16, one_thread) -> None:
    expected = vit_flops(width=768, layers=12, patch=16, image=224, mlp=3072, out_dim=512)
    assert expected == pytest.approx(35.13e9, rel=1e-3)  # 197 tokens
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():  # inference: nn.MultiheadAttention would take its fused fast path
        counted = count_flops(lambda: vit_b16.encode_image(x))
        bare = bare_count(lambda: vit_b16.encode_image(x))
    assert counted == pytest.approx(expected, rel=0.05)
    # the counter alone does not see the fast path (projections and attention): about 36% low here
    assert bare < 0.8 * counted
    # with autograd on (a training step) there is no fast path, but the CPU's fused attention kernel
    # has no FLOP formula: the count must still hold QK^T and AV
    with torch.enable_grad():
        counted_grad = count_flops(lambda: vit_b16.encode_image(x))
        bare_grad = bare_count(lambda: vit_b16.encode_image(x))
    assert counted_grad == counted
    assert bare_grad < counted_grad - 0.5 * (2 * 2 * 197 * 197 * 768 * 12)


def test_count_flops_restores_the_fast_path_setting() -> None:
    before = torch.backends.mha.get_fastpath_enabled()
    try:
        for setting in (False, True):
            torch.backends.mha.set_fastpath_enabled(setting)
            assert count_flops(lambda: torch.ones(2, 3) @ torch.ones(3, 4)) == 2 * 2 * 3 * 4
            assert torch.backends.mha.get_fastpath_enabled() is setting
    finally:
        torch.backends.mha.set_fastpath_enabled(before)

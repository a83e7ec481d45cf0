"""Unit tests for comkd.models: EduAttention, projector, prompts, teacher, student, backbone loading
(a pretrained tag's activation from open_clip's own metadata; random weights only when asked for).

Reference values come from independent computations (NumPy loops, explicit formulas, the
unmodified open_clip towers), on the tiny registered configs with random weights.
"""

from __future__ import annotations

import copy
import json
import math
import re

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import yaml
from open_clip.transformer import QuickGELU
from torch import nn
from typer.testing import CliRunner

from comkd import cli
from comkd.config import load_config, save_config
from comkd.losses import ComKDLoss, build_loss
from comkd.models import (
    TINY_STUDENT,
    TINY_TEACHER,
    EduAttention,
    ModelError,
    Projector,
    PromptedTextEncoder,
    PromptedVisionTower,
    create_student,
    create_teacher,
    load_clip,
    save_clip_weights,
    uses_quick_gelu,
)
from comkd.models import backbones as B
from comkd.models.backbones import MODEL_CONFIG_DIR
from support import torch_threads

TINY_RESNET = "comkd-tiny-resnet-student"
CLASSES = ["cat", "dog", "car", "tree", "boat"]
PROMPT_KEYS = {"visual.prompts", "text.ctx", "text.deep"}


def images(b: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(b, 3, size, size)


def np_l2norm(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt((x * x).sum(axis=-1, keepdims=True))


def lin(layer: nn.Linear) -> tuple[np.ndarray, np.ndarray]:
    return layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy()


def np_edu_attention(
    u: np.ndarray, w: np.ndarray, mod: EduAttention, alpha: float | None = None
) -> np.ndarray:
    """f_e = u + α · FC_o(softmax(Q Kᵀ / √(C/h)) V), one head and one sample at a time (Q Kᵀ / (C/h)
    with ``scale='temperature'``)."""
    wq, bq = lin(mod.fc_q)
    wk, bk = lin(mod.fc_k)
    wv, bv = lin(mod.fc_v)
    q, k, v = u @ wq.T + bq, w @ wk.T + bk, w @ wv.T + bv
    c, h = q.shape[1], mod.heads
    hd = c // h
    att = np.zeros((u.shape[0], c))
    for head in range(h):
        cols = slice(head * hd, (head + 1) * hd)
        for b in range(u.shape[0]):
            div = math.sqrt(hd) if getattr(mod, "scale", "sqrt_c") == "sqrt_c" else float(hd)
            scores = np.array([q[b, cols] @ k[n, cols] / div for n in range(w.shape[0])])
            p = np.exp(scores - scores.max())
            p /= p.sum()
            att[b, cols] = sum(p[n] * v[n, cols] for n in range(w.shape[0]))
    if isinstance(mod.fc_o, nn.Linear):
        wo, bo = lin(mod.fc_o)
        att = att @ wo.T + bo
    a = float(mod.alpha.detach()) if alpha is None else alpha
    return u + a * att


def np_projector_eval(f: np.ndarray, proj: Projector) -> np.ndarray:
    """Linear → BatchNorm1d (running statistics) → ReLU → Linear, in NumPy."""
    lin1, bn, _, lin2 = proj
    w1, b1 = lin(lin1)
    w2, b2 = lin(lin2)
    z = f @ w1.T + b1
    rm, rv = bn.running_mean.double().numpy(), bn.running_var.double().numpy()
    g, beta = bn.weight.detach().double().numpy(), bn.bias.detach().double().numpy()
    z = (z - rm) / np.sqrt(rv + bn.eps) * g + beta
    z = np.maximum(z, 0.0)
    return z @ w2.T + b2


def trainable_names(module: nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the thread
    hand-offs cost more than the maths (about 4x). The slow paper-size test keeps all threads."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    with torch_threads(1):
        yield


@pytest.fixture
def teacher():
    torch.manual_seed(0)
    return create_teacher(TINY_TEACHER)


# -- EduAttention ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dim", "attn_dim", "heads"), [(8, None, 1), (8, None, 4), (8, 12, 4), (8, 6, 1)])
def test_edu_attention_matches_explicit_computation(dim: int, attn_dim: int | None, heads: int) -> None:
    torch.manual_seed(1)
    mod = EduAttention(dim, attn_dim=attn_dim, heads=heads).double()
    c = dim if attn_dim is None else attn_dim
    if c == dim:
        assert isinstance(mod.fc_o, nn.Identity)
    else:
        assert isinstance(mod.fc_o, nn.Linear)
        assert (mod.fc_o.in_features, mod.fc_o.out_features) == (c, dim)
    with torch.no_grad():
        mod.alpha.fill_(0.7)
    u = torch.randn(3, dim, dtype=torch.float64)
    w = torch.randn(5, dim, dtype=torch.float64)  # N != B
    out = mod(u, w)
    assert out.shape == (3, dim)
    np.testing.assert_allclose(
        out.detach().numpy(), np_edu_attention(u.numpy(), w.numpy(), mod), rtol=1e-9, atol=1e-12
    )


def test_edu_attention_heads_change_the_result() -> None:
    torch.manual_seed(2)
    one = EduAttention(8, heads=1).double()
    four = EduAttention(8, heads=4).double()
    four.load_state_dict(one.state_dict())
    with torch.no_grad():
        one.alpha.fill_(1.0)
        four.alpha.fill_(1.0)
    u, w = torch.randn(2, 8, dtype=torch.float64) * 3, torch.randn(6, 8, dtype=torch.float64) * 3
    assert not torch.allclose(one(u, w), four(u, w))


def test_edu_attention_alpha_zero_is_identity_but_alpha_learns() -> None:
    torch.manual_seed(3)
    mod = EduAttention(8, heads=2)
    assert mod.alpha.shape == () and float(mod.alpha.detach()) == 0.0
    u, w = torch.randn(4, 8), torch.randn(7, 8)
    out = mod(u, w)
    assert torch.equal(out, u)
    r = torch.randn(4, 8)
    (out * r).sum().backward()
    delta = np_edu_attention(u.double().numpy(), w.double().numpy(), mod, alpha=1.0) - u.double().numpy()
    want = float((delta * r.double().numpy()).sum())
    assert abs(want) > 1e-4
    assert float(mod.alpha.grad) == pytest.approx(want, rel=1e-4)
    # with α = 0 nothing else can move yet
    assert float(mod.fc_q.weight.grad.abs().max()) == 0.0


def test_edu_attention_shared_fc() -> None:
    torch.manual_seed(4)
    mod = EduAttention(8, shared_fc=True).double()
    assert mod.fc_q is mod.fc_k and mod.fc_k is mod.fc_v
    assert sum(p.numel() for p in mod.parameters()) == 8 * 8 + 8 + 1
    separate = EduAttention(8)
    assert sum(p.numel() for p in separate.parameters()) == 3 * (8 * 8 + 8) + 1
    with torch.no_grad():
        mod.alpha.fill_(0.5)
    u, w = torch.randn(2, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    np.testing.assert_allclose(
        mod(u, w).detach().numpy(), np_edu_attention(u.numpy(), w.numpy(), mod), rtol=1e-9
    )


def test_edu_attention_rejects_wrong_sizes() -> None:
    torch.manual_seed(5)
    mod = EduAttention(8)
    with pytest.raises(ValueError) as err:
        mod(torch.randn(2, 7), torch.randn(3, 8))
    assert re.search(r"\b7\b", str(err.value)) and re.search(r"\b8\b", str(err.value))
    with pytest.raises(ValueError) as err:
        mod(torch.randn(2, 8), torch.randn(3, 9))
    assert re.search(r"\b9\b", str(err.value)) and re.search(r"\b8\b", str(err.value))
    with pytest.raises(ValueError, match=r"\[8\]"):
        mod(torch.randn(8), torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"\b10\b.*\b4\b"):
        EduAttention(8, attn_dim=10, heads=4)


# -- Projector ---------------------------------------------------------------------------------------


def test_projector_structure_and_output() -> None:
    torch.manual_seed(6)
    proj = Projector(5, 7)
    kinds = [type(m) for m in proj]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (proj[0].in_features, proj[0].out_features) == (5, 7)
    assert proj[1].num_features == 7
    assert (proj[3].in_features, proj[3].out_features) == (7, 7)
    x = torch.randn(4, 5)
    assert proj(x).shape == (4, 7)
    proj = proj.double().eval()
    with torch.no_grad():
        proj[1].running_mean.copy_(torch.randn(7))
        proj[1].running_var.copy_(torch.rand(7) + 0.5)
        proj[1].weight.copy_(torch.randn(7))
    xd = x.double()
    np.testing.assert_allclose(
        proj(xd).detach().numpy(), np_projector_eval(xd.numpy(), proj), rtol=1e-9, atol=1e-12
    )


# -- prompts -----------------------------------------------------------------------------------------


def reference_prompted_vit(v: nn.Module, prompts: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Deep VPT written out: prompts after the patch tokens, replaced before blocks 1..depth-1,
    dropped before pooling; pooled = ln_post(CLS) @ proj."""
    assert v.transformer.batch_first
    b = x.shape[0]
    patches = v.conv1(x).flatten(2).transpose(1, 2)  # [B, P, width]
    n_keep = 1 + patches.shape[1]  # CLS + patches
    cls = v.class_embedding.reshape(1, 1, -1).repeat(b, 1, 1)
    tokens = torch.cat([cls, patches], dim=1) + v.positional_embedding
    tokens = torch.cat([tokens, prompts[0].unsqueeze(0).repeat(b, 1, 1)], dim=1)
    tokens = v.ln_pre(tokens)
    for i, block in enumerate(v.transformer.resblocks):
        if 1 <= i < prompts.shape[0]:
            tokens = torch.cat([tokens[:, :n_keep], prompts[i].unsqueeze(0).repeat(b, 1, 1)], dim=1)
        tokens = block(tokens)
    return v.ln_post(tokens[:, 0]) @ v.proj


@pytest.mark.parametrize("off", [{"n_tokens": 0, "depth": 2}, {"n_tokens": 4, "depth": 0}])
def test_vision_tower_without_prompts_is_exact(off: dict) -> None:
    torch.manual_seed(7)
    clip = load_clip(TINY_STUDENT).model
    tower = PromptedVisionTower(clip.visual, **off)
    assert tower.prompts is None
    x = images()
    with torch.no_grad():
        assert torch.equal(tower(x), clip.visual(x))


def test_vision_tower_deep_prompts() -> None:
    torch.manual_seed(8)
    clip = load_clip(TINY_TEACHER).model  # 4 layers
    tower = PromptedVisionTower(clip.visual, n_tokens=3, depth=3)
    assert tower.prompts.shape == (3, 3, clip.visual.transformer.width)
    with torch.no_grad():
        tower.prompts.normal_(0, 1.0)
    x = images(2)
    out = tower(x)
    assert out.shape == (2, clip.visual.output_dim)
    torch.testing.assert_close(
        out, reference_prompted_vit(clip.visual, tower.prompts, x), rtol=1e-5, atol=1e-5
    )
    with torch.no_grad():
        assert not torch.allclose(out, clip.visual(x), atol=1e-4)
    out.pow(2).sum().backward()
    for i in range(3):  # every layer's prompts are used
        assert float(tower.prompts.grad[i].abs().max()) > 0, f"prompts of layer {i} get no gradient"
    # attention has no order among the prompt tokens of one layer: permuting them changes nothing
    with torch.no_grad():
        permuted = tower.prompts[:, [2, 0, 1]].clone()
        before = tower(x)
        tower.prompts.copy_(permuted)
        torch.testing.assert_close(tower(x), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer", [1, 2])
def test_vision_tower_prompts_of_deeper_layers_change_output(layer: int) -> None:
    torch.manual_seed(9)
    clip = load_clip(TINY_TEACHER).model
    tower = PromptedVisionTower(clip.visual, n_tokens=4, depth=3)
    x = images(2)
    with torch.no_grad():
        before = tower(x)
        tower.prompts[layer].add_(torch.randn_like(tower.prompts[layer]))
        after = tower(x)
        assert not torch.allclose(before, after, atol=1e-5)


def test_vision_tower_rejects_bad_depth_and_towers() -> None:
    torch.manual_seed(10)
    clip = load_clip(TINY_STUDENT).model  # 2 layers
    with pytest.raises(ModelError, match=r"\b3\b.*\b2\b"):
        PromptedVisionTower(clip.visual, n_tokens=4, depth=3)
    resnet = load_clip(TINY_RESNET).model
    with pytest.raises(ModelError, match="ModifiedResNet"):
        PromptedVisionTower(resnet.visual, n_tokens=4, depth=1)


def test_text_encoder_unprompted_is_exact() -> None:
    torch.manual_seed(11)
    loaded = load_clip(TINY_TEACHER)
    enc = PromptedTextEncoder(loaded.model, loaded.tokenizer, n_ctx=4, depth=2)
    tokens = loaded.tokenizer([f"a photo of a {c}." for c in CLASSES])
    with torch.no_grad():
        assert torch.equal(enc(tokens, prompted=False), loaded.model.encode_text(tokens))


def test_text_encoder_context_initialised_from_phrase() -> None:
    torch.manual_seed(12)
    loaded = load_clip(TINY_TEACHER)
    enc = PromptedTextEncoder(loaded.model, loaded.tokenizer, n_ctx=4, depth=1, ctx_init="a photo of a")
    assert enc.deep.shape[0] == 0
    prompted = enc(enc.tokenize(enc.prompt_texts(CLASSES)))
    with torch.no_grad():
        plain = loaded.model.encode_text(loaded.tokenizer([f"a photo of a {c}." for c in CLASSES]))
    torch.testing.assert_close(prompted, plain, rtol=1e-5, atol=1e-5)


def test_text_encoder_uses_ctx_and_deep_prompts() -> None:
    torch.manual_seed(13)
    loaded = load_clip(TINY_TEACHER)  # 2 text layers
    enc = PromptedTextEncoder(loaded.model, loaded.tokenizer, n_ctx=4, depth=2)
    assert enc.ctx.shape == (4, 128) and enc.deep.shape == (1, 4, 128)
    tokens = enc.tokenize(enc.prompt_texts(CLASSES))
    out = enc(tokens)
    assert out.shape == (len(CLASSES), 128)
    out.pow(2).sum().backward()
    assert float(enc.ctx.grad.abs().max()) > 0
    assert float(enc.deep.grad.abs().max()) > 0
    with torch.no_grad():
        base = enc(tokens)
        enc.ctx.add_(torch.randn_like(enc.ctx))
        after_ctx = enc(tokens)
        enc.deep.add_(torch.randn_like(enc.deep))
        after_deep = enc(tokens)
    assert not torch.allclose(base, after_ctx, atol=1e-5)
    assert not torch.allclose(after_ctx, after_deep, atol=1e-5)
    with pytest.raises(ModelError, match=r"\b3\b.*\b2\b"):
        PromptedTextEncoder(loaded.model, loaded.tokenizer, n_ctx=4, depth=3)


# -- teacher -----------------------------------------------------------------------------------------


def test_teacher_only_prompts_trainable(teacher) -> None:
    assert trainable_names(teacher) == PROMPT_KEYS
    named = dict(teacher.named_parameters())
    assert {id(p) for p in teacher.prompt_parameters()} == {id(named[k]) for k in PROMPT_KEYS}
    assert set(teacher.prompt_state_dict()) == PROMPT_KEYS
    assert not any(p.requires_grad for p in teacher.clip.parameters())
    teacher.train()
    assert teacher.training and not teacher.clip.training


def test_teacher_text_features_are_unit_norm_and_cached(teacher) -> None:
    torch.manual_seed(14)
    w = teacher.class_text_features(CLASSES)
    assert w.shape == (len(CLASSES), teacher.embed_dim)
    torch.testing.assert_close(w.norm(dim=-1), torch.ones(len(CLASSES)))
    assert teacher.class_text_features(CLASSES) is w
    other = teacher.class_text_features(CLASSES[:3])
    assert other.shape == (3, teacher.embed_dim)
    torch.testing.assert_close(other, w[:3], rtol=1e-5, atol=1e-6)


def test_teacher_text_features_from_context_phrase() -> None:
    torch.manual_seed(15)
    t = create_teacher(TINY_TEACHER, text_depth=1)  # context tokens only, initialised from "a photo of a"
    w = t.class_text_features(CLASSES)
    with torch.no_grad():
        plain = t.clip.encode_text(t.text.tokenize([f"a photo of a {c}." for c in CLASSES]))
    torch.testing.assert_close(w, F.normalize(plain, dim=-1), rtol=1e-5, atol=1e-5)


def test_teacher_load_prompts_invalidates_cached_w(teacher, tmp_path) -> None:
    torch.manual_seed(16)
    w_old = teacher.class_text_features(CLASSES).clone()
    state = {k: v + torch.randn_like(v) for k, v in teacher.prompt_state_dict().items()}
    teacher.load_prompts(state)
    for k, v in teacher.prompt_state_dict().items():
        assert torch.equal(v, state[k])
    w_new = teacher.class_text_features(CLASSES)
    assert not torch.allclose(w_new, w_old, atol=1e-4)
    with torch.no_grad():
        fresh = teacher.encode_text(CLASSES)
    torch.testing.assert_close(w_new, fresh, rtol=1e-6, atol=1e-6)
    # the same through a file
    from safetensors.torch import save_file

    state2 = {k: v + torch.randn_like(v) for k, v in state.items()}
    save_file(state2, str(tmp_path / "prompts.safetensors"))
    teacher.load_prompts(tmp_path / "prompts.safetensors")
    w_file = teacher.class_text_features(CLASSES)
    assert not torch.allclose(w_file, w_new, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(w_file, teacher.encode_text(CLASSES), rtol=1e-6, atol=1e-6)
    # create_teacher(prompts=...) loads them at construction
    again = create_teacher(TINY_TEACHER, prompts=tmp_path / "prompts.safetensors")
    for k, v in again.prompt_state_dict().items():
        assert torch.equal(v, state2[k]), k


def test_teacher_load_prompts_errors(teacher) -> None:
    torch.manual_seed(17)
    state = {k: v.clone() for k, v in teacher.prompt_state_dict().items()}
    bad = dict(state, **{"text.ctx": torch.zeros(3, 128)})
    with pytest.raises(ModelError) as err:
        teacher.load_prompts(bad)
    assert "text.ctx" in str(err.value) and "[3, 128]" in str(err.value) and "[4, 128]" in str(err.value)
    with pytest.raises(ModelError, match="visual.prompts"):
        teacher.load_prompts({k: v for k, v in state.items() if k != "visual.prompts"})
    with pytest.raises(ModelError, match="bogus"):
        teacher.load_prompts(dict(state, bogus=torch.zeros(1)))


def test_teacher_forward_is_scaled_cosine(teacher) -> None:
    torch.manual_seed(18)
    with torch.no_grad():
        teacher.visual.prompts.normal_(0, 0.5)
    x = images(3)
    logits = teacher(x, CLASSES)
    assert logits.shape == (3, len(CLASSES)) and not logits.requires_grad
    with torch.no_grad():
        f = teacher.visual(x).double().numpy()
        w = teacher.text(teacher.text.tokenize(teacher.text.prompt_texts(CLASSES))).double().numpy()
    s = math.exp(float(teacher.clip.logit_scale))
    want = s * np_l2norm(f) @ np_l2norm(w).T
    np.testing.assert_allclose(logits.numpy(), want, rtol=1e-4, atol=1e-4)
    assert teacher.encode_image(x).shape == (3, teacher.embed_dim)


# -- student -----------------------------------------------------------------------------------------


def make_student(teacher, **kw):
    s = create_student(TINY_STUDENT, teacher_dim=teacher.embed_dim, **kw)
    s.set_text_features(teacher.class_text_features(CLASSES), CLASSES)
    return s


def test_student_trainable_parameters(teacher) -> None:
    torch.manual_seed(19)
    s = create_student(TINY_STUDENT, teacher_dim=teacher.embed_dim)
    names = trainable_names(s)
    assert "visual.prompts" in names and "edu_attention.alpha" in names
    assert names == (
        {"visual.prompts"}
        | {f"projector.{n}" for n, _ in s.projector.named_parameters()}
        | {f"edu_attention.{n}" for n, _ in s.edu_attention.named_parameters()}
    )
    assert not any(p.requires_grad for p in s.visual.visual.parameters())
    assert s.num_trainable() == sum(p.numel() for n, p in s.named_parameters() if n in names)
    plain = create_student(TINY_STUDENT, teacher_dim=teacher.embed_dim, edu_attention=False)
    assert plain.edu_attention is None
    assert trainable_names(plain) == names - {n for n in names if n.startswith("edu_attention.")}
    d = teacher.embed_dim
    assert s.num_trainable() - plain.num_trainable() == 3 * (d * d + d) + 1
    s.train()
    assert s.projector.training and not s.visual.training and not s.visual.visual.training


def _np_student_logits(s, x: torch.Tensor, w: torch.Tensor, subset=None, attend_subset=False) -> np.ndarray:
    with torch.no_grad():
        f = s.visual(x).double().numpy()
    u = np_l2norm(np_projector_eval(f, s.projector))
    wn = w.double().numpy()
    w_att = wn[subset] if (subset is not None and attend_subset) else wn
    f_e = np_edu_attention(u, w_att, s.edu_attention) if s.edu_attention is not None else u
    w_out = wn if subset is None else wn[subset]
    return float(s.logit_scale) * (np_l2norm(f_e) if s.arch.renorm_fused else f_e) @ w_out.T


def test_student_logits_independent(teacher) -> None:
    torch.manual_seed(20)
    s = make_student(teacher).eval()
    with torch.no_grad():
        s.edu_attention.alpha.fill_(0.8)
        s.projector[1].running_mean.normal_(0, 0.1)
        s.projector[1].running_var.uniform_(0.5, 1.5)
    x = images(4)
    out = s(x)
    assert out.logits.shape == (4, len(CLASSES))
    assert out.features.shape == out.fused.shape == (4, teacher.embed_dim)
    torch.testing.assert_close(out.features.norm(dim=-1), torch.ones(4))
    w = teacher.class_text_features(CLASSES)
    np.testing.assert_allclose(out.logits.detach().numpy(), _np_student_logits(s, x, w), rtol=1e-4, atol=1e-4)
    assert float(s.logit_scale) == pytest.approx(
        math.exp(float(load_clip(TINY_STUDENT).model.logit_scale.detach()))
    )
    # W lives in the student's state
    assert torch.equal(s.state_dict()["text_features"], w)


def test_student_class_subset(teacher) -> None:
    torch.manual_seed(21)
    s = make_student(teacher).eval()
    with torch.no_grad():
        s.edu_attention.alpha.fill_(2.0)
    x, subset = images(3), [3, 0, 4]
    full = s(x).logits
    sub = s(x, class_subset=subset).logits
    assert sub.shape == (3, 3)
    torch.testing.assert_close(sub, full[:, subset], rtol=1e-6, atol=1e-6)
    s.attend = "subset"
    sub_only = s(x, class_subset=torch.tensor(subset)).logits
    w = teacher.class_text_features(CLASSES)
    want = _np_student_logits(s, x, w, subset=subset, attend_subset=True)
    np.testing.assert_allclose(sub_only.detach().numpy(), want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(sub_only, sub, atol=1e-4)


def test_student_text_feature_errors(teacher) -> None:
    torch.manual_seed(22)
    s = create_student(TINY_STUDENT, teacher_dim=teacher.embed_dim)
    with pytest.raises(ModelError, match="set_text_features"):
        s(images(2))
    with pytest.raises(ModelError) as err:
        s.set_text_features(torch.randn(3, 64))
    assert "128" in str(err.value) and "[3, 64]" in str(err.value)
    with pytest.raises(ModelError, match=r"\b2\b.*\b3\b"):
        s.set_text_features(torch.randn(3, 128), ["a", "b"])


def test_student_resnet_tower(teacher) -> None:
    torch.manual_seed(23)
    s = create_student(TINY_RESNET, teacher_dim=teacher.embed_dim)
    assert type(s.visual).__name__ == "ModifiedResNet"
    names = trainable_names(s)
    assert names and all(n.startswith(("projector.", "edu_attention.")) for n in names)
    s.set_text_features(teacher.class_text_features(CLASSES))
    s.train()
    assert not s.visual.training
    bn_before = {k: v.clone() for k, v in s.visual.state_dict().items() if "running" in k}
    out = s(images(2))
    assert out.logits.shape == (2, len(CLASSES))
    out.logits.sum().backward()
    for k, v in s.visual.state_dict().items():  # the frozen tower's batch norms do not move
        if k in bn_before:
            assert torch.equal(v, bn_before[k]), k
    with pytest.raises(ModelError, match="student.vision_depth=2: .* is a CNN"):
        create_student(TINY_RESNET, teacher_dim=teacher.embed_dim, vision_tokens=4, vision_depth=2)


def test_student_timm_tower(teacher) -> None:
    torch.manual_seed(24)
    s = create_student("timm:resnet18", teacher_dim=teacher.embed_dim, logit_scale=10.0, edu_attention=False)
    s.set_text_features(teacher.class_text_features(CLASSES))
    assert float(s.logit_scale) == 10.0
    assert s.projector[0].in_features == 512
    assert all(n.startswith("projector.") for n in trainable_names(s))
    s.eval()
    x = images(2, 64)
    out = s(x)
    assert out.logits.shape == (2, len(CLASSES))
    w = teacher.class_text_features(CLASSES)
    torch.testing.assert_close(out.logits, 10.0 * s.encode(x) @ w.t(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ModelError, match="logit_scale"):
        create_student("timm:resnet18", teacher_dim=teacher.embed_dim)


def test_student_state_dict_round_trip_into_fresh_student(teacher) -> None:
    torch.manual_seed(31)
    s = make_student(teacher)
    with torch.no_grad():
        s.edu_attention.alpha.fill_(0.3)
    sd = s.state_dict()
    fresh = create_student(TINY_STUDENT, teacher_dim=teacher.embed_dim)
    fresh.load_state_dict(sd)
    x = images(2)
    torch.testing.assert_close(fresh.eval()(x).logits, s.eval()(x).logits)


# -- PromptKD equivalence (docs/method.md, "Methods") ---------------------------------------------------


def test_comkd_with_alpha_zero_equals_promptkd(teacher) -> None:
    torch.manual_seed(25)
    comkd = make_student(teacher, edu_attention=True)
    promptkd = make_student(teacher, edu_attention=False)
    shared = {k: v for k, v in comkd.state_dict().items() if not k.startswith("edu_attention.")}
    promptkd.load_state_dict(shared, strict=True)
    assert float(comkd.edu_attention.alpha.detach()) == 0.0
    comkd.train()
    promptkd.train()
    x = images(4)
    with torch.no_grad():
        q_t = teacher(x, CLASSES)
        u_t = teacher.encode_image(x)
    out_c, out_p = comkd(x), promptkd(x)
    loss_c = ComKDLoss(kd_weight=1000.0, align_weight=0.0)(out_c.logits, q_t, out_c.features, u_t)
    loss_p = build_loss("promptkd", kd_weight=1000.0)(out_p.logits, q_t, out_p.features, u_t)
    assert torch.equal(out_c.logits, out_p.logits)
    assert torch.equal(loss_c["loss"], loss_p["loss"])
    assert loss_c["loss"].item() > 0
    loss_c["loss"].backward()
    loss_p["loss"].backward()
    params_p = dict(promptkd.named_parameters())
    checked = 0
    for name, p in comkd.named_parameters():
        if name.startswith("edu_attention.") or not p.requires_grad:
            continue
        q = params_p[name]
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-9, msg=name)
        checked += 1
    assert checked == len(trainable_names(promptkd)) >= 7
    assert float(promptkd.visual.prompts.grad.abs().max()) > 0
    # ComKD's gate still learns from the same loss
    assert float(comkd.edu_attention.alpha.grad.abs()) > 0


# -- backbone loading --------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_save_and_reload_weights(tmp_path) -> None:
    torch.manual_seed(26)
    loaded = load_clip(TINY_TEACHER)
    path = tmp_path / "teacher.safetensors"
    save_clip_weights(loaded.model, path, TINY_TEACHER, loaded.config)
    torch.save(loaded.model.state_dict(), tmp_path / "teacher.pt")
    x = images(2)
    with torch.no_grad():
        want = loaded.model.encode_image(x)
        torch.manual_seed(99)
        other = create_teacher(TINY_TEACHER)  # random weights of its own
        assert not torch.allclose(other.encode_image(x, prompted=False), F.normalize(want, dim=-1), atol=1e-3)
        for file in (path, tmp_path / "teacher.pt"):
            t = create_teacher(TINY_TEACHER, pretrained=str(file))
            assert torch.equal(t.clip.encode_image(x), want), file


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_loading_into_wrong_config_names_key_and_shapes(tmp_path) -> None:
    torch.manual_seed(27)
    teacher_sd = load_clip(TINY_TEACHER).model.state_dict()
    student_sd = load_clip(TINY_STUDENT).model.state_dict()
    torch.save(teacher_sd, tmp_path / "teacher.pt")
    with pytest.raises(ModelError) as err:
        create_student(TINY_STUDENT, pretrained=str(tmp_path / "teacher.pt"), teacher_dim=128)
    msg = str(err.value)
    mismatched = [
        k for k in student_sd if k in teacher_sd and teacher_sd[k].shape != student_sd[k].shape and k in msg
    ]
    assert mismatched, msg
    k = mismatched[0]
    assert str(list(teacher_sd[k].shape)) in msg and str(list(student_sd[k].shape)) in msg
    # a comkd-saved file is refused too (its metadata already disagrees: 128 vs 64)
    loaded = load_clip(TINY_TEACHER)
    save_clip_weights(loaded.model, tmp_path / "teacher.safetensors", TINY_TEACHER, loaded.config)
    with pytest.raises(ModelError, match=r"128.*64"):
        create_student(TINY_STUDENT, pretrained=str(tmp_path / "teacher.safetensors"), teacher_dim=128)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_openai_style_state_dict_needs_quick_gelu(tmp_path) -> None:
    torch.manual_seed(28)
    sd = dict(load_clip(TINY_TEACHER).model.state_dict())
    sd.update(
        input_resolution=torch.tensor(32), context_length=torch.tensor(16), vocab_size=torch.tensor(49408)
    )
    path = tmp_path / "openai.pt"
    torch.save(sd, path)
    with pytest.raises(ModelError, match="QuickGELU"):
        create_teacher(TINY_TEACHER, pretrained=str(path))
    t = create_teacher(TINY_TEACHER, pretrained=str(path), quick_gelu=True)
    assert any(isinstance(m, QuickGELU) for m in t.clip.modules())
    own = t.clip.state_dict()
    for k, v in sd.items():
        if k not in ("input_resolution", "context_length", "vocab_size"):
            assert torch.equal(own[k], v), k
    assert torch.isfinite(t(images(2), CLASSES)).all()


def test_unknown_model_and_config_file(tmp_path) -> None:
    torch.manual_seed(29)
    with pytest.raises(ModelError, match="no-such-model"):
        create_teacher("no-such-model")
    with pytest.raises(ModelError, match="no-such-model"):
        create_student("no-such-model", teacher_dim=128)
    with pytest.raises(ModelError, match="not found"):
        create_teacher(str(tmp_path / "missing.json"))
    cfg = json.loads((MODEL_CONFIG_DIR / f"{TINY_TEACHER}.json").read_text())
    cfg_path = tmp_path / "comkd-test-teacher-copy.json"
    cfg_path.write_text(json.dumps(cfg))
    t = create_teacher(str(cfg_path))
    assert t.embed_dim == cfg["embed_dim"]
    assert "comkd-test-teacher-copy" in open_clip.list_models()


# -- the paper's pair, random weights ------------------------------------------------------------------


@pytest.mark.slow
def test_paper_pair_parameter_counts_and_one_step() -> None:
    torch.manual_seed(30)
    teacher = create_teacher("ViT-L-14", "none")
    assert teacher.embed_dim == 768
    assert teacher.visual.prompts.shape == (9, 4, 1024)
    promptkd = create_student("ViT-B-16", "none", teacher_dim=768, edu_attention=False)
    n_promptkd = promptkd.num_trainable()
    # 9·4·768 prompts + Linear(512→768) + BN(768) + Linear(768→768) = 1,013,760
    assert 950_000 <= n_promptkd <= 1_100_000, n_promptkd
    assert n_promptkd == 9 * 4 * 768 + (512 * 768 + 768) + 2 * 768 + (768 * 768 + 768)
    del promptkd
    student = create_student("ViT-B-16", "none", teacher_dim=768)
    assert student.num_trainable() - n_promptkd == 3 * (768 * 768 + 768) + 1
    classes = ["cat", "dog", "car"]
    student.set_text_features(teacher.class_text_features(classes), classes)
    student.train()
    opt = torch.optim.SGD(student.trainable_parameters(), lr=0.005, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():  # one teacher pass: q_t = s_t · u_t · Wᵀ (teacher.forward, checked above)
        u_t = teacher.encode_image(x)
        q_t = teacher.logit_scale * u_t @ teacher.class_text_features(classes).t()
    out = student(x)
    assert out.logits.shape == (2, 3)
    losses = ComKDLoss()(out.logits, q_t, out.features, u_t)
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    before = copy.deepcopy(student.projector[0].weight.detach())
    opt.step()
    assert not torch.equal(before, student.projector[0].weight)
    assert student.visual.prompts.grad is not None


def test_resnet_clip_teacher_without_visual_prompts() -> None:
    torch.manual_seed(41)
    t = create_teacher("comkd-tiny-resnet-student", vision_tokens=0)
    assert set(t.prompt_state_dict()) == {"text.ctx", "text.deep"}
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(t.encode_image(x), torch.nn.functional.normalize(t.clip.visual(x), dim=-1))
    # visual prompts left unset on a CNN: none; asked for: refused, naming the key
    assert (
        getattr(create_teacher("comkd-tiny-resnet-student", vision_tokens=4).visual, "prompts", None) is None
    )
    with pytest.raises(ModelError, match="VisionTransformer.*teacher.vision_depth"):
        create_teacher("comkd-tiny-resnet-student", vision_tokens=4, vision_depth=2)


def test_edu_attention_inference_reuses_keys_values_until_w_or_weights_change() -> None:
    torch.manual_seed(43)
    edu = EduAttention(16, heads=2)
    with torch.no_grad():
        edu.alpha.fill_(0.7)
    u, w = torch.randn(3, 16), torch.randn(5, 16)
    with torch.no_grad():
        first = edu(u, w)
        cached = edu._kv_cache
        assert torch.equal(edu(u, w), first) and edu._kv_cache is cached  # reused
        w.mul_(2.0)  # W changed in place: recomputed
        torch.testing.assert_close(edu(u, w), _independent_edu(edu, u, w))
        edu.fc_k.weight.add_(0.1)  # weights changed: recomputed
        torch.testing.assert_close(edu(u, w), _independent_edu(edu, u, w))
    torch.testing.assert_close(edu(u, w), _independent_edu(edu, u, w))  # training path unchanged


def _independent_edu(edu: EduAttention, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    h, c = edu.heads, edu.attn_dim
    q = u @ edu.fc_q.weight.t() + edu.fc_q.bias
    k = w @ edu.fc_k.weight.t() + edu.fc_k.bias
    v = w @ edu.fc_v.weight.t() + edu.fc_v.bias
    outs = []
    for i in range(h):
        sl = slice(i * c // h, (i + 1) * c // h)
        a = torch.softmax(q[:, sl] @ k[:, sl].t() / (c // h) ** 0.5, dim=-1)
        outs.append(a @ v[:, sl])
    return u + edu.alpha * torch.cat(outs, dim=1)


@pytest.mark.parametrize(
    ("edu_scale", "renorm_fused"), [("temperature", True), ("sqrt_c", False), ("temperature", False)]
)
def test_the_readings_the_paper_allows_match_numpy(teacher, edu_scale, renorm_fused) -> None:
    """Eq. 6 with C as the softmax temperature (Q Kᵀ / C), and logits from f_e as the gate left it
    (no renormalisation): each against the NumPy reference, and each a different function from
    the paper's plain reading on the same weights (so the switch is not a no-op)."""
    torch.manual_seed(31)
    s = make_student(teacher, edu_heads=2, edu_scale=edu_scale, renorm_fused=renorm_fused).eval()
    with torch.no_grad():
        s.edu_attention.alpha.fill_(0.8)
        for fc in (s.edu_attention.fc_q, s.edu_attention.fc_k):
            fc.weight.mul_(30.0)  # scores far from uniform, so the divisor matters
    x = images(4)
    w = teacher.class_text_features(CLASSES)
    got = s(x).logits.detach().numpy()
    np.testing.assert_allclose(got, _np_student_logits(s, x, w), rtol=1e-4, atol=1e-4)
    plain = make_student(teacher, edu_heads=2).eval()
    plain.load_state_dict(s.state_dict())
    assert not np.allclose(plain(x).logits.detach().numpy(), got, atol=1e-3)
    assert s.arch.edu_scale == edu_scale and s.arch.renorm_fused is renorm_fused


def test_a_student_file_records_the_readings_and_older_files_take_the_paper_reading(
    teacher, tmp_path
) -> None:
    from comkd.models.io import arch_from_metadata, load_student, save_student

    s = make_student(teacher, edu_scale="temperature", renorm_fused=False)
    save_student(s, tmp_path / "s.safetensors")
    back = load_student(tmp_path / "s.safetensors")
    assert (back.arch.edu_scale, back.arch.renorm_fused) == ("temperature", False)

    old = arch_from_metadata({"model": TINY_STUDENT, "teacher_dim": teacher.embed_dim, "edu_attention": True})
    assert (old.edu_scale, old.renorm_fused) == ("sqrt_c", True)
    with pytest.raises(ModelError, match="edu_scale must be one of sqrt_c, temperature"):
        make_student(teacher, edu_scale="cube_root")


def test_cpu_inference_in_chunks_gives_each_image_the_same_outputs() -> None:
    """A batch of more than ``infer_chunk_pixels`` input pixels runs in chunks in eval mode without autograd: the same
    outputs, image by image; training, autograd and export see the whole batch."""
    from comkd.models import create_student

    torch.manual_seed(0)
    s = create_student("comkd-tiny-student", None, teacher_dim=32, image_size=16).eval()
    s.set_text_features(torch.nn.functional.normalize(torch.randn(5, 32), dim=-1), list("abcde"))
    with torch.no_grad():
        s.edu_attention.alpha.fill_(0.5)
    x = torch.randn(11, 3, 16, 16)
    seen: list[int] = []
    hook = s.visual.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    with torch.no_grad():
        s.infer_chunk_pixels = 4 * 16 * 16
        chunked = s(x, class_subset=[0, 2, 4])
        assert seen == [4, 4, 3]
        s.infer_chunk_pixels = 0
        whole = s(x, class_subset=[0, 2, 4])
    assert seen[-1] == 11
    for f in ("features", "fused", "logits", "projected"):
        torch.testing.assert_close(getattr(chunked, f), getattr(whole, f), rtol=1e-5, atol=1e-6)
    s.infer_chunk_pixels = 4 * 16 * 16
    s(x)  # autograd on: one pass
    assert seen[-1] == 11
    assert s.infer_chunk_pixels // (16 * 16) == 4
    hook.remove()


# -- a pretrained tag's activation -------------------------------------------------------
@pytest.mark.parametrize("model", ["ViT-L-14", "ViT-B-16"])
def test_openai_tags_need_quick_gelu_in_open_clips_own_metadata(model) -> None:
    assert open_clip.get_pretrained_cfg(model, "openai")["quick_gelu"] is True
    assert B.tag_quick_gelu(model, "openai")
    assert not B.tag_quick_gelu(model, "laion2b_s34b_b88k" if model == "ViT-B-16" else "laion2b_s32b_b82k")


def _build_without_download(monkeypatch) -> list:
    """open_clip.create_model builds the architecture it is asked for but loads no weights."""
    calls = []
    real = open_clip.create_model

    def create(name, pretrained=None, **kw):
        calls.append((name, pretrained, kw))
        return real(name, pretrained=None, **kw)

    monkeypatch.setattr(B.open_clip, "create_model", create)
    return calls


@pytest.mark.parametrize("tag", ["openai", "laion2b_s34b_b79k"])
def test_a_pretrained_tag_builds_the_activation_its_weights_need(monkeypatch, tag) -> None:
    calls = _build_without_download(monkeypatch)
    loaded = load_clip("ViT-B-32", tag)
    want = bool(open_clip.get_pretrained_cfg("ViT-B-32", tag).get("quick_gelu", False))
    assert calls[0][1] == tag
    assert uses_quick_gelu(loaded.model) is want  # QuickGELU modules in the built towers
    assert bool(loaded.config.get("quick_gelu", False)) is want  # recorded in saved weights' metadata


def test_a_student_file_records_the_activation_in_effect(tmp_path) -> None:
    from comkd.engine.builders import build_student
    from comkd.models.io import load_student, save_student

    cfg = load_config("demo", sets=["student.quick_gelu=true"])
    student = build_student(cfg, 32, "cpu")
    cfg.student.quick_gelu = False  # the config no longer says so; the file must still know
    save_student(student, tmp_path / "s.safetensors")
    assert uses_quick_gelu(load_student(tmp_path / "s.safetensors").visual)


# -- random weights only when asked for in so many words ---------------------------------
def test_a_known_architecture_without_weights_is_refused() -> None:
    with pytest.raises(ModelError) as err:
        load_clip("ViT-B-16", None)
    msg = str(err.value)
    assert "ViT-B-16" in msg and "'none'" in msg and "openai" in msg and "\n" not in msg


def test_random_weights_on_request_and_tiny_models_from_scratch(monkeypatch) -> None:
    calls = _build_without_download(monkeypatch)
    loaded = load_clip("ViT-B-32", "none")
    assert calls[-1][1] is None and not uses_quick_gelu(loaded.model)
    assert load_clip("comkd-tiny-student", None).model is not None  # no pretrained tags: fine


def test_none_is_a_value_for_pretrained_in_yaml_sets_and_flags(tmp_path) -> None:
    y = tmp_path / "c.yaml"
    y.write_text("teacher: {pretrained: none}\nstudent: {pretrained: None}\n")
    cfg = load_config(str(y))
    assert (cfg.teacher.pretrained, cfg.student.pretrained) == ("none", "none")
    assert load_config(sets=["student.pretrained=none"]).student.pretrained == "none"
    assert load_config(overrides={"teacher": {"pretrained": "none"}}).teacher.pretrained == "none"
    assert load_config(sets=["student.pretrained=null"]).student.pretrained is None  # YAML null: unset
    save_config(cfg, tmp_path / "saved.yaml")
    assert yaml.safe_load((tmp_path / "saved.yaml").read_text())["teacher"]["pretrained"] == "none"
    assert load_config(str(tmp_path / "saved.yaml")).teacher.pretrained == "none"


def test_cli_refuses_the_paper_teacher_without_weights(tmp_path) -> None:
    r = CliRunner().invoke(cli.app, ["train-teacher", "--out-dir", str(tmp_path), "--set", "progress=false"])
    assert r.exit_code == 1
    assert "ViT-L-14" in r.output and "none" in r.output and "Traceback" not in r.output


def test_hub_weights_go_with_the_model_name_and_are_refused_as_a_weights_value() -> None:
    """open_clip reads a hub id only as the model; given as the weights it failed deep in
    open_clip, and a tag beside a hub model was silently ignored. Both are one line, offline."""
    from comkd.models import ModelError
    from comkd.models.backbones import load_clip

    with pytest.raises(
        ModelError, match=r"weights 'hf-hub:org/x': a hub model names its own weights.*--teacher"
    ):
        load_clip("ViT-B-32", "hf-hub:org/x")
    with pytest.raises(
        ModelError, match=r"model 'hf-hub:org/x' names its own weights; weights 'openai' would be"
    ):
        load_clip("hf-hub:org/x", "openai")

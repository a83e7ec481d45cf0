"""LiT as stage 0 (issue 33): ``pretrain.lock`` freezes towers so that only the projections learn,
``pretrain.fit: ridge`` fits the image projection in closed form (checked against NumPy), and
the ``own_real`` preset's pipeline on a handful of real images (slow, skipped without the ``real``
extra): a ridge-fitted Lite teacher saved as ``teacher_clip.safetensors`` loads back whole, and an
image-only student gets a defined undistilled score."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from comkd.config import ConfigError, load_config


def _np_ridge(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    """argmin_A ‖x Aᵀ − y‖² + λ'‖A‖², λ' = lam · mean diag(xᵀx), as least squares on rows
    augmented with √λ' I (no normal equations): ``[q, p]``."""
    reg = lam * np.mean(np.diag(x.T @ x))
    xa = np.vstack([x, np.sqrt(reg) * np.eye(x.shape[1])])
    ya = np.vstack([y, np.zeros((x.shape[1], y.shape[1]))])
    return np.linalg.lstsq(xa, ya, rcond=None)[0].T


def test_ridge_through_the_origin_matches_numpy():
    from comkd.models.projector import ridge_origin

    rng = np.random.default_rng(0)
    for n, p, q, lam in ((12, 5, 3, 0.3), (6, 9, 4, 0.01)):  # more rows than features, and fewer
        x, y = rng.normal(size=(n, p)) + 2.0, rng.normal(size=(n, q))
        a = ridge_origin(torch.from_numpy(x), torch.from_numpy(y), lam)
        assert a.shape == (q, p) and a.dtype == torch.float64
        np.testing.assert_allclose(a.numpy(), _np_ridge(x, y, lam), rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="must be"):
        ridge_origin(torch.zeros(3, 2), torch.zeros(4, 2), 0.1)


class _Shots(torch.utils.data.Dataset):
    """Labelled ``(image, label, index)`` items with the class names and templates of a dataset."""

    def __init__(self, n: int, size: int, classnames: list[str]):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 3, size, size, generator=g)
        self.y = torch.arange(n) % len(classnames)
        self.classnames, self.templates = classnames, ["a photo of a {}.", "a picture of a {}."]

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i


def _np_caption_targets(clip, tokenizer, ds) -> np.ndarray:
    """Each class's caption feature: the unit mean over templates of the unit text features."""
    with torch.no_grad():
        per = [
            F.normalize(clip.encode_text(tokenizer([t.format(c) for c in ds.classnames])), dim=-1)
            for t in ds.templates
        ]
    m = np.mean([f.double().numpy() for f in per], axis=0)
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def _check_fit_ridge(loaded, ds, lam: float) -> None:
    """``fit_ridge`` sets the image projection to NumPy's ridge of the trunk features onto the
    caption features of each image's class, and ``trunk_features`` is what precedes it."""
    from comkd.engine.lit import fit_ridge, trunk_features

    clip = loaded.model.eval()
    with torch.no_grad():
        x = trunk_features(clip, ds.x)
        before = clip.encode_image(ds.x)
    w_text = _np_caption_targets(clip, loaded.tokenizer, ds)
    res = fit_ridge(clip, loaded.tokenizer, ds, lam, "cpu", batch_size=4)
    a = _np_ridge(x.double().numpy(), w_text[ds.y.numpy()], lam)
    with torch.no_grad():
        after = clip.encode_image(ds.x).double().numpy()
        text = clip.encode_text(loaded.tokenizer(["a photo of a x."]))
    np.testing.assert_allclose(after, x.double().numpy() @ a.T, rtol=1e-4, atol=1e-5)
    assert not np.allclose(before.numpy(), after, atol=1e-3)
    assert res["images"] == len(ds) and 0.0 <= res["fit_acc"] <= 100.0
    assert torch.isfinite(text).all()


def test_fit_ridge_sets_the_image_projection_of_a_vit_as_numpy_solves_it():
    from comkd.models import load_clip

    torch.manual_seed(0)
    loaded = load_clip("comkd-tiny-teacher", image_size=16)
    text_before = {k: v.clone() for k, v in loaded.model.state_dict().items() if not k.startswith("visual.")}
    _check_fit_ridge(loaded, _Shots(10, 16, ["cat", "dog", "ship"]), 0.1)
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in text_before.items())


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k, v in before.items() if not torch.equal(v, after[k])}


@pytest.mark.parametrize(
    ("lock", "fixed", "moving"),
    [
        ("both", ("visual.", "transformer.", "token_embedding."), {"visual.proj", "text_projection"}),
        ("image", ("visual.",), {"visual.proj", "transformer."}),
    ],
)
def test_locked_stage0_changes_only_what_is_unlocked(tmp_path, one_thread, lock, fixed, moving):
    """``pretrain.lock``: a locked tower's weights and buffers stay as loaded; its projection and
    the logit scale learn (``image``: the text tower learns too)."""
    from comkd.engine.lit import is_projection
    from comkd.engine.stages import run_pretrain
    from comkd.models import load_clip
    from comkd.models.backbones import read_state_dict

    sets = ["pretrain.optim.epochs=1", "pretrain.optim.warmup_epochs=0", "pretrain.optim.batch_size=8"]
    cfg = load_config(
        "demo", sets=[*sets, "progress=false", f"pretrain.lock={lock}", "pretrain.teacher_shots=4"]
    )
    torch.manual_seed(cfg.seed)
    before = load_clip(
        cfg.teacher.model, cfg.teacher.pretrained, image_size=cfg.data.image_size
    ).model.state_dict()
    res = run_pretrain(cfg, tmp_path, which=("teacher",))
    after = read_state_dict(res["teacher"]["weights"])[0]
    changed = _changed(before, after)
    assert "logit_scale" in changed
    assert not any(k.startswith(fixed) and not is_projection(k) for k in changed), sorted(changed)
    assert all(any(k.startswith(m) for k in changed) for m in moving), sorted(changed)


def test_ridge_fit_needs_both_towers_locked():
    with pytest.raises(ConfigError, match="pretrain.fit: ridge .* set pretrain.lock: both"):
        load_config("demo", sets=["pretrain.fit=ridge"])
    with pytest.raises(ConfigError, match="pretrain.ridge_lambda: must be"):
        load_config("demo", sets=["pretrain.lock=both", "pretrain.fit=ridge", "pretrain.ridge_lambda=0"])
    with pytest.raises(ConfigError, match="pretrain.self_train_rounds: .*not with pretrain.fit: ridge"):
        load_config("demo", sets=["pretrain.lock=both", "pretrain.fit=ridge", "pretrain.self_train_rounds=1"])
    with pytest.raises(ConfigError, match="pretrain.lock"):
        load_config("demo", sets=["pretrain.lock=trunk"])


# -- real towers ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fit_ridge_on_the_real_towers_uses_the_features_before_the_projections(one_thread):
    from test_real_towers import need_lite, need_minilm

    need_lite(0)
    need_minilm()
    from comkd.engine.lit import lock_towers
    from comkd.models import load_clip

    loaded = load_clip("real:tf_efficientnet_lite0+all-MiniLM-L6-v2", image_size=32)
    m = loaded.model
    frozen = lock_towers(m, "both")
    assert frozen == [m.visual, m.text]
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"visual.head.proj.weight", "text.proj.weight", "logit_scale"}
    _check_fit_ridge(loaded, _Shots(8, 32, ["tench", "goldfish"]), 0.1)


@pytest.mark.slow
def test_own_real_pipeline_on_a_handful_of_images(tmp_path, one_thread):
    """``comkd run --config own_real`` with the README's own-data flags on 3 CIFAR-10 classes (6
    pool, 2 shot and 2 test images each) at 32 px, one epoch per stage: the ridge-fitted teacher
    is saved and loads back whole through ``teacher.pretrained``, the student keeps its ImageNet
    tower, and teacher, undistilled and distilled student are all scored."""
    from test_real_pipeline import _run
    from test_real_towers import need_lite, need_minilm

    need_lite(0)
    need_lite(2)
    need_minilm()
    from experiments.own_folder import CIFAR, make_own_folder

    if not CIFAR.is_dir():
        pytest.skip(f"no CIFAR-10 images under {CIFAR} (COMKD_SHARED_DATA)")
    from comkd.engine.lit import trunk_features
    from comkd.models import load_clip

    root = make_own_folder(tmp_path / "own", ["airplane", "cat", "ship"], pool=6, shots=2, test=2)
    out = tmp_path / "run"
    _run(
        [
            *("run", "--config", "own_real", "--root", str(root / "my_images")),
            *(
                "--set",
                f"data.classes_file={root / 'names.txt'}",
                "--set",
                f"full.shots={root / 'labelled_few'}",
            ),
            *("--set", f"full.test={root / 'labelled_test'}", "--out-dir", str(out)),
            *("--set", "data.image_size=32", "--set", "progress=false"),
            *("--set", "train_teacher.optim.epochs=1", "--set", "distill.optim.epochs=1"),
            *("--set", "train_teacher.optim.batch_size=4", "--set", "distill.optim.batch_size=6"),
        ]
    )
    res = json.loads((out / "results.json").read_text())
    accs = res["datasets"]["unlabelled"]
    assert set(accs) == {"teacher", "student_zeroshot", "comkd"} and res["teacher_mode"] == "prompted"
    assert all(0.0 <= accs[k]["acc"][0] <= 100.0 for k in accs)
    saved = yaml_config(out / "comkd" / "config.yaml")
    assert saved["teacher"]["pretrained"] == str(out / "pretrain" / "teacher_clip.safetensors")
    assert saved["student"]["pretrained"] == "imagenet"
    assert not (out / "pretrain" / "student_clip.safetensors").exists()
    # the fitted teacher loads back whole: its image projection is the ridge fit, not the seeded draw
    fitted = load_clip(saved["teacher"]["model"], saved["teacher"]["pretrained"], image_size=32).model
    fresh = load_clip(saved["teacher"]["model"], image_size=32).model
    assert not torch.equal(fitted.visual.head.proj.weight, fresh.visual.head.proj.weight)
    assert torch.equal(fitted.text.proj.weight, fresh.text.proj.weight)
    assert torch.equal(fitted.visual.trunk.conv_stem.weight, fresh.visual.trunk.conv_stem.weight)
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(
            fitted.encode_image(x), trunk_features(fitted, x) @ fitted.visual.head.proj.weight.t()
        )


def yaml_config(path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())

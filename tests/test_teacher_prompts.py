"""Stage 1's Gaussian prompt aggregation (PromptSRC): the weights against the normal density, the
saved prompts against the weighted sum of every epoch's prompts, and resume mid-stage; the text
regulariser's target (PromptSRC's templates)."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import load_file
from scipy.stats import norm

from comkd.config import ConfigError, load_config
from comkd.engine import stages
from comkd.engine.tasks import TeacherPromptTask, gaussian_epoch_weights


@pytest.mark.parametrize(("epochs", "mean", "std"), [(20, 15, 1.0), (5, None, 2.0), (3, 1, 0.5)])
def test_gaussian_weights_are_the_normalised_normal_density(epochs, mean, std) -> None:
    e = np.arange(1, epochs + 1)
    ref = norm.pdf(e, loc=0.75 * epochs if mean is None else mean, scale=std)
    np.testing.assert_allclose(gaussian_epoch_weights(epochs, mean, std), ref / ref.sum(), rtol=1e-12)


def test_gpa_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="train_teacher.gpa_mean"):
        load_config("demo", sets=["train_teacher.gpa_mean=99"])
    with pytest.raises(
        ConfigError, match=r"train_teacher.gpa_mean: must be an epoch in \(0, 20\] \(gpa_epochs"
    ):
        load_config("full_vitl14_vitb16", sets=["train_teacher.gpa_mean=21", "train_teacher.optim.epochs=40"])
    with pytest.raises(ConfigError, match="train_teacher.gpa_epochs"):
        load_config("demo", sets=["train_teacher.gpa_epochs=0"])
    with pytest.raises(ConfigError, match="train_teacher.gpa_std"):
        load_config("demo", sets=["train_teacher.gpa_std=0"])
    with pytest.raises(ConfigError, match="prompt_averaging"):
        load_config("demo", sets=["train_teacher.prompt_averaging=mean"])


def _cfg(*extra: str):
    return load_config(
        "demo",
        sets=[
            "teacher.pretrained=none",
            "data.image_size=16",
            "train_teacher.optim.epochs=3",
            "train_teacher.optim.batch_size=16",
            "train_teacher.prompt_averaging=gaussian",
            "train_teacher.gpa_mean=2",
            "train_teacher.gpa_std=0.8",
            "progress=false",
            *extra,
        ],
    )


def test_saved_prompts_are_the_gaussian_average_of_every_epochs(tmp_path, monkeypatch, one_thread) -> None:
    seen: list[dict] = []
    original = TeacherPromptTask.on_epoch_end

    def spy(self, epoch):
        seen.append({k: v.detach().double().clone() for k, v in self.teacher.prompt_state_dict().items()})
        return original(self, epoch)

    monkeypatch.setattr(TeacherPromptTask, "on_epoch_end", spy)
    stages.run_train_teacher(_cfg(), tmp_path)
    saved = load_file(str(tmp_path / stages.TEACHER_PROMPTS))
    w = norm.pdf([1, 2, 3], loc=2, scale=0.8)
    w = w / w.sum()
    assert len(seen) == 3 and set(saved) == set(seen[0])
    for k, v in saved.items():
        ref = sum(wi * s[k] for wi, s in zip(w, seen, strict=True))
        torch.testing.assert_close(v.double(), ref, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(v.double(), seen[-1][k])  # not just the last epoch's prompts


def test_a_resumed_stage_averages_the_same_epochs(tmp_path, monkeypatch, one_thread) -> None:
    whole = tmp_path / "whole"
    stages.run_train_teacher(_cfg(), whole)
    cut = tmp_path / "cut"
    original = TeacherPromptTask.on_epoch_end

    class Killed(Exception):
        pass

    def die_in_epoch_2(self, epoch):  # epoch 1's checkpoint is on disk, epoch 2's is not
        if epoch == 1:
            raise Killed
        return original(self, epoch)

    monkeypatch.setattr(TeacherPromptTask, "on_epoch_end", die_in_epoch_2)
    with pytest.raises(Killed):
        stages.run_train_teacher(_cfg(), cut)
    monkeypatch.setattr(TeacherPromptTask, "on_epoch_end", original)
    stages.run_train_teacher(_cfg(), cut, resume=True)
    a, b = load_file(str(whole / stages.TEACHER_PROMPTS)), load_file(str(cut / stages.TEACHER_PROMPTS))
    for k in a:
        torch.testing.assert_close(a[k], b[k])


@pytest.mark.parametrize("preset", ["full_vitl14_vitb16", "b2n_vitl14_vitb16"])
def test_the_paper_pair_teacher_is_promptkds_promptsrc_recipe(preset) -> None:
    """PromptKD's configs/trainers/PromptSRC/vit_l14_c2_ep20_batch8_4+4ctx.yaml, value by value
    (both paper-pair presets: own data, and base-to-novel)."""
    tt = load_config(preset).train_teacher
    o = tt.optim
    assert (o.optimizer, o.lr, o.batch_size, o.epochs, o.warmup_epochs, o.warmup_lr) == (
        "sgd",
        0.005,
        8,
        20,
        1,
        1e-5,
    )
    assert (tt.prompt_averaging, tt.gpa_mean, tt.gpa_std, tt.gpa_epochs) == ("gaussian", 15, 1.0, 20)
    assert tt.resolved_gpa() == (15.0, 1.0)
    assert (tt.text_l1_weight, tt.image_l1_weight) == (25.0, 10.0)
    assert load_config().train_teacher.prompt_averaging == "none"  # the default stays the last epoch's


@pytest.mark.parametrize(
    "epochs, mean, std", [(1, 0.75, 0.05), (4, 3.0, 0.2), (20, 15.0, 1.0), (40, 30.0, 2.0)]
)
def test_the_paper_gaussian_follows_the_stages_epochs(epochs, mean, std) -> None:
    """N(15, 1) of 20 epochs is the same curve on any schedule: peak and spread scale with E, and
    config.yaml (resolve_recipe) holds them in the stage's own epochs."""
    from comkd.config_rules import resolve_recipe

    cfg = load_config("full_vitl14_vitb16", sets=[f"train_teacher.optim.epochs={epochs}"])
    assert cfg.train_teacher.resolved_gpa() == pytest.approx((mean, std))
    saved = resolve_recipe(cfg).train_teacher
    assert (saved.gpa_mean, saved.gpa_std, saved.gpa_epochs) == (
        pytest.approx(mean),
        pytest.approx(std),
        epochs,
    )
    assert saved.resolved_gpa() == pytest.approx((mean, std))  # rereading config.yaml changes nothing
    w = gaussian_epoch_weights(epochs, *cfg.train_teacher.resolved_gpa())
    e = np.arange(1, epochs + 1)
    ref = norm.pdf(e / epochs, loc=0.75, scale=0.05)  # the curve on the stage's fraction of epochs
    np.testing.assert_allclose(w, ref / ref.sum(), rtol=1e-9, atol=1e-300)
    assert load_config().train_teacher.resolved_gpa() == (15.0, 1.0)  # null: 0.75 E (of 20), std in epochs


# -- PromptSRC's text regulariser target ------------------------------------------------
def test_promptsrc_templates_are_shipped() -> None:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    from comkd.data import promptsrc_templates

    t = promptsrc_templates()
    assert len(t) == len(set(t)) == 60  # PromptSRC's IMAGENET_TEMPLATES
    assert t[0] == "a photo of a {}." and t[-1] == "itap of the {}."
    assert set(t) <= {f("{}") for f in OPENAI_IMAGENET_TEMPLATES}  # all from CLIP's 80 ImageNet prompts


def test_frozen_text_target_is_the_normalised_mean_of_unnormalised_features() -> None:
    import torch
    import torch.nn.functional as F

    from comkd.models import create_teacher

    torch.manual_seed(0)
    teacher = create_teacher("comkd-tiny-teacher").eval()
    names, templates = ["cat", "dog", "ship"], ["a photo of a {}.", "a sketch of the {}.", "itap of the {}."]
    tok = open_clip.get_tokenizer("comkd-tiny-teacher")
    with torch.no_grad():  # open_clip's own frozen text tower, not comkd's prompted encoder
        raw = torch.stack(
            [teacher.clip.encode_text(tok([t.format(c) for c in names])).float() for t in templates]
        )
    want = F.normalize(raw.mean(0), dim=-1)
    got = teacher.encode_templates(names, templates)
    assert torch.allclose(got, want, atol=1e-5)
    one_template_each = F.normalize(F.normalize(raw, dim=-1).mean(0), dim=-1)
    assert not torch.allclose(got, one_template_each, atol=1e-5)  # the old reading is a different target


@pytest.mark.parametrize("choice", ["promptsrc", "dataset"])
def test_stage1_regularises_towards_promptsrc_templates_by_default(monkeypatch, tmp_path, choice) -> None:
    from comkd.data import promptsrc_templates
    from comkd.data.builtin import DIGITS_TEMPLATE
    from comkd.engine import stages
    from comkd.engine.stages import run_train_teacher

    seen = {}

    class Stop(Exception):
        pass

    def task(teacher, classnames, templates, *a):
        seen["templates"] = list(templates)
        raise Stop

    monkeypatch.setattr(stages, "TeacherPromptTask", task)
    assert load_config().teacher_train.text_templates == "promptsrc"
    cfg = load_config("demo", sets=[f"teacher_train.text_templates={choice}"])
    with pytest.raises(Stop):
        run_train_teacher(cfg, tmp_path)
    assert seen["templates"] == (promptsrc_templates() if choice == "promptsrc" else [DIGITS_TEMPLATE])


def test_cross_depth_is_capped_at_a_small_towers_layers() -> None:
    from comkd.protocols.protocol import protocol_recipe

    tiny = protocol_recipe(load_config("demo"), "cross")  # comkd-tiny-student has 2 layers
    assert (tiny.student.vision_depth, tiny.distill.kd_weight) == (2, 1000.0)
    assert protocol_recipe(load_config(), "dg").student.vision_depth == 3  # ViT-B-16: 12 layers

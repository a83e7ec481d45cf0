"""Paper parity (issue 9, items 3-10): each reading checked against an independent computation
(open_clip's own tag metadata, PromptKD's scripts, METHOD.md's formulas)."""

from __future__ import annotations

import open_clip
import pytest
import yaml
from typer.testing import CliRunner

from comkd import cli
from comkd.config import load_config, save_config
from comkd.models import ModelError, load_clip, uses_quick_gelu
from comkd.models import backbones as B


# -- item 3: a pretrained tag's activation -------------------------------------------------------
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
    from comkd.engine.pipeline import build_student, load_student, save_student

    cfg = load_config("demo", sets=["student.quick_gelu=true"])
    student = build_student(cfg, 32, "cpu")
    cfg.student.quick_gelu = False  # the config no longer says so; the file must still know
    save_student(student, tmp_path / "s.safetensors", cfg, "comkd")
    assert uses_quick_gelu(load_student(tmp_path / "s.safetensors").visual)


# -- item 4: random weights only when asked for in so many words ---------------------------------
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
    r = CliRunner().invoke(cli.app, ["train-teacher", "--out", str(tmp_path), "--set", "progress=false"])
    assert r.exit_code == 1
    assert "ViT-L-14" in r.output and "none" in r.output and "Traceback" not in r.output

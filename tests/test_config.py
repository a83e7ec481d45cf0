"""Config: defaults < --config YAML < flags (< --set); strict keys and values; the resolved
config.yaml in the run folder re-runs the same run on its own; settings that would train silently
wrong or do nothing are refused naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from comkd import cli
from comkd.config import ConfigError, RunConfig, load_config, save_config, to_dict
from comkd.config_io import nest
from support import TINY_MODEL_ARGS, one_line_error

TINY_ARGS = TINY_MODEL_ARGS


def test_precedence_defaults_yaml_flags_sets(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text(
        yaml.safe_dump({"seed": 5, "distill": {"optim": {"lr": 0.1, "epochs": 7}, "temperature": 2.0}})
    )
    assert load_config().seed == 1 and load_config().distill.optim.lr == 0.005
    c = load_config(y)
    assert (c.seed, c.distill.optim.lr, c.distill.optim.epochs, c.distill.temperature) == (5, 0.1, 7, 2.0)
    assert c.distill.optim.momentum == 0.9  # untouched keys keep their defaults
    c = load_config(y, overrides={"distill": {"optim": {"lr": 0.2}}})
    assert (c.seed, c.distill.optim.lr, c.distill.optim.epochs) == (5, 0.2, 7)
    c = load_config(
        y, overrides={"distill": {"optim": {"lr": 0.2}}}, sets=["distill.optim.epochs=3", "seed=9"]
    )
    assert (c.seed, c.distill.optim.lr, c.distill.optim.epochs) == (9, 0.2, 3)  # --set over the file
    # a flag and --set on one key: refused (test_a_key_given_by_a_flag_and_by_set_to_two_values...)


def test_yaml_preset_chain(tmp_path):
    y = tmp_path / "child.yaml"
    y.write_text("preset: demo\nseed: 11\n")
    demo = load_config("demo")
    c = load_config(y)
    assert c.seed == 11 and c.teacher.model == demo.teacher.model and c.data == demo.data


def test_cli_flags_override_the_config_file(tmp_path, monkeypatch):
    """Through the real command: --config < named flags < --set."""

    seen: dict = {}

    def fake_run_distill(cfg, out_dir, resume=False, eval_fn=None, step0_fn=None):
        seen["cfg"], seen["resume"] = cfg, resume
        return dict.fromkeys(
            ("student", "alpha", "selected_epoch", "train_images", "trainable_params", "step0")
        )

    monkeypatch.setattr("comkd.protocols.runner.run_distill", fake_run_distill)
    y = tmp_path / "c.yaml"
    y.write_text(
        yaml.safe_dump({"seed": 5, "distill": {"method": "promptkd", "optim": {"lr": 0.1, "epochs": 7}}})
    )
    r = CliRunner().invoke(
        cli.app,
        [
            "distill",
            "--config",
            str(y),
            "--lr",
            "0.2",
            "--seed",
            "6",
            "--no-evaluate",
            "--set",
            "distill.optim.epochs=3",
            "--out-dir",
            str(tmp_path / "o"),
            "--resume",
        ],
    )
    assert r.exit_code == 0, r.output
    c = seen["cfg"]
    assert (c.seed, c.distill.optim.lr, c.distill.optim.epochs, c.distill.method) == (6, 0.2, 3, "promptkd")
    assert c.output_dir == str(tmp_path / "o") and seen["resume"] is True


@pytest.mark.parametrize(
    "sets, needles",
    [
        (["distill.optim.foo=1"], ["'distill.optim.foo'", "lr", "momentum", "warmup_epochs"]),
        (["nonsense=1"], ["'nonsense'", "distill", "seed"]),
        (["distill.method=bad"], ["distill.method", "'bad'", "comkd", "promptkd", "feature-mse"]),
        (["distill.optim.amp=maybe"], ["distill.optim.amp", "auto", "on", "off"]),
        (["distill.optim.optimizer=adam"], ["distill.optim.optimizer", "sgd", "adamw"]),
        (["seed=abc"], ["seed", "integer", "'abc'"]),
        (["distill.optim.lr=-1"], ["distill.optim.lr", "> 0"]),
        (["distill.optim.grad_accum=0"], ["distill.optim.grad_accum", "> 0"]),
        (["distill.optim.warmup_epochs=-1"], ["distill.optim.warmup_epochs", ">= 0", "sgd"]),
        (["pretrain.optim.warmup_frac=1"], ["pretrain.optim.warmup_frac", "[0, 1)", "adamw"]),
        (["seed=-1"], ["seed", "[0, 2**32 - 1]", "-1"]),
        ([f"seed={2**32}"], ["seed", "[0, 2**32 - 1]", str(2**32)]),
        (["progress=maybe"], ["progress", "true/false"]),
        (["data.fractions=[0.1,x]"], ["data.fractions[1]", "number"]),
        (["distill.optim=3"], ["distill.optim", "mapping", "lr"]),
    ],
)
def test_bad_keys_and_values_name_the_key_and_the_allowed_values(sets, needles):
    with pytest.raises(ConfigError) as e:
        load_config(sets=sets)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


@pytest.mark.parametrize("word", ["on", "off", "auto"])
def test_amp_on_and_off_are_the_words_not_yaml_booleans(tmp_path, word):
    """YAML 1.1 reads a bare on/off as true/false; amp's choices are the words."""
    assert load_config(sets=[f"distill.optim.amp={word}"]).distill.optim.amp == word
    y = tmp_path / "c.yaml"
    y.write_text(f"distill:\n  optim:\n    amp: {word}\n")
    assert load_config(y).distill.optim.amp == word


def test_bad_yaml_key_is_rejected_and_the_cli_exits_2(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("distill:\n  optim:\n    learning_rate: 0.1\n")
    with pytest.raises(
        ConfigError, match=r"unknown config key 'distill.optim.learning_rate'; allowed keys here: .*lr"
    ):
        load_config(y)
    r = CliRunner().invoke(cli.app, ["distill", "--config", str(y)])
    assert r.exit_code == 2 and "distill.optim.learning_rate" in r.output
    r = CliRunner().invoke(cli.app, ["distill", "--method", "bogus"])
    assert r.exit_code == 2 and "choose one of comkd, promptkd" in r.output
    r = CliRunner().invoke(cli.app, ["distill", "--config", str(tmp_path / "missing.yaml")])
    assert r.exit_code == 2 and "config file not found" in r.output and "demo" in r.output


def test_validation_applies_to_the_final_config_not_each_layer():
    # the flags put GPA's peak at epoch 30 (invalid with the default 20 epochs); --set then fixes it
    c = load_config(overrides={"train_teacher": {"gpa_mean": 30}}, sets=["train_teacher.optim.epochs=40"])
    assert (c.train_teacher.optim.epochs, c.train_teacher.gpa_mean) == (40, 30)


def test_the_largest_numpy_seed_is_taken():
    assert load_config(sets=[f"seed={2**32 - 1}"]).seed == 2**32 - 1


@pytest.mark.parametrize("seed", ["-1", str(2**40)])
def test_run_refuses_a_seed_outside_numpys_range_before_any_stage(tmp_path, seed):
    r = CliRunner().invoke(
        cli.app, ["run", "--config", "demo", "--seed", seed, "--out-dir", str(tmp_path / "r")]
    )
    assert (
        r.exit_code == 2 and "--seed: must be an integer in [0, 2**32 - 1]" in r.output and seed in r.output
    )
    assert not (tmp_path / "r").exists()


# -- schedules that follow the epochs --------------------------------------------------------
def test_a_warm_up_as_long_as_the_schedule_is_cut_to_leave_one_cosine_epoch():
    from comkd.config_rules import resolve_recipe
    from comkd.engine.schedule import lr_at

    c = load_config(sets=["distill.optim.epochs=1"])  # sgd, warmup_epochs 1 by default
    o = c.distill.optim
    assert (o.warmup_epochs, o.sgd_warmup_epochs) == (1, 0)
    assert lr_at(o, o.lr, 0, 0, 10) == pytest.approx(o.lr)  # epoch 0 trains at the full lr
    assert resolve_recipe(c).distill.optim.warmup_epochs == 0  # what config.yaml records
    long = load_config(sets=["distill.optim.epochs=5", "distill.optim.warmup_epochs=2"]).distill.optim
    assert [lr_at(long, long.lr, e, 0, 1) for e in range(3)] == pytest.approx(
        [long.warmup_lr, long.warmup_lr, long.lr]
    )  # an ordinary warm-up is unchanged


def test_the_adamw_recipe_runs_one_epoch():
    # the recommended stage 2 is AdamW: sgd's warmup_epochs is not its setting and is not checked
    c = load_config("demo", sets=["distill.optim.epochs=1"])
    assert (c.distill.optim.optimizer, c.distill.optim.epochs) == ("adamw", 1)


def test_saved_config_roundtrips_exactly(tmp_path):
    c = load_config("demo", sets=["seed=4", "distill.kd_weight=250", "data.fractions=[0.5,0.2,0.1,0.2]"])
    save_config(c, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert isinstance(again, RunConfig) and to_dict(again) == to_dict(c)
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.slow
def test_a_run_is_reproduced_from_its_config_yaml_alone(tmp_path):
    from safetensors.torch import load_file

    first = tmp_path / "first"
    r = CliRunner().invoke(
        cli.app,
        [
            "distill",
            *TINY_ARGS,
            "--epochs",
            "2",
            "--batch-size",
            "32",
            "--seed",
            "8",
            "--method",
            "promptkd",
            "--set",
            "distill.optim.lr=0.01",
            "--out-dir",
            str(first),
        ],
    )
    assert r.exit_code == 0, r.output
    saved = yaml.safe_load((first / "config.yaml").read_text())
    assert saved["seed"] == 8 and saved["distill"]["method"] == "promptkd"
    assert saved["distill"]["optim"]["lr"] == 0.01 and saved["output_dir"] == str(first)
    assert saved["teacher"]["model"] == "comkd-tiny-teacher" and saved["data"]["image_size"] == 16
    assert set(saved) == set(to_dict(RunConfig()))  # every key, resolved

    second = tmp_path / "second"
    r = CliRunner().invoke(
        cli.app, ["distill", "--config", str(first / "config.yaml"), "--out-dir", str(second)]
    )
    assert r.exit_code == 0, r.output
    a, b = load_file(str(first / "student.safetensors")), load_file(str(second / "student.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first_res, second_res = (json.loads((d / "results.json").read_text()) for d in (first, second))
    assert first_res.pop("student") == str(first / "student.safetensors")  # the one difference
    assert second_res.pop("student") == str(second / "student.safetensors") and first_res == second_res
    resaved = yaml.safe_load((second / "config.yaml").read_text())
    assert {**resaved, "output_dir": None} == {**saved, "output_dir": None}


# -- the stage-2 recipe switch -----------------------------------------------------------------
EIGHT_FLAGS = [
    "student.edu_mode=cosine",
    "student.projector_bn=frozen",
    "distill.projector_init=ridge",
    "distill.ifalign_on=projected",
    "distill.edu_lr_scale=1",
    "distill.optim.optimizer=adamw",
    "distill.optim.lr=1e-4",
    "distill.optim.weight_decay=0",
]


def _without_recipe_name(cfg: RunConfig) -> dict:
    d = to_dict(cfg)
    d["distill"].pop("recipe")
    return d


def test_recipe_recommended_equals_the_eight_flag_form():
    by_name = load_config(None, nest({"distill.recipe": "recommended"}))  # what `--recipe recommended` passes
    by_keys = load_config(None, sets=EIGHT_FLAGS)
    assert by_name.distill.recipe == "recommended" and by_keys.distill.recipe == "paper"
    assert _without_recipe_name(by_name) == _without_recipe_name(by_keys)
    assert _without_recipe_name(by_name) != _without_recipe_name(load_config())


def test_the_defaults_are_the_paper_recipe():
    assert to_dict(load_config()) == to_dict(load_config(None, sets=["distill.recipe=paper"]))
    from comkd.methods import RECIPES

    default = to_dict(RunConfig())
    for key, value in RECIPES["paper"].items():
        node = default
        for part in key.split("."):
            node = node[part]
        assert node == value, key


def test_explicit_keys_override_the_recipe_at_its_layer_and_above(tmp_path):
    c = load_config(None, nest({"distill.recipe": "recommended"}), sets=["distill.optim.lr=0.003"])
    assert (c.distill.optim.lr, c.student.edu_mode) == (0.003, "cosine")
    y = tmp_path / "c.yaml"  # a key beside the recipe in the same file wins over it
    y.write_text(yaml.safe_dump({"distill": {"recipe": "recommended", "edu_lr_scale": 0.1}}))
    c = load_config(y)
    assert (c.distill.edu_lr_scale, c.distill.projector_init) == (0.1, "ridge")
    # a recipe named by a later layer (the flag) overrides the file's keys, also a preset's
    c = load_config("demo", nest({"distill.recipe": "paper"}))
    assert (c.student.edu_mode, c.distill.optim.optimizer, c.distill.optim.lr) == ("paper", "sgd", 0.005)
    assert c.distill.optim.epochs == load_config("demo").distill.optim.epochs  # not a recipe key
    with pytest.raises(ConfigError, match="distill.recipe.*recommended"):
        load_config(None, sets=["distill.recipe=best"])


def test_presets_name_their_recipe_instead_of_spelling_its_keys():
    from comkd.config import PRESET_DIR, list_presets
    from comkd.methods import RECIPES

    for name in list_presets():
        raw = yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text())
        recipe = load_config(name).distill.recipe
        assert (raw.get("distill") or {}).get("recipe") == recipe or "preset" in raw, name
        for key, value in RECIPES[recipe].items():
            node = raw
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            # a recipe key spelled in a preset is a deliberate override, never the recipe's own value
            assert node is None or node != value, (name, key)


def test_saved_config_records_the_recipe_and_its_values(tmp_path):
    c = load_config("demo")
    save_config(c, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["distill"]["recipe"] == "recommended" and saved["student"]["edu_mode"] == "cosine"
    assert saved["distill"]["optim"]["optimizer"] == "adamw"
    assert to_dict(load_config(tmp_path / "config.yaml")) == to_dict(c)


def test_presets_are_listed_with_a_one_line_description():
    import comkd

    presets = comkd.list_presets()
    assert {"demo", "own_tiny", "full_vitl14_vitb16"} <= set(presets)
    assert all(len(d) > 20 and "\n" not in d for d in presets.values()), presets
    r = CliRunner().invoke(cli.app, ["presets"])
    assert r.exit_code == 0 and [ln.split()[0] for ln in r.output.splitlines()] == list(presets)
    assert presets["own_tiny"] in r.output


# -- settings that make training silently wrong -------------------------------------------
@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ("distill.optim.grad_clip=0", "distill.optim.grad_clip"),
        ("train_teacher.optim.grad_clip=-1", "train_teacher.optim.grad_clip"),
        ("distill.kd_weight=0", "distill.kd_weight"),
        ("distill.kd_weight=-5", "distill.kd_weight"),
        ("distill.temperature=0", "distill.temperature"),
        ("distill.align_weight=-1", "distill.align_weight"),
        ("log_every=0", "log_every"),
        ("ckpt_interval_s=-1", "ckpt_interval_s"),
        ("ckpt_interval_s=.nan", "ckpt_interval_s"),
        ("distill.optim.lr=.inf", "distill.optim.lr"),
        ("distill.optim.lr=.nan", "distill.optim.lr"),
        ("pretrain.optim.lr=1e39", "pretrain.optim.lr"),
        ("device=foo", "device"),
    ],
)
def test_settings_that_train_silently_wrong_are_refused(setting, key) -> None:
    from comkd.config import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(sets=[setting])
    assert str(err.value).startswith(key + ":")
    r = CliRunner().invoke(cli.app, ["distill", "--set", setting])
    one_line_error(r, key, code=2)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["pretrain", "--config", "demo", "--which", "teachers"], ["--which", "teachers"]),
        (["cache-teacher", "--config", "demo", "--views", "0"], ["--views", "0"]),
        (["cache-teacher", "--config", "demo", "--dtype", "float8"], ["--dtype", "float8"]),
        (["distill", "--config", "demo", "--device", "foo"], ["device", "foo"]),
    ],
)
def test_bad_command_line_values_are_refused(tmp_path, args, words) -> None:
    r = CliRunner().invoke(cli.app, [*args, "--out-dir", str(tmp_path / "o")])
    one_line_error(r, *words, code=2)
    assert not (tmp_path / "o").exists()


def test_a_yaml_parse_error_names_the_file_and_line(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("distill:\n  optim: {lr: 0.1\nseed: 2\n")
    r = CliRunner().invoke(cli.app, ["distill", "--config", str(bad)])
    one_line_error(r, "bad.yaml", "line 3", "not valid YAML", code=2)


# -- settings that would silently do nothing -----------------------------------------------
def test_select_promptkd_is_refused_without_an_evaluation_set(tmp_path) -> None:
    r = CliRunner().invoke(
        cli.app,
        [
            *("distill", "--config", "demo", "--set", "distill.select=promptkd", "--no-evaluate"),
            *("--out-dir", str(tmp_path / "d")),
        ],
    )
    assert r.exit_code == 1 and "distill.select" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "d").exists()  # refused before anything is written


def test_protocol_all_is_not_accepted() -> None:
    from comkd.config import ConfigError

    with pytest.raises(ConfigError, match="protocol: 'all' is not allowed"):
        load_config(sets=["protocol=all"])
    r = CliRunner().invoke(cli.app, ["run", "--protocol", "all"])
    assert r.exit_code == 2 and "protocol" in r.output and "KeyError" not in r.output


def test_a_key_given_by_a_flag_and_by_set_to_two_values_is_refused(tmp_path):
    with pytest.raises(
        ConfigError, match=r"teacher.model is given twice, by a flag \('ViT-B-32'\) and by --set"
    ):
        load_config(overrides={"teacher": {"model": "ViT-B-32"}}, sets=["teacher.model=ViT-L-14"])
    same = load_config(overrides={"teacher": {"model": "ViT-B-32"}}, sets=["teacher.model=ViT-B-32"])
    assert same.teacher.model == "ViT-B-32"  # the same value twice is no conflict
    old_name = ["teacher_train.optim.lr=0.01"]  # a section's earlier spelling is the same key
    with pytest.raises(ConfigError, match="train_teacher.optim.lr is given twice"):
        load_config(overrides={"train_teacher": {"optim": {"lr": 0.002}}}, sets=old_name)
    r = CliRunner().invoke(
        cli.app,
        [
            "distill",
            "--teacher",
            "ViT-B-32",
            "--set",
            "teacher.model=ViT-L-14",
            "--out-dir",
            str(tmp_path / "d"),
        ],
    )
    assert r.exit_code == 2 and "teacher.model is given twice" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "d").exists()


def test_each_allowed_value_is_written_once_and_a_rule_across_sections_holds() -> None:
    """The config's enumerated fields are typed with comkd.choices' Literals, the same objects the
    library checks against; the ridge warm start without frozen BatchNorm is refused (it spans the
    distill and student sections)."""
    import typing

    from comkd import choices
    from comkd.config import DistillConfig, StudentConfig
    from comkd.losses import IFALIGN_ON, IFALIGN_STATS, KD_REDUCTIONS

    student, distill = typing.get_type_hints(StudentConfig), typing.get_type_hints(DistillConfig)
    for hints, field, choice in (
        (student, "attend", choices.Attend),
        (student, "edu_mode", choices.EduMode),
        (student, "edu_scale", choices.EduScale),
        (student, "projector", choices.Projector),
        (student, "projector_bn", choices.ProjectorBN),
        (student, "scope", choices.Scope),
        (distill, "kd_reduction", choices.KdReduction),
        (distill, "ifalign_stats", choices.IfalignStats),
        (distill, "ifalign_on", choices.IfalignOn),
    ):
        assert hints[field] == choice, field
    assert (IFALIGN_ON, IFALIGN_STATS, KD_REDUCTIONS) == tuple(
        choices.values(c) for c in (choices.IfalignOn, choices.IfalignStats, choices.KdReduction)
    )
    with pytest.raises(
        ConfigError, match=r"^distill\.projector_init: ridge needs student\.projector_bn: frozen"
    ):
        load_config(sets=["distill.recipe=recommended", "student.projector_bn=train"])
    assert load_config(sets=["distill.recipe=recommended"]).student.projector_bn == "frozen"
    linear = load_config(
        sets=["distill.recipe=recommended", "student.projector_bn=train", "student.projector=linear"]
    )
    assert linear.distill.projector_init == "ridge"  # a linear projector has no BatchNorm to undo the fit


def test_the_development_configs_load_from_the_repository_and_ship_in_no_wheel() -> None:
    """The configs that read ``../shared`` live in ``experiments/configs`` (a ``preset:`` there names
    the file beside it); the package's presets hold no development path."""
    from comkd.config import PRESET_DIR

    here = Path(__file__).resolve().parents[1] / "experiments" / "configs"
    for f in sorted(here.glob("*.yaml")):
        cfg = load_config(str(f))
        assert "shared" in str(cfg.data.root), f
    paper = load_config(str(here / "cifar10_tiny_paper.yaml"))
    base = load_config(str(here / "cifar10_tiny.yaml"))
    assert paper.data == base.data and paper.student.scope == "prompts"
    assert not [p.name for p in PRESET_DIR.glob("*.yaml") if "../shared" in p.read_text()]
    package = PRESET_DIR.parent
    assert not [str(p) for p in package.rglob("*.py") if "../shared" in p.read_text()]

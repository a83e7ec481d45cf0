"""Teacher self-training on the unlabelled pool (comkd.engine.self_training)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from comkd.config import ConfigError, load_config
from comkd.engine.self_training import select_confident
from comkd.protocols.runner import run_protocol


def reference_select(probs: np.ndarray, per_class: int) -> tuple[list[int], list[int]]:
    """Plain-Python reading: for each class in order, the images predicted as it, sorted by
    descending confidence then ascending index, the first ``per_class`` of them."""
    idx, lab = [], []
    pred = [int(np.argmax(p)) for p in probs]
    for c in range(probs.shape[1]):
        mine = [i for i in range(len(probs)) if pred[i] == c]
        mine.sort(key=lambda i: (-float(probs[i].max()), i))
        for i in mine[:per_class]:
            idx.append(i)
            lab.append(c)
    return idx, lab


@pytest.mark.parametrize("per_class", [0, 1, 3, 50])
def test_select_confident_matches_a_plain_reference(per_class: int) -> None:
    g = torch.Generator().manual_seed(per_class)
    probs = torch.randn(40, 4, generator=g).mul(2).softmax(-1)
    probs[5] = probs[7]  # a tie: the lower index comes first
    idx, lab = select_confident(probs, per_class)
    ref_idx, ref_lab = reference_select(probs.numpy(), per_class)
    assert idx.tolist() == ref_idx and lab.tolist() == ref_lab
    assert (torch.bincount(lab, minlength=4) <= per_class).all()
    # every kept label is the model's arg-max, and nothing kept is less confident than a dropped one of its class
    conf, pred = probs.max(-1)
    assert (pred[idx] == lab).all()
    for c in range(4):
        kept = set(idx[lab == c].tolist())
        dropped = [i for i in range(40) if pred[i] == c and i not in kept]
        if kept and dropped:
            assert min(conf[list(kept)]) >= max(conf[dropped])


def test_select_confident_is_class_balanced_even_when_one_class_dominates() -> None:
    probs = torch.tensor([[0.9, 0.1]] * 8 + [[0.4, 0.6]] * 2)
    idx, lab = select_confident(probs, 3)
    assert lab.tolist() == [0, 0, 0, 1, 1] and idx.tolist() == [0, 1, 2, 8, 9]
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        select_confident(probs[0], 3)


@pytest.mark.parametrize(
    "sets, needle",
    [
        (["pretrain.self_train_rounds=-1"], "pretrain.self_train_rounds"),
        (["pretrain.self_train_epochs=0"], "pretrain.self_train_epochs"),
        (["pretrain.self_train_keep=0"], "pretrain.self_train_keep"),
        (["pretrain.self_train_keep=1.5"], "pretrain.self_train_keep"),
    ],
)
def test_bad_self_training_settings_name_the_key(sets, needle) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(sets=sets)


def _folder(root, n_per_class: int, classes: list[str], flat: bool):
    """Tiny images, one solid colour per class (so a tower can learn them)."""
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
    k = 0
    rng = np.random.default_rng(0)
    for c in classes:
        d = root if flat else root / c
        d.mkdir(parents=True, exist_ok=True)
        for _ in range(n_per_class):
            px = np.clip(np.array(colours[c]) + rng.integers(-20, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(d / f"img{k:04d}.png")
            k += 1
    return root


def test_own_data_run_self_trains_the_teacher_on_the_pool(tmp_path) -> None:
    classes = ["red", "green", "blue"]
    (tmp_path / "names.txt").write_text("\n".join(classes) + "\n")
    pool = _folder(tmp_path / "pool", 12, classes, flat=True)
    shots = _folder(tmp_path / "shots", 6, classes, flat=False)
    cfg = load_config(
        "own_tiny",
        sets=[
            f"data.root={pool}",
            f"data.classes_file={tmp_path / 'names.txt'}",
            f"full.shots={shots}",
            "pretrain.optim.epochs=1",
            "pretrain.student_epochs=1",
            "pretrain.student_shots=6",
            "pretrain.self_train_rounds=2",
            "pretrain.self_train_keep=0.5",
            "pretrain.self_train_epochs=1",
            "train_teacher.optim.epochs=2",
            "distill.optim.epochs=1",
            "progress=false",
        ],
    )
    run_protocol(cfg, tmp_path / "run", methods=["comkd"])
    res = json.loads((tmp_path / "run" / "pretrain" / "results.json").read_text())
    rounds = res["teacher"]["self_training"]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:  # 36 pool images, 3 classes, keep half: at most 6 per predicted class
        assert r["pool_images"] == 36 and 0 < r["pseudo_labelled"] == sum(r["per_class"]) <= 18
        assert max(r["per_class"]) <= 6
    for r in (1, 2):  # each round trained in its own folder (so a resumed run continues there);
        # the finished stage's checkpoints are deleted, its records stay
        assert (tmp_path / "run" / "pretrain" / "teacher" / f"self_train_{r}").is_dir()
    assert not list((tmp_path / "run").rglob("checkpoint*.pt"))
    assert "self_training" not in res["student"]  # only the teacher self-trains

"""Tests for the teacher image-feature cache (u_t): comkd.engine.cache_format, cache_build, cache_read.

Tiny models on CPU, the embedded digits (a 48-item slice of the train split, so a cache builds
in about a second).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from comkd.config import OptimConfig, load_config
from comkd.data import build_dataset, build_transform, derive_view_seed
from comkd.data.dataset import ImageDataset
from comkd.engine import cache_read
from comkd.engine.cache_build import build_teacher_cache
from comkd.engine.cache_format import StaleCacheError, read_cache_info, text_features_key
from comkd.engine.cache_read import CachedTeacherOutputs
from comkd.engine.distill import run_distill
from comkd.engine.loop import fit
from comkd.engine.stages import run_cache_teacher
from comkd.engine.tasks import DistillTask, TeacherOutputs
from comkd.losses import build_loss
from comkd.models import TINY_STUDENT, TINY_TEACHER, create_student, create_teacher
from comkd.models.identity import teacher_key
from support import TINY_SETS

ITEMS = 48
SEED = 1


def digits(
    split: str = "train", image_size: int = 32, view_seed: int | None = SEED, items: int = ITEMS
) -> ImageDataset:
    ds = build_dataset(
        "digits",
        split=split,
        train_transform=build_transform(image_size, train=True),
        view_seed=view_seed,
        unlabelled=True,
    )
    ds.data = ds.data[:items]
    return ds


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return create_teacher(TINY_TEACHER)


@pytest.fixture(scope="module")
def student_spec():
    return create_student(TINY_STUDENT, teacher_dim=128).preprocess


@pytest.fixture(scope="module")
def built(teacher, student_spec, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cache") / "teacher.tcache"
    return build_teacher_cache(
        teacher,
        digits(),
        path,
        views=2,
        seed=SEED,
        batch_size=16,
        device="cpu",
        student_spec=student_spec,
        progress=False,
    )


def batch_of(ds: ImageDataset, epoch: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    ds.set_epoch(epoch)
    items = [ds[i] for i in range(ds.__len__() - n, ds.__len__())]
    return torch.stack([x for x, _, _ in items]), torch.tensor([i for _, _, i in items])


# -- u_t cache ---------------------------------------------------------------------------------
def test_cached_features_equal_online_teacher(teacher, student_spec, built):
    ds = digits()
    cached = CachedTeacherOutputs.open(
        built, teacher=teacher, dataset=ds, device="cpu", student_spec=student_spec
    )
    online = TeacherOutputs(teacher, student_spec)
    assert (cached.views, cached.items, cached.dim) == (2, ITEMS, 128)
    for epoch in (0, 1, 2):  # epoch 2 replays view 0: the dataset was told to cycle by open()
        images, idx = batch_of(ds, epoch)
        expect_seed = derive_view_seed(SEED, epoch % 2, int(idx[0]))
        assert torch.equal(images[0], ds.get_view(int(idx[0]), expect_seed))
        u_c, u_o = cached(images, idx, epoch), online(images, idx, epoch)
        assert u_c.dtype == torch.float32 and u_c.shape == (16, 128)
        torch.testing.assert_close(u_c, u_o, rtol=1e-3, atol=2e-3)
        torch.testing.assert_close(u_c.norm(dim=-1), torch.ones(16), rtol=0, atol=2e-3)
    # the whole-view-in-memory path (default on accelerators) reads the same rows
    preloaded = CachedTeacherOutputs.open(
        built, teacher=teacher, dataset=digits(), device="cpu", preload_view=True
    )
    assert preloaded.preload_view and not cached.preload_view
    for epoch in (0, 1, 2):
        images, idx = batch_of(ds, epoch)
        assert torch.equal(preloaded(images, idx, epoch), cached(images, idx, epoch))
    # the other view really is another view
    images, idx = batch_of(ds, 0)
    assert not torch.allclose(cached(images, idx, 0), cached(images, idx, 1), atol=1e-2)


def test_header_and_teacher_free_use(teacher, built):
    info = read_cache_info(built)
    h = info.header
    assert info.shape == (2, ITEMS, 128) and info.dtype == "float16"
    assert h["seed"] == SEED and h["teacher"]["model"] == TINY_TEACHER
    assert h["transform"] == build_transform(32, train=True).fingerprint
    assert h["dataset"]["items"] == ITEMS and "labels" not in h["dataset"]
    # no teacher needed: the key is enough to check identity, W and s_t come from the file
    cached = CachedTeacherOutputs.open(
        built, teacher_key=teacher_key(teacher), dataset=digits(), device="cpu"
    )
    w = teacher.class_text_features(digits().full_classnames)
    torch.testing.assert_close(cached.text_features, w.float())
    assert cached.classnames == digits().full_classnames
    assert cached.logit_scale == pytest.approx(float(teacher.logit_scale))
    assert cached.teacher_key == h["teacher"]["key"] == teacher_key(teacher)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 8e-3)])
def test_other_storage_dtypes(teacher, student_spec, tmp_path, dtype, atol):
    ds = digits(items=16)
    p = build_teacher_cache(
        teacher,
        ds,
        tmp_path / "c",
        views=1,
        seed=SEED,
        batch_size=8,
        device="cpu",
        dtype=dtype,
        progress=False,
    )
    images, idx = batch_of(ds, 0, n=8)
    u = CachedTeacherOutputs.open(p, teacher=teacher, dataset=ds, device="cpu")(images, idx, 0)
    torch.testing.assert_close(u, TeacherOutputs(teacher, student_spec)(images, idx, 0), rtol=0, atol=atol)


STALE_CASES = {
    "teacher weights": "other teacher weights",
    "teacher prompts": "other teacher prompts",
    "teacher key": "other teacher (key)",
    "data: other split": "other data",
    "data: fewer items": "other data (items)",
    "transform: other image size": "other transform",
    "seed": "other seed",
    "no view seed": "other seed",
}


@pytest.mark.parametrize("case", list(STALE_CASES))
def test_stale_cache_is_refused(teacher, built, case):
    t, ds, key = teacher, digits(), None
    if case == "teacher weights":
        t = copy.deepcopy(teacher)
        with torch.no_grad():
            t.clip.visual.conv1.weight.add_(1e-3)
    elif case == "teacher prompts":
        t = copy.deepcopy(teacher)
        with torch.no_grad():
            t.visual.prompts.mul_(1.5)
    elif case == "teacher key":
        t, key = None, "0" * 64
    elif case == "data: other split":
        ds = digits(split="val")
    elif case == "data: fewer items":
        ds = digits(items=ITEMS - 1)
    elif case == "transform: other image size":
        ds = digits(image_size=24)
    elif case == "seed":
        ds = digits(view_seed=SEED + 1)
    elif case == "no view seed":
        ds = digits(view_seed=None)
    with pytest.raises(StaleCacheError, match=STALE_CASES[case].replace("(", r"\(").replace(")", r"\)")) as e:
        CachedTeacherOutputs.open(built, teacher=t, teacher_key=key, dataset=ds, device="cpu")
    assert isinstance(e.value, ValueError) and "rebuild" in str(e.value)


def test_missing_truncated_and_foreign_files(built, tmp_path):
    with pytest.raises(FileNotFoundError, match="comkd cache-teacher"):
        read_cache_info(tmp_path / "nope.tcache")
    cut = tmp_path / "cut.tcache"
    cut.write_bytes(built.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        CachedTeacherOutputs.open(cut, dataset=digits(), device="cpu")
    other = tmp_path / "other.bin"
    other.write_bytes(b"x" * 100)
    with pytest.raises(ValueError, match="not a comkd teacher cache"):
        read_cache_info(other)
    assert not list(built.parent.glob(".*tmp*")), "temporary files left behind"


def test_failed_build_leaves_no_file(teacher, tmp_path):
    ds = digits(items=8)
    ds.data[3] = type(ds.data[3])("digits://999999", 0, "zero")  # unreadable item
    with pytest.raises(Exception, match="out of range"):
        build_teacher_cache(
            teacher, ds, tmp_path / "c", views=1, seed=SEED, batch_size=4, device="cpu", progress=False
        )
    assert list(tmp_path.iterdir()) == []


# -- W's key ------------------------------------------------------------------------------------
def test_text_features_key_follows_prompts_class_names_and_weights(teacher):
    t = copy.deepcopy(teacher)
    names = digits().full_classnames
    key = text_features_key(t, names)
    with torch.no_grad():
        t.text.ctx.add_(0.1)  # new prompts: new key
    key2 = text_features_key(t, names)
    assert key2 != key

    # other class names and frozen weights each change the key
    assert text_features_key(t, names[:5]) != key2
    with torch.no_grad():
        t.clip.ln_final.weight.mul_(1.01)
    assert text_features_key(t, names) != key2


# -- distillation through fit ------------------------------------------------------------------
def _distill(teacher, outputs_for, tmp: Path, epochs: int) -> list[dict]:
    torch.manual_seed(3)
    student = create_student(TINY_STUDENT, teacher_dim=teacher.embed_dim)
    ds = digits()
    w = teacher.class_text_features(ds.full_classnames)
    student.set_text_features(w, ds.full_classnames)
    outputs = outputs_for(ds, student)
    task = DistillTask(student, outputs, w, float(teacher.logit_scale), build_loss("comkd"))
    cfg = OptimConfig(epochs=epochs, warmup_epochs=0, batch_size=16, lr=0.05, amp="off")
    return fit(task, ds, cfg, out_dir=tmp, seed=SEED, device=torch.device("cpu"), progress=False).history


def test_distillation_with_cache_matches_online(teacher, built, tmp_path):
    def online(ds, student):
        cache_read.replay_cached_views(ds, 2)  # same views as the cached run, epoch 2 = view 0
        return TeacherOutputs(teacher, student.preprocess)

    def cached(ds, student):
        return CachedTeacherOutputs.open(built, teacher=teacher, dataset=ds, device="cpu")

    h_on = _distill(teacher, online, tmp_path / "on", epochs=3)
    h_ca = _distill(teacher, cached, tmp_path / "ca", epochs=3)
    assert len(h_on) == len(h_ca) == 3
    for a, b in zip(h_on, h_ca, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3, abs=1e-4)
        assert a["kd"] == pytest.approx(b["kd"], rel=1e-3, abs=1e-4)
        assert a["align"] == pytest.approx(b["align"], rel=1e-3, abs=1e-5)


# -- a teacher cache from other teacher files --------------------------------------------
def test_teacher_cache_from_other_teacher_weights_or_prompts_is_refused(tmp_path, tiny_teacher_files) -> None:
    from comkd.engine.cache_format import StaleCacheError, read_cache_info

    f = tiny_teacher_files
    sets = [*TINY_SETS, "distill.optim.epochs=1", "distill.optim.warmup_epochs=0"]
    cfg = load_config(
        "demo", sets=[*sets, f"teacher.pretrained={f['weights_a']}", f"teacher.prompts={f['prompts_a']}"]
    )
    info = run_cache_teacher(cfg, tmp_path / "cache", views=1)
    header = read_cache_info(info["cache"]).header
    assert header["teacher_files"]["teacher.pretrained"].startswith("sha256:")
    for key, other in (("teacher.pretrained", f["weights_b"]), ("teacher.prompts", f["prompts_b"])):
        bad = load_config(
            "demo",
            sets=[
                *sets,
                f"teacher.pretrained={f['weights_a']}",
                f"teacher.prompts={f['prompts_a']}",
                f"{key}={other}",
                f"distill.teacher_cache={info['cache']}",
            ],
        )
        with pytest.raises(StaleCacheError) as err:
            run_distill(bad, tmp_path / key)
        assert key in str(err.value)
        assert ("teacher.prompts" if key == "teacher.pretrained" else "teacher.pretrained") not in str(
            err.value
        )
    # the same files under another path are the same teacher: accepted
    copy = tmp_path / "moved.safetensors"
    copy.write_bytes(f["prompts_a"].read_bytes())
    ok = load_config(
        "demo",
        sets=[
            *sets,
            f"teacher.pretrained={f['weights_a']}",
            f"teacher.prompts={copy}",
            f"distill.teacher_cache={info['cache']}",
        ],
    )
    assert run_distill(ok, tmp_path / "ok")["train_images"] > 0


# -- a crafted or damaged header: one line naming the file and the field ----------------------
def _with_header(built: Path, dst: Path, edit=None, *, raw: bytes | None = None, length: int | None = None):
    """``built`` with its header replaced: ``edit(header)``'s result, or ``raw`` bytes, under the
    recorded ``length`` when given (the data after the header is kept)."""
    import struct

    from comkd.engine.cache_format import MAGIC, encode_header

    info = read_cache_info(built)
    data = built.read_bytes()[info.data_offset :]
    if raw is None:
        head, _ = encode_header(edit(copy.deepcopy(info.header)))
    else:
        head = MAGIC + struct.pack("<Q", len(raw)) + raw
    if length is not None:
        head = head[: len(MAGIC)] + struct.pack("<Q", length) + head[len(MAGIC) + 8 :]
    dst.write_bytes(head + data)
    return dst


def _drop(*keys):
    def edit(h):
        obj = h
        for k in keys[:-1]:
            obj = obj[k]
        del obj[keys[-1]]
        return h

    return edit


def _set(value, *keys):
    def edit(h):
        obj = h
        for k in keys[:-1]:
            obj = obj[k]
        obj[keys[-1]] = value
        return h

    return edit


CRAFTED_HEADERS = {
    "huge length": (dict(raw=b"{}", length=2**62), "header length 4611686018427387904 is more than the"),
    "a list": (dict(raw=b"[1, 2]"), "teacher-cache header must be a JSON object, got list"),
    "a string": (dict(raw=b'"header"'), "teacher-cache header must be a JSON object, got str"),
    "not json": (dict(raw=b"{oops"), "teacher-cache header is not valid JSON"),
    "deep": (dict(raw=b"[" * 30000 + b"]" * 30000), "teacher-cache header is nested deeper than 16 levels"),
    "no views": (dict(edit=_drop("views")), "teacher-cache header has no field views"),
    "no teacher key": (dict(edit=_drop("teacher", "key")), "teacher-cache header has no field teacher.key"),
    "no items": (dict(edit=_drop("dataset", "items")), "has no field dataset.items"),
    "views a string": (
        dict(edit=_set("2", "views")),
        "field views must be an integer in 1..1048576, got '2'",
    ),
    "negative dim": (dict(edit=_set(-1, "dim")), "field dim must be an integer in 1..65536, got -1"),
    "teacher a list": (dict(edit=_set([], "teacher")), "field teacher must be a JSON object, got []"),
    "unknown dtype": (dict(edit=_set("int8", "dtype")), "field dtype must be one of"),
    "names not strings": (
        dict(edit=_set([1, 2], "text_features", "classnames")),
        "field text_features.classnames holds 1, not a class name",
    ),
    "scale not a number": (dict(edit=_set("1e400", "teacher", "logit_scale")), "field teacher.logit_scale"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED_HEADERS))
def test_a_crafted_cache_header_is_one_line_naming_the_file_and_field(built, tmp_path, case) -> None:
    from typer.testing import CliRunner

    from comkd import cli
    from support import one_line_error

    how, words = CRAFTED_HEADERS[case]
    bad = _with_header(
        built, tmp_path / "crafted.tcache", how.get("edit"), raw=how.get("raw"), length=how.get("length")
    )
    with pytest.raises(ValueError, match="crafted.tcache") as err:
        read_cache_info(bad)
    assert words in str(err.value) and "\n" not in str(err.value)
    r = CliRunner().invoke(
        cli.app,
        ["distill", "--config", "demo", "--teacher-cache", str(bad), "--out-dir", str(tmp_path / "run")],
    )
    one_line_error(r, "crafted.tcache", words)


def test_a_cache_cut_inside_its_header_length_is_one_line(tmp_path) -> None:
    from comkd.engine.cache_format import MAGIC

    bad = tmp_path / "cut.tcache"
    bad.write_bytes(MAGIC + b"\x01\x02")
    with pytest.raises(ValueError, match=r"cut\.tcache: teacher cache ends inside its header length"):
        read_cache_info(bad)


def test_a_second_cache_teacher_into_the_same_folder_is_refused_unless_overwrite(tmp_path) -> None:
    from typer.testing import CliRunner

    from comkd import cli
    from support import TINY_MODEL_ARGS

    args = ["cache-teacher", *TINY_MODEL_ARGS, "--views", "1", "--out-dir", str(tmp_path)]
    r = CliRunner().invoke(cli.app, args)
    assert r.exit_code == 0, r.output
    first = (tmp_path / "teacher_cache.bin").read_bytes()
    r = CliRunner().invoke(cli.app, [*args[:-2], "--seed", "2", "--out-dir", str(tmp_path)])
    assert r.exit_code == 1 and f"{tmp_path} holds a finished run (teacher_cache.bin)" in r.output
    assert (tmp_path / "teacher_cache.bin").read_bytes() == first  # the first cache is untouched
    r = CliRunner().invoke(cli.app, [*args, "--overwrite"])
    assert r.exit_code == 0, r.output


# -- integrity: corrupted bytes are refused, never trained on ----------------------------------
def test_row_checksums_equal_a_plain_python_sum_and_catch_any_one_word_change():
    from comkd.engine.cache_format import row_checksums

    rng = np.random.default_rng(0)
    rows = rng.standard_normal((5, 7)).astype(np.float16)  # 7 half-floats: an odd row length
    words = rows.view(np.uint16)
    ref = [sum((2 * j + 1) * int(w) for j, w in enumerate(row)) % 2**32 for row in words]
    assert row_checksums(rows).tolist() == ref
    for j in range(7):
        for bit in (0, 7, 15):
            bad = words.copy()
            bad[2, j] ^= 1 << bit
            assert row_checksums(bad.view(np.float16))[2] != ref[2], (j, bit)
    assert row_checksums(np.zeros_like(rows))[0] != ref[0]  # a zeroed row


def _damaged(built: Path, tmp_path: Path, offset_of, length: int, value: bytes | None = None) -> Path:
    """A copy of ``built`` with ``length`` bytes at ``offset_of(info)`` zeroed (or xor-ed by value)."""
    import shutil

    bad = tmp_path / "bad.tcache"
    shutil.copy(built, bad)
    at = offset_of(read_cache_info(bad))
    with open(bad, "r+b") as f:
        f.seek(at)
        old = f.read(length)
        f.seek(at)
        f.write(bytes(a ^ b for a, b in zip(old, value, strict=True)) if value else bytes(length))
    return bad


@pytest.mark.parametrize(
    "part, offset_of, length, value, needle",
    [
        (
            "features zeroed",
            lambda i: i.data_offset + 3 * 256,
            256,
            None,
            "view 0, item 3 does not match its checksum",
        ),
        (
            "one feature byte flipped",
            lambda i: i.data_offset + 40,
            1,
            b"\x10",
            "view 0, item 0 does not match",
        ),
        (
            "W zeroed",
            lambda i: i.text_offset,
            512,
            None,
            "W or the row checksums do not match the file's digest",
        ),
        ("a checksum flipped", lambda i: i.checksum_offset + 4, 1, b"\x01", "do not match the file's digest"),
        ("the digest flipped", lambda i: i.digest_offset, 1, b"\x80", "do not match the file's digest"),
    ],
)
def test_a_corrupted_cache_is_refused_naming_the_file_and_part(
    teacher, built, tmp_path, part, offset_of, length, value, needle
):
    from comkd.engine.cache_read import CorruptCacheError

    bad = _damaged(built, tmp_path, offset_of, length, value)
    with pytest.raises(CorruptCacheError, match=needle) as e:
        cached = CachedTeacherOutputs.open(bad, teacher=teacher, dataset=digits(), device="cpu")
        cached(None, torch.arange(ITEMS), 0)  # a run reads every row of view 0 in its first epoch
    assert str(bad) in str(e.value) and "rebuild" in str(e.value), part


def test_a_cache_damaged_or_cut_while_a_run_reads_it_ends_in_one_line(teacher, built, tmp_path):
    import shutil

    from comkd.engine.cache_read import CorruptCacheError

    live = tmp_path / "live.tcache"
    shutil.copy(built, live)
    cached = CachedTeacherOutputs.open(live, teacher=teacher, dataset=digits(), device="cpu")
    assert cached(None, torch.arange(8), 0).shape == (8, 128)  # reads fine
    info = read_cache_info(live)
    with open(live, "r+b") as f:  # another process zeroes item 5 of view 1 mid-run
        f.seek(info.data_offset + (ITEMS + 5) * 128 * 2)
        f.write(bytes(256))
    cached(None, torch.arange(8), 0)  # view 0 is intact
    with pytest.raises(CorruptCacheError, match="view 1, item 5 does not match its checksum"):
        cached(None, torch.arange(8), 1)
    os.truncate(live, info.data_offset + 100)  # then cuts the file: the map must not be touched
    with pytest.raises(CorruptCacheError, match=r"shrank from \d+ to \d+ bytes while this run read it"):
        cached(None, torch.arange(8), 0)
    cached.close()


def test_distill_from_a_corrupted_cache_is_one_line(tmp_path, tiny_teacher_files):
    from typer.testing import CliRunner

    from comkd import cli

    f = tiny_teacher_files
    sets = [*TINY_SETS, "distill.optim.epochs=1", "distill.optim.warmup_epochs=0"]
    sets += [f"teacher.pretrained={f['weights_a']}", f"teacher.prompts={f['prompts_a']}"]
    built = Path(run_cache_teacher(load_config("demo", sets=sets), tmp_path / "cache", views=1)["cache"])
    for name, offset_of in (("W", lambda i: i.text_offset), ("features", lambda i: i.data_offset)):
        bad = _damaged(built, tmp_path, offset_of, 256)
        args = ["distill", "--config", "demo", "--teacher-cache", str(bad), "--out-dir", str(tmp_path / name)]
        r = CliRunner().invoke(cli.app, [*args, *(a for x in sets for a in ("--set", x))])
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        assert f"teacher cache {bad}" in r.output and ("digest" if name == "W" else "checksum") in r.output
        assert not (tmp_path / name / "student.safetensors").exists()  # no student from bad features

"""Tests for comkd.data on the real images under shared/data (COMKD_SHARED_DATA) and in-memory digits."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from comkd import cli
from comkd.config import load_config
from comkd.data import (
    DATASETS,
    DataError,
    Datum,
    ImageDataset,
    base_novel_split,
    build_dataset,
    build_transform,
    few_shot,
    load_splits,
    read_split_file,
    subsample_classes,
    transform_fingerprint,
)
from comkd.engine.builders import build_student, make_dataset
from support import one_line_error

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("COMKD_SHARED_DATA", REPO.parent / "shared" / "data"))
DTD10 = SHARED / "dtd10"
DTD10_SPLIT = DTD10 / "split_coop_subset.json"

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared data folder {SHARED} is absent")

DTD10_NAMES = [
    "banded",
    "blotchy",
    "braided",
    "bubbly",
    "bumpy",
    "chequered",
    "cobwebbed",
    "cracked",
    "crosshatched",
    "crystalline",
]


def dtd10(split: str = "train", **kw) -> ImageDataset:
    return build_dataset("dtd", root=str(DTD10), split=split, split_file=str(DTD10_SPLIT), **kw)


def make_dtd_like(tmp: Path, entries: list[tuple[str, int, str]], files: dict[str, bytes]) -> Path:
    """A DTD-layout folder in tmp with the given split entries and image bytes; returns the split file."""
    for rel, data in files.items():
        p = tmp / "images" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    (tmp / "images").mkdir(exist_ok=True)
    split = tmp / "split.json"
    split.write_text(json.dumps({"train": [list(e) for e in entries], "val": [], "test": []}))
    return split


# -- CoOp loaders ----------------------------------------------------------------------------------
@needs_shared
def test_dtd10_split_counts_names_and_template():
    counts = {s: len(dtd10(s)) for s in ("train", "val", "test")}
    assert counts == {"train": 600, "val": 240, "test": 360}
    ds = dtd10("train")
    assert ds.classnames == DTD10_NAMES
    assert ds.templates == ["{} texture."]
    assert sorted(set(ds.labels)) == list(range(10))
    assert all(os.path.isabs(d.path) and d.classname == DTD10_NAMES[d.label] for d in ds.data)


@needs_shared
def test_dtd10_base_novel():
    base = dtd10("test", subsample="base")
    novel = dtd10("test", subsample="novel")
    assert base.classnames == DTD10_NAMES[:5] and novel.classnames == DTD10_NAMES[5:]
    assert sorted(set(base.labels)) == list(range(5)) and sorted(set(novel.labels)) == list(range(5))
    assert base.class_indices == [0, 1, 2, 3, 4] and novel.class_indices == [5, 6, 7, 8, 9]
    assert len(base) + len(novel) == 360
    assert all(d.classname == novel.classnames[d.label] for d in novel.data)


def test_base_novel_odd_class_count():
    classnames = ["a", "b", "c", "d", "e"]
    data = [Datum(f"x{i}", i, c) for i, c in enumerate(classnames)]
    assert subsample_classes(classnames, "base") == [0, 1, 2]
    d, names, idx = base_novel_split(data, classnames, "novel")
    assert names == ["d", "e"] and idx == [3, 4] and [x.label for x in d] == [0, 1]
    assert [x.classname for x in d] == ["d", "e"]
    with pytest.raises(DataError, match="subsample"):
        subsample_classes(classnames, "middle")


COOP_FILES = {
    "EuroSAT": 10,
    "Caltech101": 100,
    "OxfordPets": 37,
    "OxfordFlowers": 102,
    "StanfordCars": 196,
    "UCF101": 101,
    "DescribableTextures": 47,
}


@needs_shared
@pytest.mark.parametrize("name,n_classes", sorted(COOP_FILES.items()))
def test_coop_split_files_parse(name: str, n_classes: int):
    splits = read_split_file(str(SHARED / "coop_splits" / f"split_zhou_{name}.json"), "/img")
    labels = {d.label for items in splits.values() for d in items}
    assert labels == set(range(n_classes))
    assert all(len(splits[k]) > 0 for k in ("train", "val", "test"))
    assert splits["train"][0].path.startswith("/img/")
    assert all("_" not in d.classname for d in splits["train"])


@needs_shared
def test_eurosat_names_are_coop_names():
    splits = read_split_file(str(SHARED / "coop_splits" / "split_zhou_EuroSAT.json"), "/img")
    names = dict(sorted({d.label: d.classname for d in splits["test"]}.items()))
    assert names[0] == "Annual Crop Land" and names[9] == "Sea or Lake" and len(names) == 10


@needs_shared
def test_flowers_names_from_cat_to_name(tmp_path: Path):
    root = tmp_path / "oxford_flowers"
    (root / "jpg").mkdir(parents=True)
    shutil.copy(SHARED / "coop_splits" / "split_zhou_OxfordFlowers.json", root)
    cat = json.loads((SHARED / "coop_splits" / "cat_to_name.json").read_text())
    cat["1"] = "renamed primrose"
    (root / "cat_to_name.json").write_text(json.dumps(cat))
    splits = load_splits("oxford_flowers", str(tmp_path))
    assert len(splits.classnames) == 102 and splits.classnames[0] == "renamed primrose"
    assert splits.templates == ["a photo of a {}, a type of flower."]
    assert all(d.classname == splits.classnames[d.label] for d in splits.train)
    assert len(splits.train) == 4093


@needs_shared
def test_imagenet_and_imagenet_a_layouts(tmp_path: Path):
    rows = [r.split("\t") for r in (SHARED / "imagenet_samples" / "classes.tsv").read_text().splitlines()[1:]]
    (tmp_path / "imagenet").mkdir()
    (tmp_path / "imagenet" / "classnames.txt").write_text("".join(f"{w} {n}\n" for _, w, n in rows))
    picks = [rows[1][1], rows[7][1], rows[500][1]]
    for sub in ("imagenet/images/train", "imagenet/images/val", "imagenet-adversarial/imagenet-a"):
        for w in picks:
            (tmp_path / sub / w).mkdir(parents=True)
            src = next((SHARED / "imagenet_samples" / w).iterdir())
            (tmp_path / sub / w / src.name).symlink_to(src)
    (tmp_path / "imagenet-adversarial" / "imagenet-a" / "README.txt").write_text("readme")
    inet = load_splits("imagenet", str(tmp_path))
    assert len(inet.classnames) == 1000 and sorted(d.label for d in inet.train) == [1, 7, 500]
    assert inet.val == inet.test
    a = build_dataset("imagenet_a", str(tmp_path), split="test")
    assert a.classnames == ["goldfish", rows[7][2].replace("_", " "), rows[500][2].replace("_", " ")]
    assert a.parent_class_indices == [1, 7, 500] and sorted(a.labels) == [0, 1, 2]


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(DataError, match="unknown dataset 'nope'.*dtd.*imagefolder"):
        build_dataset("nope", root="/tmp")
    expected = {
        "imagenet",
        "caltech101",
        "oxford_pets",
        "stanford_cars",
        "oxford_flowers",
        "food101",
        "fgvc_aircraft",
        "sun397",
        "dtd",
        "eurosat",
        "ucf101",
        "imagenet_v2",
        "imagenet_sketch",
        "imagenet_a",
        "imagenet_r",
        "imagefolder",
        "csv",
        "digits",
    }
    assert expected <= set(DATASETS)


@needs_shared
def test_missing_split_file_is_named(tmp_path: Path):
    with pytest.raises(DataError, match="split_zhou_DescribableTextures.json"):
        build_dataset("dtd", root=str(DTD10))
    missing = tmp_path / "nope.json"
    with pytest.raises(DataError, match=str(missing)):
        build_dataset("dtd", root=str(DTD10), split_file=str(missing))


# -- image folders and CSV -----------------------------------------------------------------------
@needs_shared
def test_cifar10_image_folder():
    splits = load_splits("imagefolder", str(SHARED / "cifar10"), subdir="test")
    assert splits.classnames[:3] == ["airplane", "automobile", "bird"] and len(splits.classnames) == 10
    parts = [splits.pretrain, splits.train, splits.val, splits.test]
    assert [len(p) for p in parts] == [0, 6000, 1000, 3000]
    paths = [{d.path for d in p} for p in parts]
    assert sum(len(p) for p in paths) == len(set().union(*paths)) == 10000
    assert all(d.path.split(os.sep)[-2] == splits.classnames[d.label] for d in splits.test)
    again = load_splits("imagefolder", str(SHARED / "cifar10"), subdir="test")
    assert again.test == splits.test
    ds = build_dataset(
        "imagefolder",
        str(SHARED / "cifar10"),
        split="test",
        subdir="test",
        transform=build_transform(32),
        fractions=(0, 0, 0, 1),
    )
    x, y, i = ds[0]
    assert len(ds) == 10000 and x.shape == (3, 32, 32) and y == 0 and i == 0


@needs_shared
def test_imagenet_samples_image_folder():
    ds = build_dataset("imagefolder", str(SHARED / "imagenet_samples"), split="test", fractions=(0, 0, 0, 1))
    assert len(ds.classnames) == 1000 and len(ds) == 1000
    assert ds.classnames[0] == "tench" and ds.classnames[2] == "great white shark"
    rows = [r.split("\t") for r in (SHARED / "imagenet_samples" / "classes.tsv").read_text().splitlines()[1:]]
    wnid_to_idx = {w: int(i) for i, w, _ in rows}
    assert all(wnid_to_idx[d.path.split(os.sep)[-2]] == d.label for d in ds.data)


def test_empty_class_folder_is_named(tmp_path: Path):
    from PIL import Image

    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cat" / "a.png")
    with pytest.raises(DataError, match=r"no images: .*dog"):
        load_splits("imagefolder", str(tmp_path))
    ds = build_dataset("imagefolder", str(tmp_path), split="train", skip_bad=True, fractions=(0, 1, 0, 0))
    assert len(ds) == 1 and ds.classnames == ["cat", "dog"]
    assert ds.skipped == [(str(tmp_path / "dog"), "class folder has no images")]


@needs_shared
def test_csv_dataset(tmp_path: Path):
    files = (
        sorted((DTD10 / "images" / "banded").iterdir())[:6]
        + sorted((DTD10 / "images" / "bumpy").iterdir())[:4]
    )
    rows = ["path,classname"] + [f"{os.path.relpath(f, tmp_path)},{f.parent.name}" for f in files]
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    splits = load_splits("csv", str(tmp_path / "data.csv"), fractions=(0, 0.5, 0, 0.5))
    assert splits.classnames == ["banded", "bumpy"]
    assert len(splits.train) == 5 and len(splits.test) == 5
    labelled = ["path,label,split"] + [f"{f},{int(f.parent.name == 'bumpy')},test" for f in files]
    (tmp_path / "labels.csv").write_text("\n".join(labelled) + "\n")
    (tmp_path / "classnames.txt").write_text("banded_texture\nbumpy\n")
    ds = build_dataset("csv", str(tmp_path / "labels.csv"), split="test", transform=build_transform(64))
    assert (
        ds.classnames == ["banded texture", "bumpy"]
        and len(ds) == 10
        and sorted(ds.labels) == [0] * 6 + [1] * 4
    )
    assert ds[9][0].shape == (3, 64, 64)
    (tmp_path / "bad.csv").write_text("path,label\n" + f"{files[0]},7\n")
    with pytest.raises(DataError, match=r"bad\.csv.*label 7"):
        load_splits("csv", str(tmp_path / "bad.csv"))


# -- few-shot and digits -------------------------------------------------------------------------
@needs_shared
def test_few_shot_is_seeded():
    train = dtd10("train").data
    a, b, c = few_shot(train, 16, seed=1), few_shot(train, 16, seed=1), few_shot(train, 16, seed=2)
    assert a == b and set(a) != set(c)
    assert len(a) == 160 and all(sum(d.label == y for d in a) == 16 for y in range(10))
    assert len(set(a)) == 160 and a.short_classes == {}
    ds = dtd10("train", num_shots=16, seed=1)
    assert len(ds) == 160 and set(ds.data) == set(a)
    assert len(dtd10("val", num_shots=16)) == 40  # CoOp: min(shots, 4) for val
    short = few_shot(train, 100, seed=1)
    assert len(short) == 600 and short.short_classes == dict.fromkeys(range(10), 60)


def test_digits_builtin():
    splits = load_splits("digits")
    parts = [splits.pretrain, splits.train, splits.val, splits.test]
    paths = [{d.path for d in p} for p in parts]
    assert sum(map(len, paths)) == len(set().union(*paths)) == 1797
    assert [len(p) for p in parts] == [719, 539, 92, 447]
    assert splits.classnames[0] == "zero" and len(splits.classnames) == 10
    assert splits.templates == ["a photo of the digit {}."]
    assert all(d.path.startswith("digits://") for d in splits.train)
    ds = build_dataset("digits", split="train", transform=build_transform(24), digits_size=24)
    x, y, i = ds[5]
    assert x.shape == (3, 24, 24) and y == ds.data[5].label and i == 5
    raw = build_dataset("digits", split="test", digits_size=40)[0][0]
    assert raw.size == (40, 40) and raw.mode == "RGB"
    unl = build_dataset("digits", split="train", unlabelled=True)
    assert {unl[k][1] for k in range(20)} == {-1}


# -- bad files -----------------------------------------------------------------------------------
@needs_shared
def test_truncated_image_is_named(tmp_path: Path):
    src = DTD10 / "images" / "banded" / "banded_0002.jpg"
    good = src.read_bytes()
    split = make_dtd_like(
        tmp_path,
        [("banded/a.jpg", 0, "banded"), ("banded/b.jpg", 0, "banded")],
        {"banded/a.jpg": good, "banded/b.jpg": good[: len(good) // 2]},
    )
    ds = build_dataset("dtd", root=str(tmp_path), split_file=str(split), transform=build_transform(32))
    assert ds[0][0].shape == (3, 32, 32)
    with pytest.raises(DataError, match=r"b\.jpg"):
        ds[1]
    (tmp_path / "images" / "banded" / "c.jpg").write_bytes(b"not an image at all")
    split2 = make_dtd_like(
        tmp_path,
        [
            ("banded/a.jpg", 0, "banded"),
            ("banded/b.jpg", 0, "banded"),
            ("banded/c.jpg", 0, "banded"),
            ("banded/gone.jpg", 0, "banded"),
        ],
        {},
    )
    ok = build_dataset("dtd", root=str(tmp_path), split_file=str(split2), skip_bad=True)
    assert len(ok) == 1 and len(ok.skipped) == 3
    assert {Path(p).name for p, _ in ok.skipped} == {"b.jpg", "c.jpg", "gone.jpg"}


@needs_shared
def test_missing_file_in_split_is_named(tmp_path: Path):
    entries = json.loads(DTD10_SPLIT.read_text())
    entries["train"].append(["banded/banded_9999.jpg", 0, "banded"])
    bad = tmp_path / "split.json"
    bad.write_text(json.dumps(entries))
    with pytest.raises(DataError, match="banded_9999.jpg"):
        build_dataset("dtd", root=str(DTD10), split_file=str(bad))
    ds = build_dataset("dtd", root=str(DTD10), split_file=str(bad), split="val")  # other split unaffected
    assert len(ds) == 240


@needs_shared
def test_bad_label_is_named(tmp_path: Path):
    entries = json.loads(DTD10_SPLIT.read_text())
    entries["test"][3][1] = 10  # dtd10/classes.tsv has 10 classes
    entries["test"][3][2] = "mystery"
    bad = tmp_path / "badlabel.json"
    bad.write_text(json.dumps(entries))
    with pytest.raises(DataError, match=r"badlabel\.json.*test\[3\].*label 10"):
        build_dataset("dtd", root=str(DTD10), split_file=str(bad), split="test")
    with pytest.raises(DataError, match="label 3"):
        ImageDataset([Datum("digits://0", 3, "x")], ["a", "b"])


# -- transforms and reproducible views ------------------------------------------------------------
@needs_shared
def test_view_seed_reproduces_views():
    ds = dtd10("train", transform=build_transform(64, train=True))
    a, b, c = ds.get_view(4, seed=123), ds.get_view(4, seed=123), ds.get_view(4, seed=124)
    assert a.shape == (3, 64, 64) and torch.equal(a, b) and not torch.equal(a, c)
    seeded = dtd10(
        "train", transform=build_transform(64), train_transform=build_transform(64, train=True), view_seed=7
    )
    x1, x2 = seeded[2][0], seeded[2][0]
    seeded.set_epoch(1)
    assert torch.equal(x1, x2) and not torch.equal(x1, seeded[2][0])
    test_ds = dtd10("test", transform=build_transform(64))
    with pytest.raises(DataError, match="train transform"):
        test_ds.get_view(0, 1)
    assert torch.equal(test_ds[0][0], test_ds[0][0])


def test_transform_fingerprint_and_shapes():
    from PIL import Image

    t = build_transform(48, train=True)
    assert t.fingerprint == transform_fingerprint(48, train=True)
    assert transform_fingerprint(48, train=True) != transform_fingerprint(48, train=False)
    assert transform_fingerprint(48, interpolation="bilinear") != transform_fingerprint(48)
    img = Image.new("RGB", (100, 37), (255, 0, 0))
    for tr in (t, build_transform(48)):
        out = tr(img)
        assert out.shape == (3, 48, 48) and out.dtype == torch.float32


@needs_shared
def test_truncated_image_fails_even_if_pil_allows_truncation(tmp_path: Path):
    from PIL import ImageFile

    good = (DTD10 / "images" / "banded" / "banded_0002.jpg").read_bytes()
    split = make_dtd_like(tmp_path, [("banded/t.jpg", 0, "banded")], {"banded/t.jpg": good[: len(good) // 2]})
    ds = build_dataset("dtd", root=str(tmp_path), split_file=str(split))
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        with pytest.raises(DataError, match=r"t\.jpg"):
            ds.load_image(0)
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


@needs_shared
def test_fgvc_aircraft_and_imagenet_v2_layouts(tmp_path: Path):
    src = DTD10 / "images" / "banded" / "banded_0002.jpg"
    air = tmp_path / "fgvc_aircraft"
    (air / "images").mkdir(parents=True)
    (air / "variants.txt").write_text("707-320\nA300B4\n")
    for key, lines in {
        "train": ["1 707-320", "2 A300B4"],
        "val": ["3 A300B4"],
        "test": ["4 707-320"],
    }.items():
        (air / f"images_variant_{key}.txt").write_text("\n".join(lines) + "\n")
    for i in range(1, 5):
        (air / "images" / f"{i}.jpg").symlink_to(src)
    ds = build_dataset("fgvc_aircraft", str(tmp_path), split="train")
    assert ds.classnames == ["707-320", "A300B4"] and ds.labels == [0, 1]
    assert ds.templates == ["a photo of a {}, a type of aircraft."]
    (air / "images_variant_test.txt").write_text("4 747-400\n")
    with pytest.raises(DataError, match=r"images_variant_test\.txt.*747-400"):
        load_splits("fgvc_aircraft", str(tmp_path))
    v2 = tmp_path / "imagenetv2"
    (v2 / "imagenetv2-matched-frequency-format-val" / "3").mkdir(parents=True)
    (v2 / "imagenetv2-matched-frequency-format-val" / "3" / "a.jpeg").symlink_to(src)
    (v2 / "classnames.txt").write_text("".join(f"n{i:08d} class_{i}\n" for i in range(1000)))
    ds = build_dataset("imagenet_v2", str(tmp_path), split="test")
    assert len(ds.classnames) == 1000 and ds.labels == [3] and ds.classnames[3] == "class 3"


def test_relative_class_file_resolves_against_the_dataset_folder(tmp_path) -> None:
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "names.txt").write_text("apple\nbanana\n")
    splits = load_splits("imagefolder", str(tmp_path), classes_file="names.txt", fractions=(0, 1, 0, 0))
    assert splits.classnames == ["apple", "banana"]
    with pytest.raises(DataError, match="missing.txt"):
        load_splits("imagefolder", str(tmp_path), classes_file="missing.txt")


# -- folder walks through links: each real folder entered once, each real file listed once --------
def _images(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(b"not decoded by a walk")


def _loop_warnings(caplog) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "link loop" in r.getMessage()
    ]


def test_walk_with_a_link_loop_lists_each_image_once(tmp_path: Path, caplog):
    from comkd.data.unlabelled import list_images_recursive, load_unlabelled_folder

    pool = tmp_path / "pool"
    _images(pool / "a", "0.jpg", "1.png")
    _images(pool, "2.jpg")
    (pool / "a" / "back").symlink_to(pool)  # pool/a/back/a/back/... for ever
    (pool / "classnames.txt").write_text("cat\ndog\n")
    with caplog.at_level("WARNING", logger="comkd.data.unlabelled"):
        got = list_images_recursive(str(pool))
    assert [Path(p).relative_to(pool).as_posix() for p in got] == ["2.jpg", "a/0.jpg", "a/1.png"]
    assert _loop_warnings(caplog) == [
        f"link loop: {pool / 'a' / 'back'} leads back to {pool}, which holds it; not followed"
    ]
    splits = load_unlabelled_folder(str(pool))
    assert sorted(d.path for d in splits.train) == got


def test_walk_with_two_link_loops_terminates(tmp_path: Path, caplog):
    from comkd.data import collect_images
    from comkd.data.unlabelled import list_images_recursive

    pool = tmp_path / "pool"
    _images(pool / "a", "0.jpg")
    _images(pool / "b", "1.jpg")
    (pool / "a" / "up").symlink_to(pool)  # two loops: the old walk grew as 2^depth
    (pool / "b" / "up").symlink_to(pool)
    (pool / "b" / "me").symlink_to(pool / "b")
    with caplog.at_level("WARNING", logger="comkd.data.unlabelled"):
        got = list_images_recursive(str(pool))
        globbed = collect_images([str(pool / "**" / "*.jpg")])  # glob's own ** would loop too
    assert [Path(p).relative_to(pool).as_posix() for p in got] == ["a/0.jpg", "b/1.jpg"]
    assert globbed == got
    warned = _loop_warnings(caplog)
    assert {str(pool / "a" / "up"), str(pool / "b" / "up"), str(pool / "b" / "me")} == {
        w.split()[2] for w in warned
    }


def test_walk_through_a_diamond_of_links_lists_each_image_once(tmp_path: Path, caplog):
    from comkd.data import collect_images
    from comkd.data.unlabelled import list_images_recursive

    shared = tmp_path / "shared"
    _images(shared / "deep", "0.jpg", "1.jpg")
    _images(shared, "2.jpg")
    pool = tmp_path / "pool"
    pool.mkdir()
    (pool / "left").symlink_to(shared)  # two links to the same folder ...
    (pool / "right").symlink_to(shared)
    (pool / "also-deep").symlink_to(shared / "deep")  # ... one to a folder inside it
    (pool / "again.jpg").symlink_to(shared / "2.jpg")  # and a second name for one file
    with caplog.at_level("WARNING", logger="comkd.data.unlabelled"):
        got = list_images_recursive(str(pool))
        both = collect_images([pool, shared, str(pool / "*")])
    assert [Path(p).relative_to(pool).as_posix() for p in got] == [
        "again.jpg",
        "also-deep/0.jpg",
        "also-deep/1.jpg",
    ]
    assert both == got and not _loop_warnings(caplog)  # a diamond is no loop


def _members(proto) -> set[str]:
    import typing

    names = set(typing.get_type_hints(proto)) | {
        n
        for n, v in vars(proto).items()
        if not n.startswith("_") and (callable(v) or isinstance(v, property))
    }
    for base in proto.__mro__[1:]:
        if getattr(base, "_is_protocol", False) and base.__name__ != "Protocol":
            names |= _members(base)
    return names | {"__len__"}


def test_both_dataset_classes_satisfy_the_written_contract(tmp_path) -> None:
    """Every member of ``TrainingDataset`` on a file dataset and on a shard stream, and every member
    of ``StreamingDataset`` on the stream: the attributes the engine reads are the ones written."""
    import io
    import tarfile

    from PIL import Image

    from comkd.data import StreamingDataset, TrainingDataset, WdsImageDataset, build_dataset
    from comkd.data.contract import SplitMetadata

    files = build_dataset("digits", split="train", unlabelled=True)
    shard = tmp_path / "s-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(4):
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(buf, format="PNG")
            for name, data in ((f"k{i}.png", buf.getvalue()), (f"k{i}.cls", str(i % 2).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    names = tmp_path / "classes.txt"
    names.write_text("a\nb\n")
    stream = build_dataset("wds", root=str(shard), split="train", classes_file=str(names))
    assert isinstance(stream, WdsImageDataset)
    need = _members(TrainingDataset)
    assert {"full_classnames", "class_indices", "view_seed", "view_period", "set_epoch", "labels"} <= need
    assert {"streaming", "item_ids", "skipped", "parent_class_indices"} <= need  # the engine reads these too
    for ds in (files, stream):
        missing = sorted(m for m in need if not hasattr(ds, m))
        assert missing == [], (type(ds).__name__, missing)
        assert isinstance(ds, TrainingDataset) and isinstance(ds, SplitMetadata)  # one metadata record
    stream_need = _members(StreamingDataset) - need
    assert {"training_stream", "replay_stream"} <= stream_need
    assert sorted(m for m in stream_need if not hasattr(stream, m)) == [] and stream.streaming is True
    assert files.streaming is False and files.item_ids == [d.path for d in files.data]
    assert stream.item_ids and all(i.startswith("s-000000.tar#k") for i in stream.item_ids)  # "<shard>#<key>"


def test_build_dataset_looks_the_reader_up_by_the_name_the_loader_gives(tmp_path, monkeypatch) -> None:
    """``DatasetSplits.readers`` names a reader per split; ``build_dataset`` takes its class from
    ``READERS`` (a new item source is a class plus an entry), and an unknown name is one line."""
    import comkd.data as data_mod
    from comkd.data import READERS, DataError, ImageDataset, build_dataset, register_dataset

    class Tagged(ImageDataset):
        pass

    @register_dataset("tagged-reader-test")
    def _loader(root, *, split_file=None, skip_bad=False):
        splits = data_mod.load_splits("digits")
        splits.readers = {"train": "tagged", "test": "nowhere"}
        return splits

    try:
        monkeypatch.setitem(READERS, "tagged", (Tagged, ()))
        assert type(build_dataset("tagged-reader-test", split="train")) is Tagged
        assert type(build_dataset("tagged-reader-test", split="val")) is ImageDataset  # default: files
        with pytest.raises(DataError, match="reader 'nowhere' is not one of files, shards, tagged"):
            build_dataset("tagged-reader-test", split="test")
    finally:
        data_mod.DATASETS.pop("tagged-reader-test")


# -- labels that would build phantom classes, and one-class data ------------------------
def _csv(tmp_path, labels, names_file=None, images=False):
    lines = ["path,label"] + [f"img{i}.png,{y}" for i, y in enumerate(labels)]
    if images:
        from PIL import Image

        for i in range(len(labels)):
            Image.new("RGB", (8, 8), (40 * i % 255, 0, 0)).save(tmp_path / f"img{i}.png")
    p = tmp_path / "labels.csv"
    p.write_text("\n".join(lines) + "\n")
    if names_file is not None:
        (tmp_path / "classnames.txt").write_text("\n".join(names_file) + "\n")
    return p


@pytest.mark.parametrize(
    ("labels", "words"),
    [
        ([0, 1, 2, 3, 99] * 3, ["labels.csv", "without gaps", "95 label(s)", "largest label 99"]),
        ([0, 2, 3] * 3, ["labels.csv", "without gaps", "[1]"]),
    ],
)
def test_csv_labels_with_gaps_or_one_class_are_refused(tmp_path, labels, words) -> None:
    from comkd.data import load_splits

    with pytest.raises(DataError) as err:
        load_splits("csv", str(_csv(tmp_path, labels)))
    for w in words:
        assert w in str(err.value), (w, str(err.value))


@pytest.mark.parametrize(
    ("labels", "subsample", "words"),
    [([0] * 6, "all", "has 1 class"), ([0, 1] * 6, "base", "'base' classes")],
)
def test_one_class_is_refused_up_front(tmp_path, labels, subsample, words) -> None:
    cfg = load_config("demo", sets=["data.dataset=csv", f"data.root={_csv(tmp_path, labels, images=True)}"])
    spec = build_student(cfg, 32, "cpu").preprocess
    with pytest.raises(DataError) as err:
        make_dataset(cfg, "train", spec, train=True, subsample=subsample, few_shot=subsample == "base")
    assert words in str(err.value) and "labels.csv" in str(err.value) and "at least 2" in str(err.value)


def test_csv_with_a_class_file_drops_empty_classes_with_a_warning(tmp_path, caplog) -> None:
    from comkd.data import load_splits

    path = _csv(tmp_path, [0, 2] * 10, names_file=["apple", "banana", "cherry"])
    with caplog.at_level("WARNING"):
        s = load_splits("csv", str(path))
    assert s.classnames == ["apple", "cherry"]
    assert {d.label for d in s.train + s.val + s.test} == {0, 1}
    assert {d.classname for d in s.train if d.label == 1} == {"cherry"}
    assert "banana" in caplog.text and "dropped" in caplog.text


def test_cli_names_the_csv_with_a_phantom_label(tmp_path) -> None:
    path = _csv(tmp_path, [0, 1, 2, 3, 99] * 3)
    r = CliRunner().invoke(
        cli.app,
        [
            "train-teacher",
            "--config",
            "demo",
            "--dataset",
            "csv",
            "--root",
            str(path),
            "--out-dir",
            str(tmp_path / "t"),
            "--set",
            "progress=false",
        ],
    )
    one_line_error(r, "labels.csv", "99")


def test_a_names_file_of_100k_classes_is_checked_for_duplicates_in_linear_time(tmp_path) -> None:
    # with list.count per name this took 229 s (quadratic); a Counter reads it in one pass
    from comkd.data import DataError
    from comkd.data.unlabelled import read_names_file

    names = [f"class {i}" for i in range(100_000)]
    (tmp_path / "ok.txt").write_text("\n".join(names) + "\n")
    assert read_names_file(str(tmp_path / "ok.txt")) == names
    (tmp_path / "dup.txt").write_text("\n".join([*names, "class 77", "class 5"]) + "\n")
    with pytest.raises(DataError, match=r"dup\.txt lists \['class 5', 'class 77'\] more than once"):
        read_names_file(str(tmp_path / "dup.txt"))

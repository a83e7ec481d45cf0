"""Using a student: ``preprocess``, ``predict`` (API and command), image collection, and ONNX /
TorchScript export checked on the real CIFAR-10 images under ../shared/data."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from comkd import cli, load_student
from comkd.data import DataError, build_transform, collect_images
from support import TINY_DISTILL_OPTS, write_tiny_student

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("COMKD_SHARED_DATA", REPO.parent / "shared" / "data"))
CIFAR = SHARED / "cifar10"
needs_shared = pytest.mark.skipif(not CIFAR.is_dir(), reason=f"shared data folder {CIFAR} is absent")
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def cifar_images(per_class: int, split: str = "test") -> list[str]:
    out = []
    for c in CLASSES:
        out += sorted(str(p) for p in (CIFAR / split / c).glob("*.jpg"))[:per_class]
    return out


@pytest.fixture(scope="module")
def student_file(tmp_path_factory) -> Path:
    """An (undistilled) tiny student with a random W over the CIFAR-10 names, saved as a student file."""
    # a non-zero gate, so EduAttention is part of what is checked
    return write_tiny_student(tmp_path_factory.mktemp("student") / "student.safetensors", CLASSES, alpha=0.5)


def test_loaded_student_has_preprocess_classnames_and_predict(student_file) -> None:
    s = load_student(student_file)
    assert s.classnames == CLASSES
    img = Image.new("RGB", (40, 24), (200, 10, 30))
    x = s.preprocess(img)
    want = build_transform(16, s.preprocess.mean, s.preprocess.std, s.preprocess.interpolation)(img)
    assert x.shape == (3, 16, 16) and torch.equal(x, want)
    preds = s.predict([img, img.rotate(90)], top_k=3)
    logits = s(torch.stack([x, s.preprocess(img.rotate(90))])).logits
    assert [p.indices[0] for p in preds] == logits.argmax(-1).tolist()
    for p in preds:
        assert len(p.classes) == 3 and p.probs == sorted(p.probs, reverse=True) and sum(p.probs) <= 1 + 1e-6
        assert p.classes == [CLASSES[i] for i in p.indices]
    # a preprocessed batch gives the same answer; top_k is capped at the number of classes
    batch = s.predict(torch.stack([x]), top_k=50)[0]
    assert len(batch.classes) == 10 and batch.indices[0] == preds[0].indices[0]
    assert abs(sum(batch.probs) - 1) < 1e-5


@needs_shared
def test_collect_images_reads_files_folders_and_globs(tmp_path) -> None:
    nested = tmp_path / "pool" / "a" / "b"
    nested.mkdir(parents=True)
    src = cifar_images(1)
    for i, p in enumerate(src[:3]):
        os.symlink(p, nested / f"{i}.JPG")  # upper-case extension, two folders deep
    (tmp_path / "pool" / "notes.txt").write_text("not an image")
    (tmp_path / "pool" / ".hidden.jpg").write_bytes(b"")
    got = collect_images([tmp_path / "pool"])
    assert [Path(p).name for p in got] == ["0.JPG", "1.JPG", "2.JPG"]
    assert collect_images([str(tmp_path / "pool" / "**" / "*.JPG"), got[0]]) == got  # de-duplicated
    with pytest.raises(DataError, match="nope"):
        collect_images([tmp_path / "nope"])
    with pytest.raises(DataError, match="matches no image"):
        collect_images([str(tmp_path / "*.png")])


def _csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@needs_shared
def test_predict_command_writes_csv_and_jsonl_equal_to_the_api(student_file, tmp_path) -> None:
    images = cifar_images(3)
    r = CliRunner().invoke(
        cli.app,
        [
            "predict",
            str(student_file),
            str(CIFAR / "test" / "cat"),
            *images[:3],
            "--out",
            str(tmp_path / "p.csv"),
            "--top-k",
            "2",
            "--batch-size",
            "7",
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    rows = _csv_rows(tmp_path / "p.csv")
    n_cat = len(list((CIFAR / "test" / "cat").glob("*.jpg")))
    assert len(rows) == n_cat + 3 and set(rows[0]) == {"path", "class_1", "prob_1", "class_2", "prob_2"}
    summary = json.loads(r.output.strip().splitlines()[-1])
    assert summary["images"] == len(rows) and sum(summary["top1_counts"].values()) == len(rows)
    r = CliRunner().invoke(
        cli.app, ["predict", str(student_file), *images, "--out", str(tmp_path / "p.jsonl"), "--no-progress"]
    )
    assert r.exit_code == 0, r.output
    lines = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    api = load_student(student_file).predict(images, top_k=5)
    assert [d["path"] for d in lines] == images
    assert [d["classes"] for d in lines] == [p.classes for p in api]
    for d, p in zip(lines, api, strict=True):
        assert d["probs"] == pytest.approx(p.probs, abs=1e-6)


@needs_shared
def test_predict_names_a_bad_image_and_skip_bad_leaves_it_out(student_file, tmp_path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    good = cifar_images(1)[:2]
    r = CliRunner().invoke(cli.app, ["predict", str(student_file), *good, str(bad), "--no-progress"])
    assert r.exit_code == 1 and "broken.jpg" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(
        cli.app,
        [
            "predict",
            str(student_file),
            *good,
            str(bad),
            "--skip-bad",
            "--no-progress",
            "--out",
            str(tmp_path / "p.csv"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert len(_csv_rows(tmp_path / "p.csv")) == 2
    assert json.loads(r.output.strip().splitlines()[-1])["skipped"][0]["path"] == str(bad)


def test_predict_refuses_torchscript_files(tmp_path) -> None:
    f = tmp_path / "student.pt"
    f.write_bytes(b"PK")
    r = CliRunner().invoke(cli.app, ["predict", str(f), str(tmp_path)])
    assert r.exit_code == 1 and "TorchScript" in r.output and "student.pt" in r.output


@needs_shared
def test_onnx_export_agrees_with_pytorch_and_runs_in_predict(student_file, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    onnx_path = tmp_path / "s.onnx"
    images = cifar_images(10)
    r = CliRunner().invoke(
        cli.app,
        [
            "export",
            str(student_file),
            "--format",
            "onnx",
            "--out",
            str(onnx_path),
            "--check-images",
            str(CIFAR / "test" / "*" / "000[0-9].jpg"),
            "--quantize",
            "int8",
        ],
    )
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output[r.output.index("{") :])
    p = rep["parity"]
    assert p["images"] == 100 and p["top1_agreement"] == 1.0 and p["max_abs_logit_diff"] < 1e-3
    assert 0.0 <= rep["int8"]["parity"]["top1_agreement"] <= 1.0 and Path(rep["int8"]["file"]).is_file()
    # the check images sit in class folders, so the int8 accuracy change is measured against the float student
    s = load_student(student_file)
    checked = sorted(str(p) for p in (CIFAR / "test").glob("*/000[0-9].jpg"))
    preds = torch.tensor([p.indices[0] for p in s.predict(checked)])
    labels = torch.tensor([CLASSES.index(Path(p).parent.name) for p in checked])
    float_acc = 100.0 * int((preds == labels).sum()) / len(labels)
    assert rep["accuracy"] == pytest.approx(float_acc) and rep["int8"]["float_accuracy"] == pytest.approx(
        float_acc
    )
    assert rep["int8"]["accuracy_change"] == pytest.approx(rep["int8"]["accuracy"] - float_acc)
    from comkd.deploy.onnx_runtime import OnnxStudent

    o = OnnxStudent(onnx_path)
    assert o.classnames == CLASSES and o.preprocess == load_student(student_file).preprocess
    assert json.loads(o.metadata["comkd.preprocess"])["crop"].startswith("centre")
    for runtime, f in (("torch", student_file), ("onnx", onnx_path)):
        r = CliRunner().invoke(
            cli.app,
            [
                "predict",
                str(f),
                *images,
                "--runtime",
                runtime,
                "--no-progress",
                "--out",
                str(tmp_path / f"{runtime}.csv"),
                "--batch-size",
                "33",
            ],
        )
        assert r.exit_code == 0, r.output
    torch_rows, onnx_rows = _csv_rows(tmp_path / "torch.csv"), _csv_rows(tmp_path / "onnx.csv")
    assert [r["class_1"] for r in torch_rows] == [r["class_1"] for r in onnx_rows]
    assert (
        max(abs(float(a["prob_1"]) - float(b["prob_1"])) for a, b in zip(torch_rows, onnx_rows, strict=True))
        < 1e-4
    )


def test_export_rejects_an_unknown_format(student_file, tmp_path) -> None:
    r = CliRunner().invoke(
        cli.app, ["export", str(student_file), "--format", "tflite", "--out", str(tmp_path / "x")]
    )
    assert r.exit_code == 1 and "tflite" in r.output and "onnx" in r.output


FRESH = r"""
import json, sys
import numpy as np
import onnxruntime as ort
import torch
onnx_path, ts_path, x_path = sys.argv[1:4]
x = np.load(x_path)
sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
meta = sess.get_modelmeta().custom_metadata_map
extra = {"comkd.json": ""}
ts = torch.jit.load(ts_path, _extra_files=extra)
print(json.dumps({
    "onnx": sess.run(None, {"images": x})[0].tolist(),
    "ts": ts(torch.from_numpy(x)).tolist(),
    "onnx_classes": json.loads(meta["comkd.classnames"]),
    "ts_meta": json.loads(extra["comkd.json"]),
}))
"""


@pytest.mark.slow
@needs_shared
def test_exports_of_a_distilled_student_load_in_a_fresh_process(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    import numpy as np

    r = CliRunner().invoke(
        cli.app,
        [
            "distill",
            "--teacher",
            "comkd-tiny-teacher",
            "--out-dir",
            str(tmp_path),
            *TINY_DISTILL_OPTS,
        ],
    )
    assert r.exit_code == 0, r.output
    sf = tmp_path / "student.safetensors"
    images = cifar_images(20)  # 200 real images
    reports = {}
    for fmt in ("onnx", "torchscript"):
        r = CliRunner().invoke(
            cli.app, ["export", str(sf), "--format", fmt, *[a for p in images for a in ("--check-images", p)]]
        )
        assert r.exit_code == 0, r.output
        reports[fmt] = json.loads(r.output[r.output.index("{") :])
        assert reports[fmt]["parity"]["top1_agree"] == 200, reports[fmt]
    s = load_student(sf)
    x = torch.stack(
        [s.preprocess(Image.open(p).convert("RGB")) for p in images[::40]]
    )  # batch 5: not the trace's 2
    np.save(tmp_path / "x.npy", x.numpy())
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            FRESH,
            reports["onnx"]["file"],
            reports["torchscript"]["file"],
            str(tmp_path / "x.npy"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    ref = s(x).logits.detach()
    for k in ("onnx", "ts"):
        y = torch.tensor(got[k])
        assert y.shape == ref.shape and torch.equal(y.argmax(-1), ref.argmax(-1)), k
        assert (y - ref).abs().max() < 1e-3, k
    assert got["onnx_classes"] == s.classnames == json.loads(got["ts_meta"]["comkd.classnames"])
    assert json.loads(got["ts_meta"]["comkd.preprocess"])["image_size"] == 16


def test_predict_out_naming_a_folder_is_one_line_and_writes_nothing(student_file, tmp_path) -> None:
    img = tmp_path / "img.png"
    Image.new("RGB", (20, 20), (10, 200, 30)).save(img)
    folder = tmp_path / "preds"
    folder.mkdir()
    r = CliRunner().invoke(cli.app, ["predict", str(student_file), str(img), "--out", str(folder)])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output  # an option mistake, checked first
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: --out ") and str(folder) in lines[0]
    assert "is a folder, not a file" in lines[0]
    assert os.listdir(folder) == []


def _onnx_with_meta(student_file, path: Path, key: str, value: str) -> Path:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from comkd.deploy.export import export_metadata, export_onnx

    s = load_student(student_file)
    export_onnx(s, path, export_metadata(s))
    m = onnx.load(str(path))
    for p in m.metadata_props:
        if p.key == key:
            p.value = value
    onnx.save(m, str(path))
    return path


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("null", "must be a non-empty JSON list"),
        ('"airplane"', "must be a non-empty JSON list"),
        ("[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]", "holds 1, not a class name"),
        (json.dumps(["cat"] * 10), "lists ['cat'] more than once"),
        (json.dumps(CLASSES[:3]), "names 3 classes but the model has 10 outputs"),
        ("[not json", "is not valid JSON"),
        ("[" * 30000 + "]" * 30000, "comkd.classnames is nested deeper than 16 levels"),
    ],
)
def test_onnx_class_names_metadata_is_checked(student_file, tmp_path, value, words) -> None:
    onnx_path = _onnx_with_meta(student_file, tmp_path / "s.onnx", "comkd.classnames", value)
    img = tmp_path / "img.png"
    Image.new("RGB", (20, 20), (10, 200, 30)).save(img)
    out = tmp_path / "p.csv"
    r = CliRunner().invoke(cli.app, ["predict", str(onnx_path), str(img), "--out", str(out), "--no-progress"])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and str(onnx_path) in lines[0] and "comkd.classnames" in lines[0], r.output
    assert words in lines[0] and not out.exists()


def _preprocess_meta(**edits) -> str:
    d = {"image_size": 16, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bicubic"}
    return json.dumps({**d, **edits})


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(
    ("value", "words"),
    [
        (
            _preprocess_meta(mean=[0.5, float("nan"), 0.5]),
            "comkd.preprocess.mean must be three finite numbers",
        ),
        (_preprocess_meta(std=[0.25, 0, 0.25]), "comkd.preprocess.std must be positive"),
        (_preprocess_meta(std=[0.25, 0.25]), "comkd.preprocess.std must be three finite numbers"),
        (_preprocess_meta(image_size=60000), "image_size must be an integer in 1..4096, got 60000"),
        (_preprocess_meta(image_size=24), "image_size is 24 but the graph takes input"),
        ("[" * 30000 + "]" * 30000, "metadata comkd.preprocess is nested deeper than 16 levels"),
        (
            "[" * 100000 + "]" * 100000,
            "metadata comkd.preprocess is 200000 characters long, more than the 65536",
        ),
    ],
)
def test_onnx_preprocess_metadata_is_checked_before_any_image(student_file, tmp_path, value, words) -> None:
    onnx_path = _onnx_with_meta(student_file, tmp_path / "s.onnx", "comkd.preprocess", value)
    img = tmp_path / "img.png"
    Image.new("RGB", (20, 20), (10, 200, 30)).save(img)
    out = tmp_path / "p.csv"
    r = CliRunner().invoke(cli.app, ["predict", str(onnx_path), str(img), "--out", str(out), "--no-progress"])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and str(onnx_path) in lines[0] and words in lines[0], r.output
    assert not out.exists()


def test_predict_writes_its_file_whole_or_not_at_all(student_file, tmp_path) -> None:
    """An unreadable image after good ones (batch 1: rows were already made) leaves neither a half
    table nor a damaged earlier file."""
    imgs = []
    for i in range(3):
        imgs.append(tmp_path / f"ok{i}.png")
        Image.new("RGB", (20, 20), (30 * i, 90, 10)).save(imgs[-1])
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    out = tmp_path / "p.csv"
    out.write_text("an earlier table\n")
    args = ["predict", str(student_file), *map(str, imgs), str(bad), "--batch-size", "1", "--no-progress"]
    r = CliRunner().invoke(cli.app, [*args, "--out", str(out)])
    assert r.exit_code == 1 and "broken.jpg" in r.output and "Traceback" not in r.output, r.output
    assert out.read_text() == "an earlier table\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "broken.jpg",
        "ok0.png",
        "ok1.png",
        "ok2.png",
        "p.csv",
    ]


def test_predict_refuses_nan_scores_naming_the_image(student_file, tmp_path) -> None:
    """A student whose W was edited to NaN (and its digest recomputed) is refused at load; one that
    produces NaN at run time (here: a NaN input pixel through a patched preprocess) is refused
    when scored, naming the image, with no file written."""
    s = load_student(student_file)
    img = tmp_path / "a.png"
    Image.new("RGB", (20, 20), (3, 4, 5)).save(img)
    real = s.preprocess
    s.preprocess = lambda im: real(im) * float("nan")
    from comkd.deploy.predict import predict_files
    from comkd.models import ModelError

    out = tmp_path / "p.csv"
    with pytest.raises(ModelError, match=r"a\.png: NaN/inf values after preprocessing"):
        predict_files(s, [str(img)], out, progress=False)
    assert not out.exists()
    s.preprocess = real  # finite images, a student whose scores turn NaN (a damaged gate): named too
    with torch.no_grad():
        s.edu_attention.alpha.fill_(float("nan"))
    with pytest.raises(ModelError, match=r"gave NaN/inf scores for .*a\.png"):
        predict_files(s, [str(img)], out, progress=False)
    assert not out.exists()


def test_the_python_api_refuses_non_finite_images_and_top_k_below_one(student_file) -> None:
    """What `comkd predict` refuses, the API refuses with the same kind of message (a NaN or inf
    image, top_k < 1), instead of NaN embeddings and probabilities or an empty prediction."""
    from comkd.models import ModelError

    s = load_student(student_file)
    x = s.preprocess(Image.new("RGB", (16, 16), (9, 9, 9)))
    for bad in (float("nan"), float("inf")):
        batch = torch.stack([x, x.clone()])
        batch[1, 0, 2, 3] = bad
        for call in (s.encode_image, s, s.predict):
            with pytest.raises(ModelError, match=r"input image 1 of the batch holds NaN or inf values"):
                call(batch)
    for k in (0, -1, 1.5):
        with pytest.raises(ValueError, match=rf"top_k must be an integer >= 1, got {k}"):
            s.predict(torch.stack([x]), top_k=k)
    assert s.predict(torch.stack([x]), top_k=1)[0].top1 in CLASSES  # and a good call still answers


@pytest.mark.parametrize("size", ["0", "-3"])
def test_predict_refuses_a_batch_size_below_one_before_printing_anything(
    student_file, tmp_path, size
) -> None:
    img = tmp_path / "img.png"
    Image.new("RGB", (20, 20), (10, 200, 30)).save(img)
    r = CliRunner().invoke(
        cli.app, ["predict", str(student_file), str(img), "--batch-size", size, "--no-progress"]
    )
    assert r.exit_code == 1 and f"--batch-size must be >= 1, got {size}" in r.stderr
    assert r.stdout == ""  # no CSV header before the error


@pytest.mark.filterwarnings("ignore")
def test_an_onnx_file_with_an_unknown_interpolation_prints_nothing_before_its_error(student_file, tmp_path):
    onnx_path = _onnx_with_meta(
        student_file, tmp_path / "s.onnx", "comkd.preprocess", _preprocess_meta(interpolation="sinc9")
    )
    img = tmp_path / "img.png"
    Image.new("RGB", (20, 20), (10, 200, 30)).save(img)
    r = CliRunner().invoke(cli.app, ["predict", str(onnx_path), str(img), "--no-progress"])  # to stdout
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert str(onnx_path) in r.stderr and "interpolation" in r.stderr
    assert r.stdout == ""  # no CSV header before the error


@pytest.mark.filterwarnings("ignore")
def test_load_student_on_an_onnx_export_says_how_to_run_it(student_file, tmp_path) -> None:
    from comkd.deploy.onnx_runtime import OnnxStudent
    from comkd.models import ModelError

    onnx_path = _onnx_with_meta(student_file, tmp_path / "s.onnx", "comkd.unused", "")
    with pytest.raises(ModelError, match=r"s\.onnx is an ONNX export.*--runtime onnx.*OnnxStudent"):
        load_student(onnx_path)
    x = load_student(student_file).preprocess(Image.new("RGB", (16, 16), (1, 2, 3)))
    assert OnnxStudent(onnx_path).predict(torch.stack([x]), top_k=1)[0].top1 in CLASSES  # the way named


def test_predictions_name_images_as_the_user_gave_them(student_file, tmp_path, monkeypatch) -> None:
    from comkd.data import collect_images

    (tmp_path / "photos" / "a").mkdir(parents=True)
    for name in ("photos/a/1.png", "photos/2.png"):
        Image.new("RGB", (20, 20), (10, 200, 30)).save(tmp_path / name)
    monkeypatch.chdir(tmp_path)
    assert collect_images(["photos"]) == ["photos/2.png", "photos/a/1.png"]
    assert collect_images(["photos/2.png", "./photos/a/1.png"]) == ["photos/2.png", "./photos/a/1.png"]
    assert collect_images([str(tmp_path / "photos")])[0] == str(tmp_path / "photos" / "2.png")  # absolute in
    r = CliRunner().invoke(
        cli.app, ["predict", str(student_file), "photos", "--out", "p.csv", "--no-progress"]
    )
    assert r.exit_code == 0, r.output
    with open("p.csv", newline="") as f:
        assert [row["path"] for row in csv.DictReader(f)] == ["photos/2.png", "photos/a/1.png"]

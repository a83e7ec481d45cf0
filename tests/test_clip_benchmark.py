"""CLIP_benchmark (the PyPI package, a client no one here wrote) evaluates a comkd student through
``comkd.deploy.clip_benchmark``, offline, on real CIFAR-10 images under ../shared/data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from comkd.config import load_config
from comkd.engine.evaluation import evaluate_student
from comkd.engine.utils import seed_everything
from comkd.models import ModelError, create_student, create_teacher, load_clip, save_clip_weights
from comkd.models.identity import teacher_identity
from comkd.models.io import load_student, save_student

cb_zs = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("COMKD_SHARED_DATA", REPO.parent / "shared" / "data"))
CIFAR = SHARED / "cifar10"
pytestmark = pytest.mark.skipif(not CIFAR.is_dir(), reason=f"shared data folder {CIFAR} is absent")
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_CLASS = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A student whose W is its teacher's prompted text features of the CIFAR-10 names, the teacher's
    config file, and a class-folder copy (symlinks) of 60 CIFAR-10 test images."""
    d = tmp_path_factory.mktemp("cb")
    torch.manual_seed(0)
    clip = load_clip("comkd-tiny-teacher", None, image_size=16)
    save_clip_weights(clip.model, d / "teacher.safetensors", clip.name, clip.config)
    teacher = create_teacher("comkd-tiny-teacher", str(d / "teacher.safetensors"), image_size=16)
    save_file(
        {k: v.contiguous() for k, v in teacher.prompt_state_dict().items()}, str(d / "prompts.safetensors")
    )
    tcfg = {
        "teacher": {
            "model": "comkd-tiny-teacher",
            "pretrained": str(d / "teacher.safetensors"),
            "prompts": str(d / "prompts.safetensors"),
        },
        "data": {"image_size": 16},
    }
    (d / "teacher.yaml").write_text(yaml.safe_dump(tcfg))
    teacher = create_teacher(
        "comkd-tiny-teacher",
        str(d / "teacher.safetensors"),
        prompts=str(d / "prompts.safetensors"),
        image_size=16,
    )
    seed_everything(0)
    s = create_student("comkd-tiny-student", None, teacher_dim=teacher.embed_dim, image_size=16)
    s.set_text_features(teacher.class_text_features(CLASSES), CLASSES)
    with torch.no_grad():
        s.edu_attention.alpha.fill_(0.5)
    s.teacher_identity = teacher_identity(teacher)
    save_student(s, d / "student.safetensors")
    for c in CLASSES:
        (d / "images" / c).mkdir(parents=True)
        for i in range(PER_CLASS):
            os.symlink(CIFAR / "test" / c / f"{i:04d}.jpg", d / "images" / c / f"{i:04d}.jpg")
    ecfg = load_config(
        None,
        {
            "data": {
                "dataset": "imagefolder",
                "root": str(d / "images"),
                "image_size": 16,
                "fractions": [0.0, 0.0, 0.0, 1.0],
            },
            "protocol": "full",
        },
    )
    acc = evaluate_student(ecfg, load_student(d / "student.safetensors"))["acc"]
    return {"dir": d, "student": d / "student.safetensors", "acc": acc}


def _benchmark(model, transform, tokenizer, root: Path, templates: list[str]) -> float:
    """CLIP_benchmark's zero-shot classifier and classification run; top-1 (%) from its logits
    (its own ``accuracy`` helper fails under NumPy >= 2.4)."""
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(root), transform=transform)
    assert ds.classes == CLASSES
    loader = torch.utils.data.DataLoader(ds, batch_size=16)
    classifier = cb_zs.zero_shot_classifier(model, tokenizer, ds.classes, templates, "cpu", amp=False)
    logits, target = cb_zs.run_classification(model, classifier, loader, "cpu", amp=False)
    assert logits.shape == (len(ds), len(CLASSES))
    return 100.0 * float((logits.argmax(1) == target).float().mean())


def _cifar_templates() -> list[str]:
    import clip_benchmark.datasets.builder as b

    with open(Path(b.__file__).parent / "en_zeroshot_classification_templates.json") as f:
        return json.load(f)["cifar10"]


def test_clip_benchmark_scores_the_stored_w_as_comkd_evaluate_does(setup) -> None:

    import clip_benchmark.models as cbm

    from comkd.deploy.clip_benchmark import register

    register()  # CLIP_benchmark's own model-type dispatch loads the student
    model, transform, tokenizer = cbm.load_clip("comkd", str(setup["student"]), "stored", None, "cpu")
    templates = _cifar_templates()  # CLIP_benchmark's own 18 CIFAR-10 templates
    assert len(templates) > 10 and tokenizer([t.format(c="automobile") for t in templates]).tolist() == [
        1
    ] * len(templates)
    acc = _benchmark(model, transform, tokenizer, setup["dir"] / "images", templates)
    assert acc == pytest.approx(setup["acc"], abs=1e-4)
    with pytest.raises(ModelError, match="zebra"):
        tokenizer(["a photo of a zebra."])


def test_clip_benchmark_with_the_teacher_text_tower(setup, tmp_path) -> None:
    from comkd.deploy.clip_benchmark import load_comkd

    model, transform, tokenizer = load_comkd(
        str(setup["student"]), f"teacher:{setup['dir'] / 'teacher.yaml'}"
    )
    # with the template the learned context replaces, the teacher gives the stored W itself
    w = model.encode_text(tokenizer([f"a photo of a {c}." for c in CLASSES]))
    assert torch.allclose(w, load_student(setup["student"]).text_features, atol=1e-5)
    acc = _benchmark(model, transform, tokenizer, setup["dir"] / "images", ["a photo of a {c}."])
    assert acc == pytest.approx(setup["acc"], abs=1e-4)
    # another teacher (its prompts changed) is refused
    other = yaml.safe_load((setup["dir"] / "teacher.yaml").read_text())
    other["teacher"]["prompts"] = None
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    with pytest.raises(ModelError, match="prompts_sha256"):
        load_comkd(str(setup["student"]), f"teacher:{tmp_path / 'other.yaml'}")

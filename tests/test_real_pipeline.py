"""Real pretrained towers through the whole package (issue 33): ``load_clip`` of a ``real:`` model
and of ``timm:tf_efficientnet_lite0`` with its packaged ImageNet weights, the teacher's learned
context in the Hugging Face text tower (checked against the tower's own input-id path), the
student on a CNN tower, a SigLIP-style logit bias, and, slow, every command on a handful of
CIFAR-10 images at 64 px: train-teacher, cache-teacher, distil (PromptKD online, ComKD from the
cache), export to ONNX with parity, predict.

Skipped, with the package named, where the ``real`` extra is not installed."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from test_real_towers import SHARED, need_lite, need_minilm

REAL = "real:tf_efficientnet_lite0+all-MiniLM-L6-v2"
NAMES = ["tench", "golden retriever", "fire truck"]


@pytest.fixture(scope="module")
def real_loaded():
    """One real CLIP at 64 px (built once: MiniLM takes a few seconds to load)."""
    need_lite(0)
    need_minilm()
    from comkd.models import load_clip

    torch.manual_seed(0)
    return load_clip(REAL, image_size=64)


@pytest.fixture(scope="module")
def real_teacher(real_loaded):
    from comkd.models import Teacher, TeacherArch

    return Teacher(real_loaded, TeacherArch(model=REAL, image_size=64)).eval()


# -- loading ------------------------------------------------------------------------------------
def test_load_clip_builds_the_real_towers_by_name(real_loaded, tmp_path):
    import open_clip

    from comkd.models import ModelError, load_clip, save_clip_weights
    from comkd.models.real_towers import efficientnet_lite_weights

    m = real_loaded.model
    assert isinstance(m, open_clip.CustomTextCLIP) and real_loaded.name == REAL
    assert real_loaded.preprocess.image_size == 64 and real_loaded.preprocess.mean == (0.5,) * 3
    lite = efficientnet_lite_weights("tf_efficientnet_lite0")
    trunk = m.visual.trunk.state_dict()
    assert all(torch.equal(trunk[k], lite[k]) for k in trunk)
    # a whole-model file (the trained projections of stage 0, say) loads over it, key by key
    with torch.no_grad():
        m.visual.head.proj.weight.mul_(2.0)
    path = tmp_path / "real_clip.safetensors"
    save_clip_weights(m, path, REAL, real_loaded.config)
    again = load_clip(REAL, str(path), image_size=64).model.state_dict()
    assert all(torch.equal(again[k], v) for k, v in m.state_dict().items())
    with torch.no_grad():
        m.visual.head.proj.weight.div_(2.0)
    # the new projections are the same in every build (one teacher across stages), whatever the
    # caller's random state, which the build leaves as it was
    state = torch.random.get_rng_state()
    other = load_clip(REAL, image_size=64).model
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(other.visual.head.proj.weight, m.visual.head.proj.weight)
    assert torch.equal(other.text.proj.weight, m.text.proj.weight)
    with pytest.raises(
        ModelError, match=r"unknown real-tower model 'real:resnet50\+all-MiniLM-L6-v2'; known:"
    ):
        load_clip("real:resnet50+all-MiniLM-L6-v2")
    with pytest.raises(ModelError, match="has no weight tag 'openai'"):
        load_clip(REAL, "openai")


def test_timm_student_tower_reads_the_packaged_imagenet_weights():
    need_lite(0)
    from comkd.models import ModelError, create_student, load_clip
    from comkd.models.real_towers import efficientnet_lite_weights

    tower = load_clip("timm:tf_efficientnet_lite0", "imagenet").model
    lite = efficientnet_lite_weights("tf_efficientnet_lite0")
    assert all(torch.equal(v, lite[k]) for k, v in tower.state_dict().items())
    with pytest.raises(ModelError, match="local weight file or 'imagenet'"):
        load_clip("timm:tf_efficientnet_lite0", "laion2b")
    s = create_student(
        "timm:tf_efficientnet_lite0", "imagenet", teacher_dim=512, logit_scale=10.0, image_size=64
    )
    # no visual prompts on a CNN: the projector and EduAttention train, the tower is frozen
    names = [n for n, p in s.named_parameters() if p.requires_grad]
    assert names and all(n.startswith(("projector.", "edu_attention.")) for n in names)
    assert s.projector[0].in_features == 1280 and s.arch.vision_tokens == 0 and s.arch.image_size == 64
    full = create_student("timm:tf_efficientnet_lite0", teacher_dim=512, logit_scale=10.0, scope="full")
    assert full.tower_parameters() and all(p.requires_grad for p in full.visual.parameters())
    with pytest.raises(ModelError, match="student.vision_depth=3: .* is a CNN"):
        create_student("timm:tf_efficientnet_lite0", teacher_dim=512, logit_scale=10.0, vision_depth=3)
    with pytest.raises(ModelError, match="student.model 'real:.*'timm:<tower>'"):
        create_student(REAL, teacher_dim=512)


# -- the teacher's learned context in the HF text tower -------------------------------------------
def _embedding_ids_path(teacher, ctx: torch.Tensor, names: list[str]) -> torch.Tensor:
    """The prompted text features computed another way: ``ctx`` appended to the HF word-embedding
    table as new rows, the prompt's placeholders replaced by their ids, and the tower run as
    ``clip.encode_text`` runs it (input ids, its own mask, pooler and projection)."""
    tower = teacher.clip.text
    words = tower.transformer.get_input_embeddings()
    v, n = words.num_embeddings, ctx.shape[0]
    grown = torch.nn.Embedding(v + n, words.embedding_dim)
    with torch.no_grad():
        grown.weight.copy_(torch.cat([words.weight, ctx]))
    tokens = teacher.text.tokenize(teacher.text.prompt_texts(names))
    assert (tokens[:, 1 : 1 + n] == tokens[0, 1]).all()  # each "X" is one token
    tokens[:, 1 : 1 + n] = v + torch.arange(n)
    tower.transformer.set_input_embeddings(grown)
    try:
        return F.normalize(teacher.clip.encode_text(tokens), dim=-1)
    finally:
        tower.transformer.set_input_embeddings(words)


def test_hf_context_prompts_match_the_tower_on_token_ids(real_teacher):
    from comkd.models.prompts import PromptedHFTextEncoder

    t = real_teacher
    assert isinstance(t.text, PromptedHFTextEncoder) and (t.text.n_ctx, t.text.depth) == (4, 1)
    assert set(t.prompt_state_dict()) == {"text.ctx"} and t.embed_dim == 512
    with torch.no_grad():
        # initialised from "a photo of a": W is the plain tokenised "a photo of a {class}." path
        plain = F.normalize(
            t.clip.encode_text(t.text.tokenize([f"a photo of a {c}." for c in NAMES])), dim=-1
        )
        assert (t.class_text_features(NAMES) - plain).abs().max().item() <= 1e-6
        assert (t.encode_text(NAMES, prompted=False) - plain).abs().max().item() <= 1e-6
        # any context: the ids path with the context as new embedding rows
        old = t.text.ctx.detach().clone()
        t.text.ctx.copy_(torch.randn(old.shape, generator=torch.Generator().manual_seed(3)) * 0.05)
        try:
            got, ref = t.encode_text(NAMES), _embedding_ids_path(t, t.text.ctx.detach(), NAMES)
        finally:
            t.text.ctx.copy_(old)
    assert (got - ref).abs().max().item() <= 1e-5
    assert (got - plain).abs().max().item() > 1e-3  # the context does change W


def test_hf_context_is_what_trains_and_deep_prompts_are_refused(real_loaded, real_teacher):
    from comkd.models import ModelError, Teacher, TeacherArch

    t = real_teacher
    t.text.ctx.grad = None
    t.encode_text(NAMES).sum().backward()
    assert t.text.ctx.grad is not None and t.text.ctx.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in t.clip.parameters())
    t.text.ctx.grad = None
    with pytest.raises(
        ModelError, match="deep text prompts .* not built for a Hugging Face .*teacher.text_depth"
    ):
        Teacher(real_loaded, TeacherArch(model=REAL, text_depth=2))
    with pytest.raises(ModelError, match="TimmModel .*teacher.vision_depth"):
        Teacher(real_loaded, TeacherArch(model=REAL, vision_depth=2))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        u = F.normalize(t.clip.encode_image(x), dim=-1)
        expected = t.logit_scale * u @ t.class_text_features(NAMES).t()
        assert t.logit_bias is None
        torch.testing.assert_close(t(x, NAMES), expected)


def test_teacher_logits_carry_a_siglip_logit_bias(tmp_path):
    from comkd.models import create_teacher
    from comkd.models.backbones import MODEL_CONFIG_DIR

    cfg = json.loads((MODEL_CONFIG_DIR / "comkd-tiny-teacher.json").read_text())
    path = tmp_path / "comkd-test-tiny-bias.json"
    path.write_text(json.dumps({**cfg, "init_logit_bias": -10.0}))
    torch.manual_seed(5)
    t = create_teacher(str(path), "none", text_depth=1, vision_depth=1)
    assert float(t.logit_bias) == -10.0
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        u = F.normalize(t.visual(x), dim=-1)
        w = t.class_text_features(NAMES)
        torch.testing.assert_close(t(x, NAMES), t.logit_scale * u @ w.t() - 10.0)


# -- every command on a handful of images ---------------------------------------------------------
CIFAR = SHARED / "cifar10" / "train_subset"


def _run(args: list[str]) -> str:
    from typer.testing import CliRunner

    from comkd import cli

    r = CliRunner().invoke(cli.app, args)
    assert r.exit_code == 0, r.output
    return r.output


def _report(output: str) -> dict:
    """The JSON report a command prints last."""
    return json.loads(output[output.rindex("\n{") + 1 :] if "\n{" in output else output[output.index("{") :])


@pytest.mark.slow
def test_real_towers_through_every_command(tmp_path, one_thread):
    """A real-tower teacher (Lite0 + MiniLM) and student (Lite0, ImageNet weights) at 64 px on 18
    CIFAR-10 images of 3 classes: the teacher's context learns (stage 1), its outputs are cached,
    PromptKD distils online and ComKD from the cache, the student file rebuilds with the teacher's
    W, exports to ONNX with parity, and predicts the same classes in PyTorch and ONNX Runtime."""
    need_lite(0)
    need_minilm()
    pytest.importorskip("onnxruntime")
    if not CIFAR.is_dir():
        pytest.skip(f"no CIFAR-10 images under {CIFAR} (COMKD_SHARED_DATA)")
    from comkd import load_student
    from comkd.models import create_teacher

    root = tmp_path / "images"
    for c in ("airplane", "cat", "ship"):
        (root / c).mkdir(parents=True)
        for i in range(6):
            (root / c / f"{i:04d}.jpg").symlink_to(CIFAR / c / f"{i:04d}.jpg")
    common = [
        *("--dataset", "imagefolder", "--root", str(root), "--teacher", REAL),
        *("--set", "data.image_size=64", "--set", "progress=false", "--set", "data.num_workers=0"),
    ]
    stage1 = _report(
        _run(
            ["train-teacher", *common, "--epochs", "1", "--batch-size", "4", "--out-dir", str(tmp_path / "t")]
        )
    )
    prompts = stage1["prompts"]
    assert stage1["classes"] == ["airplane", "cat"]  # base-to-novel: the base classes
    student = [
        *common,
        *("--student", "timm:tf_efficientnet_lite0", "--set", "student.pretrained=imagenet"),
        *("--set", "student.logit_scale=20", "--set", f"teacher.prompts={prompts}"),
    ]
    cache = _report(_run(["cache-teacher", *student, "--out-dir", str(tmp_path / "cache")]))["cache"]
    _run(
        [
            "distill",
            *student,
            "--method",
            "comkd",
            "--teacher-cache",
            cache,
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--no-evaluate",
            "--out-dir",
            str(tmp_path / "comkd"),
        ]
    )
    _run(
        [
            "distill",
            *student,
            "--method",
            "promptkd",
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--out-dir",
            str(tmp_path / "promptkd"),
        ]
    )
    results = json.loads((tmp_path / "promptkd" / "results.json").read_text())
    assert (results["base"]["classes"], results["novel"]["classes"]) == (2, 1)
    teacher = create_teacher(REAL, prompts=prompts, image_size=64)
    classes = ["airplane", "cat", "ship"]
    w = teacher.class_text_features(classes)
    for run in ("comkd", "promptkd"):
        s = load_student(tmp_path / run / "student.safetensors")
        assert s.classnames == classes and s.preprocess.image_size == 64
        assert (s.edu_attention is not None) == (run == "comkd")
        assert (s.text_features - w).abs().max().item() <= 1e-5  # the cache's W is the teacher's
    student_file = tmp_path / "promptkd" / "student.safetensors"
    onnx = tmp_path / "s.onnx"
    rep = _report(
        _run(
            [
                "export",
                str(student_file),
                "--format",
                "onnx",
                "--out",
                str(onnx),
                "--check-images",
                str(root / "*" / "*.jpg"),
            ]
        )
    )
    assert rep["parity"]["images"] == 18 and rep["parity"]["top1_agreement"] == 1.0
    assert rep["parity"]["max_abs_logit_diff"] < 1e-3
    images = sorted(str(p) for p in root.glob("*/*.jpg"))[::5]
    rows = {}
    for runtime, f in (("torch", student_file), ("onnx", onnx)):
        out = tmp_path / f"{runtime}.jsonl"
        _run(["predict", str(f), *images, "--runtime", runtime, "--no-progress", "--out", str(out)])
        rows[runtime] = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows["torch"]) == len(rows["onnx"]) == len(images) == 4
    for a, b in zip(rows["torch"], rows["onnx"], strict=True):
        assert a["classes"] == b["classes"]
        assert max(abs(x - y) for x, y in zip(a["probs"], b["probs"], strict=True)) < 1e-4

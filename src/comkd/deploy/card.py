"""The model card of a distilled student (``comkd push``), a huggingface_hub ``ModelCard``: scores
from the ``results.json`` beside the student (or ``--results FILE``), the baselines from the
run-level one of the ``comkd run`` / ``comkd demo`` it sits in (``deploy.run_record``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..models.hub import ONNX_FILENAME
from .run_record import METRICS, Scores

METRIC_NAMES = {
    "base": "base-class accuracy",
    "novel": "novel-class accuracy",
    "hm": "harmonic mean",
    "acc": "top-1 accuracy",
}
# loaders that read the user's own files: the data is named by its folder (or file), not the loader
FILE_LOADERS = {"imagefolder", "csv", "unlabelled", "wds"}
MAX_CLASSES_LISTED = 100

TAGS = ["comkd", "clip", "knowledge-distillation", "image-classification", "safetensors"]


def _path_name(p: Any) -> str | None:
    """A folder or file the user named, by its last component (a card never publishes the
    uploader's local directory layout)."""
    if not isinstance(p, str) or not p.strip():
        return None
    return Path(p.strip().rstrip("/")).name or p.strip()


def data_name(data: dict) -> str | None:
    """The data of a config's ``data`` section as the user named it: a registry dataset by its
    name (``oxford_pets``, ``digits``), the user's own images by their folder or file."""
    dataset = data.get("dataset") if isinstance(data.get("dataset"), str) else None
    if dataset in FILE_LOADERS or dataset is None:
        return _path_name(data.get("root")) or dataset
    return dataset


class _Run:
    """What the run's config.yaml (beside the student) says: the data, test set, models, recipe."""

    def __init__(self, config: dict | None, results: dict | None, run: dict | None) -> None:
        c = config or {}
        self.data, self.full, self.distill, self.teacher_cfg = (
            c.get(k) if isinstance(c.get(k), dict) else {} for k in ("data", "full", "distill", "teacher")
        )
        r = results or {}
        self.protocol = _str(r.get("protocol")) or _str(c.get("protocol"))
        self.loader = _str(self.data.get("dataset")) or _str(r.get("dataset"))
        self.pool = data_name(self.data) or _str(r.get("dataset"))
        self.method = _str(self.distill.get("method"))
        self.seed = c.get("seed")
        split = _str(r.get("split")) or _str(c.get("eval_split")) or "test"
        if self.protocol == "full" and _path_name(self.full.get("test")):
            self.test, self.test_what = _path_name(self.full["test"]), "`full.test`, every image"
        elif self.protocol == "full" and self.loader == "unlabelled":
            self.test, self.test_what = None, ""
        else:
            self.test, self.test_what = self.pool, f"its `{split}` split"
        self.split = "test" if self.protocol == "full" and self.full.get("test") else split
        # a full run's teacher: prompted, zero-shot or given prompts
        self.teacher_mode = _str((run or {}).get("teacher_mode")) or _str(r.get("teacher_mode"))


def _str(v: Any) -> str | None:
    return v if isinstance(v, str) and v else None


def _eval_results(scores: Scores, run: _Run) -> list:
    """The distilled student's own scores as huggingface_hub ``EvalResult`` s (the card's
    ``model-index``); the teacher's and the baseline's are in the text, not claimed for this model."""
    from huggingface_hub import EvalResult

    name = run.test or "unknown"
    return [
        EvalResult(
            task_type="image-classification",
            task_name="Image Classification",
            dataset_type=name,
            dataset_name=name,
            dataset_split=run.split,
            metric_type="harmonic_mean" if k == "hm" else "accuracy",
            metric_name=METRIC_NAMES[k],
            metric_value=round(v, 2),
        )
        for k in METRICS
        if (v := scores.student.get(k)) is not None
    ]


def _chance(parts: dict[str, dict[str, int]], k: str, n_classes: int) -> float | None:
    """Chance level (%) of a metric: 100 / the classes of its part (HM: of the two parts')."""
    if k == "hm":
        b, n = _chance(parts, "base", n_classes), _chance(parts, "novel", n_classes)
        return 2 * b * n / (b + n) if b and n else None
    c = (parts.get("all" if k == "acc" else k) or {}).get("classes") or (n_classes if k == "acc" else None)
    return 100.0 / c if c else None


def _table_row(label: str, values: list[float | None]) -> str:
    return f"| {label} | " + " | ".join("–" if v is None else f"{v:.2f}" for v in values) + " |"


def _scores_section(scores: Scores, run: _Run, n_classes: int, models: tuple[str, str]) -> list[str]:
    """The student's scores beside the teacher's, the undistilled student's (the same CLIP,
    zero-shot) and chance (per part: 100 / its classes), and the test-set size."""
    if not scores.student:
        return ["No results.json was given with this student; no scores are claimed."]
    keys = [k for k in METRICS if k in scores.student]
    labels = {
        "teacher": f"teacher `{models[0]}`" + (f" ({run.teacher_mode})" if run.teacher_mode else ""),
        "student_zeroshot": f"student CLIP `{models[1]}` undistilled (zero-shot, its own text tower)",
        Scores.SELF: f"**this student** (distilled with `{run.method or '?'}`)",
    }
    heads = {"base": "base (%)", "novel": "novel (%)", "hm": "HM (%)", "acc": "top-1 (%)"}
    test = f"`{run.test}` ({run.test_what})" if run.test else "the run's test images"
    lines = [
        f"On {test}" + (f", {scores.note}" if scores.note else "") + f"; protocol `{run.protocol or '?'}`:",
        "",
        "| model | " + " | ".join(heads[k] for k in keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for who in ("teacher", "student_zeroshot", Scores.SELF):
        if row := scores.rows.get(who):
            lines.append(_table_row(labels[who], [row.get(k) for k in keys]))
    chance = [_chance(scores.parts, k, n_classes) for k in keys]
    lines += [_table_row("chance level (100 / classes)", chance), ""]
    if not scores.rows.get("teacher") and not scores.rows.get("student_zeroshot"):
        lines += [
            "The results given hold no teacher or undistilled-student scores (the run's own "
            "results.json has them: push the student from its run folder, or give `--results OUT/results.json`).",
            "",
        ]
    sizes = []
    for part in ("base", "novel", "all"):
        s = scores.parts.get(part)
        if s and s.get("images"):
            n = s.get("classes")
            cls = f" of {n} class{'es' if n != 1 else ''}" if n else ""
            sizes.append(f"{part} classes: {s['images']} images{cls}")
    lines.append("Test set size: " + ("; ".join(sizes) if sizes else "not recorded in the results") + ".")
    return lines


def _classes_section(names: list[str]) -> list[str]:
    shown = ", ".join(f"`{n}`" for n in names[:MAX_CLASSES_LISTED])
    if len(names) > MAX_CLASSES_LISTED:
        shown += (
            f", ... and {len(names) - MAX_CLASSES_LISTED} more (`student.classnames` lists all {len(names)})"
        )
    return [f"{len(names)} classes, in the order of its outputs: {shown}."]


def _data_section(run: _Run) -> list[str]:
    if not run.pool:
        return ["No config.yaml was found beside the student file; the data is not recorded."]
    loader = f" (`data.dataset: {run.loader}`)" if run.loader and run.loader != run.pool else ""
    labels = "" if run.loader == "unlabelled" else ", labels not used"
    split = _str(run.distill.get("split")) or "train"
    which = "every image" if run.loader == "unlabelled" else f"the `{split}` images"
    lines = [f"- distilled on unlabelled images: {which} of `{run.pool}`{loader}{labels}"]
    if run.test:
        lines.append(f"- scored on `{run.test}` ({run.test_what})")
    elif run.protocol == "full":
        lines.append("- no labelled test set was given (`full.test`): no scores")
    return lines


def _teacher_section(teacher: dict, run: _Run) -> list[str]:
    if not teacher:
        return ["The student file does not record its teacher."]
    pretrained = _path_name(run.teacher_cfg.get("pretrained"))  # a tag (openai) or a file's name
    return [
        f"- model: `{teacher.get('model')}`"
        + (f" (weights `{pretrained}`)" if pretrained else "")
        + f", input {teacher.get('image_size')} px"
        + (f"; {run.teacher_mode}" if run.teacher_mode else ""),
        f"- weights SHA-256: `{teacher.get('weights_sha256')}`",
        f"- prompts SHA-256: `{teacher.get('prompts_sha256')}`",
        "",
        "New class names need this same teacher (`comkd classes`); another teacher is refused.",
    ]


RECIPE_KEYS = ("method", "recipe", "kd_weight", "temperature", "align_weight", "projector_init", "ifalign_on")


def _recipe_section(distill: dict) -> list[str]:
    if not distill:
        return ["No config.yaml was found beside the student file."]
    optim = distill.get("optim") or {}
    return [f"- `distill.{k}`: `{distill[k]}`" for k in RECIPE_KEYS if k in distill] + [
        f"- `distill.optim.{k}`: `{optim[k]}`"
        for k in ("optimizer", "lr", "epochs", "batch_size")
        if k in optim
    ]


def use_snippet(repo_id: str) -> str:
    """The Python lines of the card's "Install and use" section (run verbatim by a test)."""
    return f"""import comkd

student = comkd.load_student("hf-hub:{repo_id}")
for p in student.predict(["photo1.jpg", "photo2.jpg"], top_k=3):
    print(p.path, p.classes, p.probs)"""


def _use_section(repo_id: str, with_onnx: bool) -> list[str]:
    onnx = f" ONNX Runtime: add `--runtime onnx` (the `{ONNX_FILENAME}` in this repository)."
    return [
        "comkd (the ComKD-CLIP distillation project this student was made with) is not on PyPI: "
        "install it from its source (`pip install -e .` in a checkout of the project), then",
        "",
        "```bash",
        f"comkd predict hf-hub:{repo_id} photos/    # a table: each image's top classes",
        "```",
        "",
        "or in Python:",
        "",
        "```python",
        use_snippet(repo_id),
        "```",
        "",
        "The files come through huggingface_hub's download and cache (`HF_HUB_OFFLINE=1` works from it)."
        + (onnx if with_onnx else ""),
    ]


LIMITS = [
    "- Classifies into the stored class names only; other names need the teacher above.",
    "- Inherits the biases and licence terms of the teacher's and the student's CLIP weights.",
    "- Scores hold for the data named above; check it on your own validation images before use.",
]


def model_card(
    student: Any,
    repo_id: str,
    *,
    results: dict | None = None,
    config: dict | None = None,
    run: dict | None = None,
    license: str | None = "other",
    with_onnx: bool = False,
) -> Any:
    """The README.md of a pushed student, a ``huggingface_hub.ModelCard`` (metadata, the student's
    scores as ``EvalResult`` s, the sections below). ``results``: the student's results.json (any
    shape comkd writes); ``run``: the run-level one (``run_results``), for the baselines."""
    from huggingface_hub import ModelCard, ModelCardData

    r = _Run(config, results, run)
    scores = Scores()
    for res in (results, run):
        scores.add(res, r.method, r.loader, r.seed)
    name = repo_id.split("/")[1]
    evals = _eval_results(scores, r)
    datasets = list(dict.fromkeys(d for d in (r.pool, r.test) if d))
    data = ModelCardData(
        license=license or None,
        library_name="comkd",
        tags=TAGS,
        pipeline_tag="image-classification",
        datasets=datasets or None,
        model_name=name if evals else None,
        eval_results=evals or None,
    )
    names = list(student.classnames or [])
    teacher_model = (student.teacher_identity or {}).get("model") or _str(r.teacher_cfg.get("model"))
    models = (str(teacher_model or "?"), str(student.arch.model))
    edu = " and EduAttention" if student.edu_attention is not None else ""
    pool = f" on unlabelled images of `{r.pool}`" if r.pool else " on unlabelled images"
    what = (
        f"A small CLIP image classifier for {len(names)} classes, distilled with comkd (ComKD-CLIP / "
        f"PromptKD) from a larger CLIP teacher{pool}. Student: `{student.arch.model}` image tower with "
        f"deep visual prompts, a projector{edu}; the teacher's text features of its classes are stored "
        "with it, so it needs no text encoder."
    )
    sections = [
        ("Classes", _classes_section(names)),
        ("Data", _data_section(r)),
        ("Scores", _scores_section(scores, r, len(names), models)),
        ("Teacher", _teacher_section(student.teacher_identity or {}, r)),
        ("Recipe", _recipe_section(r.distill)),
        ("Install and use", _use_section(repo_id, with_onnx)),
        ("Intended use and limits", LIMITS),
    ]
    lines = [f"# {name}", "", what]
    for title, body in sections:
        lines += ["", f"## {title}", "", *body]
    return ModelCard("\n".join(["---", data.to_yaml(), "---", "", *lines, ""]))

"""Publishing a distilled student on the Hugging Face Hub (``comkd push STUDENT ORG/NAME``).

The repository gets ``student.safetensors`` (the student file, data only), ``student.onnx`` when
an ONNX export is given or sits beside the student file, and ``README.md``: a model card built with
huggingface_hub's ``ModelCard`` / ``ModelCardData`` (the YAML metadata the hub indexes: license,
library name, tags, pipeline tag, the data as the user named it, and a ``model-index`` of
``EvalResult`` s with the student's base / novel / HM or accuracy), then its classes, the data it
was distilled on and scored on, its scores beside the teacher's, the undistilled student's and
chance (with the test-set size), the teacher (model and SHA-256 of its weights and prompts), the
recipe from the run's ``config.yaml``, how to install and use it, and its limits. Scores come from
the ``results.json`` beside the student (or ``--results FILE``), and the baselines from the
run-level ``results.json`` of the ``comkd run`` / ``comkd demo`` the student sits in. Fetching is
``comkd.load_student("hf-hub:ORG/NAME")`` (``comkd.models.hub``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from ..models.backbones import ModelError
from ..models.hub import ONNX_FILENAME, STUDENT_FILENAME, parse_hub_ref

TAGS = ["comkd", "clip", "knowledge-distillation", "image-classification", "safetensors"]


_KINDS = {
    bool: "a boolean",
    int: "a number",
    float: "a number",
    str: "text",
    list: "a list",
    dict: "a mapping",
}


def _type_name(v: Any) -> str:
    """What a JSON / YAML value is, in words (with its article)."""
    return "null" if v is None else _KINDS.get(type(v), f"a {type(v).__name__}")


def _check_types(data: dict, path: Path, want: dict[str, tuple[type, ...]], prefix: str = "") -> None:
    """Each key of ``want`` present in ``data`` holds one of its types (or null); else a one-line
    ``ModelError`` naming the file and the key."""
    for key, types in want.items():
        v = data.get(key)
        if v is None or (isinstance(v, types) and not isinstance(v, bool)):
            continue
        kind = (
            "a mapping"
            if dict in types
            else "a list"
            if list in types
            else "a number"
            if int in types
            else "text"
        )
        fix = "give --results FILE or fix it" if path.suffix == ".json" else "fix or remove it"
        raise ModelError(f"{path}: '{prefix}{key}' is {_type_name(v)}, not {kind}; {fix}")


_NUMBER = (int, float)
RESULTS_TYPES = {
    "base": (dict,),
    "novel": (dict,),
    "hm": _NUMBER,
    "acc": _NUMBER,
    "dataset": (str,),
    "protocol": (str,),
    "teacher": (dict,),
    "student_zeroshot": (dict,),
    "methods": (dict,),
    "datasets": (dict,),
    "seeds": (list,),
}
CONFIG_TYPES = {
    "data": (dict,),
    "distill": (dict,),
    "protocol": (str,),
    "full": (dict,),
    "teacher": (dict,),
    "student": (dict,),
}


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise ModelError(f"{path} is not valid JSON; give --results FILE or remove it") from None
    if not isinstance(data, dict):
        raise ModelError(
            f"{path} holds {_type_name(data)}, not a results object (a JSON object with acc or "
            "base/novel/hm); give --results FILE or remove it"
        )
    _check_types(data, path, RESULTS_TYPES)
    for part in ("base", "novel"):
        _check_types(data.get(part) or {}, path, {"acc": _NUMBER}, f"{part}.")
    return data


def _read_yaml(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        raise ModelError(f"{path} is not valid YAML; fix or remove it") from None
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ModelError(f"{path} holds {_type_name(data)}, not a config mapping; fix or remove it")
    _check_types(data, path, CONFIG_TYPES)
    _check_types(data.get("data") or {}, path, {"dataset": (str,), "root": (str,)}, "data.")
    _check_types(data.get("full") or {}, path, {"test": (str,)}, "full.")
    _check_types(data.get("distill") or {}, path, {"optim": (dict,)}, "distill.")
    return data


def _check_dry_run(folder: Path, student_file: Path) -> None:
    """``--dry-run DIR`` must be a new or empty folder: never the student's own folder, a file, a
    path under a file, or a folder holding files (a README.md of the user's) that push would
    overwrite. Checked before anything is written."""
    from ..fileio import folder_problem

    problem = folder_problem(folder)
    if problem:
        raise ModelError(f"--dry-run {folder}: {problem}")
    if not folder.is_dir():
        return
    if folder.resolve() == student_file.resolve().parent:
        raise ModelError(
            f"--dry-run {folder}: the student's own folder (push writes {STUDENT_FILENAME} and README.md "
            "there); give a new or empty folder"
        )
    held = sorted(p.name for p in folder.iterdir())
    if held:
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise ModelError(
            f"--dry-run {folder}: not empty (holds {shown}); push writes {STUDENT_FILENAME} and README.md "
            "there and overwrites nothing of yours: give a new or empty folder"
        )


# -- what the card says about the run -------------------------------------------------------------
METRICS = ("base", "novel", "hm", "acc")
METRIC_NAMES = {
    "base": "base-class accuracy",
    "novel": "novel-class accuracy",
    "hm": "harmonic mean",
    "acc": "top-1 accuracy",
}
# loaders that read the user's own files: the data is named by its folder (or file), not the loader
FILE_LOADERS = {"imagefolder", "csv", "unlabelled", "wds"}
MAX_CLASSES_LISTED = 100


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _count(v: Any) -> int | None:
    return int(v) if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def _size(d: Any) -> dict[str, int]:
    """``{"classes", "images"}`` of one scored part (those recorded)."""
    if not isinstance(d, dict):
        return {}
    return {k: n for k in ("classes", "images") if (n := _count(d.get(k))) is not None}


def _row(v: Any) -> tuple[dict[str, float], dict[str, dict[str, int]]]:
    """The scores (base / novel / hm, or acc) and test-set sizes of one model's result, as
    ``comkd evaluate`` / distill (``{"base": {"acc", "classes", "images"}, ..., "hm"}``), a full run
    (``{"acc", "images", ...}``) or the demo (``{"base": 91.0, ...}``) write it."""
    if not isinstance(v, dict):
        return {}, {}
    scores: dict[str, float | None] = {}
    parts: dict[str, dict[str, int]] = {}
    for k in ("base", "novel"):
        if isinstance(v.get(k), dict):
            scores[k], parts[k] = _num(v[k].get("acc")), _size(v[k])
        else:
            scores[k] = _num(v.get(k))
    scores["hm"], scores["acc"] = _num(v.get("hm")), _num(v.get("acc"))
    if scores["acc"] is not None:
        parts["all"] = _size(v)
    return {k: x for k, x in scores.items() if x is not None}, {k: p for k, p in parts.items() if p}


class _Scores:
    """The scores a card shows: ``rows`` (model -> metric -> %: the distilled student under
    ``SELF``, ``teacher``, ``student_zeroshot`` and any other method of its run), the test-set size
    and class count of each scored part (``base``, ``novel`` or ``all``), and a note (which seed)."""

    SELF = "__self__"

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, float]] = {}
        self.parts: dict[str, dict[str, int]] = {}
        self.note: str | None = None

    def add(self, results: dict | None, method: str | None, dataset: str | None, seed: Any) -> None:
        """Fill what is missing from a ``results.json`` of any shape comkd writes."""
        if not results:
            return
        rows, parts, note = _rows_of(results, dataset, seed)
        methods = [m for m in rows if m not in ("teacher", "student_zeroshot", _Scores.SELF)]
        if _Scores.SELF not in rows and (method in rows or (method is None and len(methods) == 1)):
            rows[_Scores.SELF] = rows[method if method in rows else methods[0]]
        for k, v in rows.items():
            if v and not self.rows.get(k):
                self.rows[k] = v
        for k, v in parts.items():
            self.parts[k] = {**v, **self.parts.get(k, {})}
        self.note = self.note or note

    @property
    def student(self) -> dict[str, float]:
        return self.rows.get(_Scores.SELF, {})


def _rows_of(results: dict, dataset: str | None, seed: Any) -> tuple[dict, dict, str | None]:
    """model -> scores, part -> size, and a note, from a results.json of any shape: a stage's or
    ``comkd evaluate``'s (the student itself), ``comkd run --protocol full``'s (``teacher``,
    ``student_zeroshot``, ``methods``), a base2novel / cross / dg run's (``datasets``: per-seed
    lists) or ``comkd demo``'s (flat, one entry per model)."""
    rows: dict[str, dict[str, float]] = {}
    parts: dict[str, dict[str, int]] = {}
    note = None
    if isinstance(results.get("datasets"), dict):
        table = results["datasets"]
        ds = dataset if dataset in table else next(iter(table)) if len(table) == 1 else None
        if ds is None or not isinstance(table[ds], dict):
            return {}, {}, None
        seeds = results.get("seeds") if isinstance(results.get("seeds"), list) else []
        i = seeds.index(seed) if seed in seeds else 0 if len(seeds) == 1 else None
        for m, v in table[ds].items():
            if not isinstance(v, dict):
                continue
            row = {}
            for k, xs in v.items():
                vals = [_num(x) for x in xs] if k in METRICS and isinstance(xs, list) and xs else [None]
                if None in vals:
                    continue
                row[k] = vals[i] if i is not None and len(vals) == len(seeds) else sum(vals) / len(vals)
            rows[m] = row
        if len(seeds) > 1:
            note = (
                f"seed {seeds[i]} of the run's {len(seeds)}"
                if i is not None
                else f"mean over {len(seeds)} seeds"
            )
        sizes = results.get("test_size")
        if isinstance(sizes, dict) and isinstance(sizes.get(ds), dict):
            parts = {k: s for k, v in sizes[ds].items() if (s := _size(v))}
        return rows, parts, note
    if isinstance(results.get("methods"), dict):
        for name, v in [
            *((n, results.get(n)) for n in ("teacher", "student_zeroshot")),
            *results["methods"].items(),
        ]:
            rows[name], p = _row(v)
            for k, s in p.items():
                parts.setdefault(k, s)
        if isinstance(results.get("test_size"), dict):
            parts = {k: s for k, v in results["test_size"].items() if (s := _size(v))} or parts
        if isinstance(results.get("classes"), list) and parts.get("all"):
            parts["all"].setdefault("classes", len(results["classes"]))
        return rows, parts, None
    own, parts = _row(results)
    if own:
        return {_Scores.SELF: own}, parts, None
    for name, v in results.items():  # the demo: one entry per model
        if (r := _row(v)[0]) and not isinstance(v.get("base"), dict):
            rows[name] = r
    return rows, {}, None


def _belongs(run: dict, student_dir: Path, run_dir: Path) -> bool:
    """Whether the run-level results.json of ``run_dir`` lists the student of ``student_dir``:
    ``OUT/<method>/`` of a full run, ``OUT/<dataset>/seed<k>/<method>/`` of a protocol run."""
    method = student_dir.name
    if isinstance(run.get("methods"), dict):
        return student_dir.parent == run_dir and method in run["methods"]
    table, seeds = run.get("datasets"), run.get("seeds")
    if not isinstance(table, dict) or not isinstance(seeds, list):
        return False
    ds, seed_dir = student_dir.parent.parent.name, student_dir.parent.name
    return (
        student_dir.parent.parent.parent == run_dir
        and isinstance(table.get(ds), dict)
        and method in table[ds]
        and seed_dir in {f"seed{s}" for s in seeds}
    )


def run_results(student_file: Path) -> dict | None:
    """The run-level ``results.json`` of the run that made ``student_file`` (``comkd run`` or
    ``comkd demo``'s ``run/``), where the student sits in it: it holds the teacher's and the
    undistilled student's scores beside the methods'. None when there is none (a file that does
    not parse is passed over: it is not the one the user gave)."""
    here = student_file.resolve().parent
    for up in (here.parent, here.parent.parent.parent):
        try:
            data = _read_json(up / "results.json")
        except (ModelError, OSError):
            continue
        if data and _belongs(data, here, up):
            return data
    return None


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
        sec = {
            k: c.get(k) if isinstance(c.get(k), dict) else {}
            for k in ("data", "full", "distill", "teacher", "student")
        }
        self.data, self.full, self.distill = sec["data"], sec["full"], sec["distill"]
        self.teacher_cfg, self.student_cfg = sec["teacher"], sec["student"]
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


def _eval_results(scores: _Scores, run: _Run) -> list:
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


def _scores_section(scores: _Scores, run: _Run, n_classes: int, models: tuple[str, str]) -> list[str]:
    """The student's scores beside the teacher's, the undistilled student's (the same CLIP,
    zero-shot) and chance (per part: 100 / its classes), and the test-set size."""
    if not scores.student:
        return ["No results.json was given with this student; no scores are claimed."]
    keys = [k for k in METRICS if k in scores.student]
    labels = {
        "teacher": f"teacher `{models[0]}`" + (f" ({run.teacher_mode})" if run.teacher_mode else ""),
        "student_zeroshot": f"student CLIP `{models[1]}` undistilled (zero-shot, its own text tower)",
        _Scores.SELF: f"**this student** (distilled with `{run.method or '?'}`)",
    }
    heads = {"base": "base (%)", "novel": "novel (%)", "hm": "HM (%)", "acc": "top-1 (%)"}
    test = f"`{run.test}` ({run.test_what})" if run.test else "the run's test images"
    lines = [
        f"On {test}" + (f", {scores.note}" if scores.note else "") + f"; protocol `{run.protocol or '?'}`:",
        "",
        "| model | " + " | ".join(heads[k] for k in keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for who in ("teacher", "student_zeroshot", _Scores.SELF):
        row = scores.rows.get(who) or {}
        if row:
            cells = ["–" if row.get(k) is None else f"{row[k]:.2f}" for k in keys]
            lines.append(f"| {labels[who]} | " + " | ".join(cells) + " |")
    chance = [_chance(scores.parts, k, n_classes) for k in keys]
    lines.append(
        "| chance level (100 / classes) | "
        + " | ".join("–" if c is None else f"{c:.2f}" for c in chance)
        + " |"
    )
    lines.append("")
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
            what = {"base": "base classes", "novel": "novel classes", "all": "all classes"}[part]
            n = s.get("classes")
            cls = f" of {n} class{'es' if n != 1 else ''}" if n else ""
            sizes.append(f"{what}: {s['images']} images{cls}")
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
    return "\n".join(
        [
            "import comkd",
            "",
            f'student = comkd.load_student("hf-hub:{repo_id}")',
            'for p in student.predict(["photo1.jpg", "photo2.jpg"], top_k=3):',
            "    print(p.path, p.classes, p.probs)",
        ]
    )


def _use_section(repo_id: str, with_onnx: bool) -> list[str]:
    onnx = (
        f" ONNX Runtime: add `--runtime onnx` (the `{ONNX_FILENAME}` in this repository)."
        if with_onnx
        else ""
    )
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
        + onnx,
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
    """The README.md of a pushed student, a ``huggingface_hub.ModelCard``: metadata from
    ``ModelCardData`` (licence, library, tags, pipeline tag, datasets, and the distilled student's
    scores as ``EvalResult`` s), then what it is, its classes, data, scores beside the teacher's,
    the undistilled student's and chance, its teacher, recipe, how to install and use it, and its
    limits. ``results``: the student's results.json (any shape comkd writes); ``run``: the
    run-level results.json of its run (``run_results``), for the baselines."""
    from huggingface_hub import ModelCard, ModelCardData

    r = _Run(config, results, run)
    scores = _Scores()
    scores.add(results, r.method, r.loader, r.seed)
    scores.add(run, r.method, r.loader, r.seed)
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


def push_student(
    student_file: str | Path,
    repo_id: str,
    *,
    onnx: str | Path | None = None,
    results: str | Path | None = None,
    license: str = "other",
    private: bool = False,
    token: str | None = None,
    api: Any = None,
    dry_run: str | Path | None = None,
) -> dict[str, Any]:
    """Upload a student file, its ONNX export and a model card to the hub repository ``repo_id``
    (created if missing). ``results``: the run's results.json (default: beside the student file);
    ``dry_run``: write the folder that would be uploaded there and upload nothing. ``api``: a
    ``huggingface_hub.HfApi`` (default: a new one)."""
    from ..models.io import load_student

    repo_id, _ = parse_hub_ref(repo_id)
    student_file = Path(student_file)
    if dry_run is not None:
        _check_dry_run(Path(dry_run), student_file)
    student = load_student(student_file)  # checked (digest, shapes, finite) before anything is sent
    onnx_path = Path(onnx) if onnx is not None else student_file.with_suffix(".onnx")
    if onnx is not None and not onnx_path.is_file():
        raise ModelError(f"--onnx {onnx_path} not found")
    with_onnx = onnx_path.is_file()
    if with_onnx:
        from .onnx_runtime import OnnxStudent

        if OnnxStudent(onnx_path).classnames != student.classnames:
            raise ModelError(f"{onnx_path} has other class names than {student_file}; re-export it")
    results_path = Path(results) if results is not None else student_file.parent / "results.json"
    if results is not None and not results_path.is_file():
        raise ModelError(f"--results {results_path} not found")
    card = model_card(
        student,
        repo_id,
        results=_read_json(results_path),
        config=_read_yaml(student_file.parent / "config.yaml"),
        run=run_results(student_file) if results is None else None,  # --results FILE: that file alone
        license=license,
        with_onnx=with_onnx,
    )
    staging = Path(dry_run) if dry_run is not None else Path(tempfile.mkdtemp(prefix="comkd-push-"))
    staging.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copyfile(student_file, staging / STUDENT_FILENAME)
        if with_onnx:
            shutil.copyfile(onnx_path, staging / ONNX_FILENAME)
        card.save(staging / "README.md")
        files = sorted(p.name for p in staging.iterdir())
        if dry_run is not None:
            return {"repo_id": repo_id, "uploaded": False, "folder": str(staging), "files": files}
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi(token=token)
        try:
            api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
            commit = api.upload_folder(
                repo_id=repo_id,
                repo_type="model",
                folder_path=str(staging),
                commit_message=f"comkd push: {student_file.name}",
            )
        except OSError as e:  # huggingface_hub's HTTP errors are OSErrors
            raise ModelError(
                f"push to {repo_id} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            ) from None
        return {
            "repo_id": repo_id,
            "uploaded": True,
            "files": files,
            "url": str(getattr(commit, "commit_url", commit)),
            "load_with": f"hf-hub:{repo_id}",
        }
    finally:
        if dry_run is None:
            shutil.rmtree(staging, ignore_errors=True)

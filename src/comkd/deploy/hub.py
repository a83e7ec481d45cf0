"""Publishing a distilled student on the Hugging Face Hub (``comkd push STUDENT ORG/NAME``).

The repository gets ``student.safetensors`` (the student file, data only), ``student.onnx`` when
an ONNX export is given or sits beside the student file, and ``README.md``: a model card with the
hub's YAML header (license, tags, library name, datasets, pipeline tag, and a ``model-index`` with
the run's base / novel / HM or accuracy from its ``results.json``), the teacher it was distilled
from (model and SHA-256 of its weights and prompts), the recipe from the run's ``config.yaml``,
how to use it, and its limits. Fetching is ``comkd.load_student("hf-hub:ORG/NAME")``
(``comkd.models.hub``).
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
        kind = "a mapping" if dict in types else "a number" if int in types else "text"
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
}
CONFIG_TYPES = {"data": (dict,), "distill": (dict,), "protocol": (str,)}


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
    _check_types(data.get("data") or {}, path, {"dataset": (str,)}, "data.")
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


def card_metrics(results: dict | None) -> list[dict[str, Any]]:
    """The hub metrics of a ``results.json`` written by ``comkd distill`` / ``evaluate``: base,
    novel and HM accuracy for base2novel, else accuracy (percent)."""
    if not results:
        return []
    if "hm" in results:
        parts = [("base", results.get("base", {}).get("acc")), ("novel", results.get("novel", {}).get("acc"))]
        parts.append(("hm", results.get("hm")))
        names = {"base": "base-class accuracy", "novel": "novel-class accuracy", "hm": "harmonic mean"}
        return [
            {
                "type": "accuracy" if k != "hm" else "harmonic_mean",
                "name": names[k],
                "value": round(float(v), 2),
            }
            for k, v in parts
            if isinstance(v, (int, float))
        ]
    if isinstance(results.get("acc"), (int, float)):
        return [{"type": "accuracy", "name": "top-1 accuracy", "value": round(float(results["acc"]), 2)}]
    return []


def card_header(repo_id: str, dataset: str | None, metrics: list[dict], license: str) -> str:
    """The hub's YAML header: licence, library, tags, datasets and a model-index with the scores."""
    header: dict[str, Any] = {
        "license": license,
        "library_name": "comkd",
        "tags": TAGS,
        "pipeline_tag": "image-classification",
    }
    if dataset:
        header["datasets"] = [str(dataset)]
    if metrics:
        header["model-index"] = [
            {
                "name": repo_id.split("/")[1],
                "results": [
                    {
                        "task": {"type": "image-classification", "name": "Image Classification"},
                        "dataset": {"name": str(dataset or "unknown"), "type": str(dataset or "unknown")},
                        "metrics": metrics,
                    }
                ],
            }
        ]
    return "\n".join(["---", yaml.safe_dump(header, sort_keys=False).rstrip(), "---"])


def _scores_section(metrics: list[dict], dataset: str | None, protocol: str | None) -> list[str]:
    if not metrics:
        return ["No results.json was given with this student; no scores are claimed."]
    head = [f"On `{dataset}` ({protocol}, the run's test split):", "", "| metric | value |", "|---|---|"]
    return head + [f"| {m['name']} | {m['value']:.2f} |" for m in metrics]


def _teacher_section(teacher: dict) -> list[str]:
    if not teacher:
        return ["The student file does not record its teacher."]
    return [
        f"- model: `{teacher.get('model')}`, input {teacher.get('image_size')} px",
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


def _use_section(repo_id: str, with_onnx: bool) -> list[str]:
    onnx = (
        f" (ONNX Runtime: `--runtime onnx`, the `{ONNX_FILENAME}` in this repository)." if with_onnx else "."
    )
    return [
        "```python",
        "import comkd",
        "",
        f'student = comkd.load_student("hf-hub:{repo_id}")',
        'print(student.predict("photo.jpg", top_k=3)[0].classes)',
        "```",
        "",
        f"or `comkd predict hf-hub:{repo_id} photos/`" + onnx,
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
    license: str = "other",
    with_onnx: bool = False,
) -> str:
    """The README.md of a pushed student: the hub's YAML header, then what it is, its scores, its
    teacher, its recipe, how to use it and its limits."""
    dataset = (results or {}).get("dataset") or ((config or {}).get("data") or {}).get("dataset")
    protocol = (results or {}).get("protocol") or (config or {}).get("protocol")
    metrics = card_metrics(results)
    edu = " and EduAttention" if student.edu_attention is not None else ""
    what = (
        f"A small CLIP image classifier distilled with comkd (ComKD-CLIP / PromptKD) from a "
        f"larger CLIP teacher. Student: `{student.arch.model}` image tower with deep visual prompts, a "
        f"projector{edu}; {len(student.classnames)} classes stored with it (the teacher's text features), "
        "so it needs no text encoder."
    )
    sections = [
        ("Scores", _scores_section(metrics, dataset, protocol)),
        ("Teacher", _teacher_section(student.teacher_identity or {})),
        ("Recipe", _recipe_section((config or {}).get("distill") or {})),
        ("Use", _use_section(repo_id, with_onnx)),
        ("Intended use and limits", LIMITS),
    ]
    lines = [card_header(repo_id, dataset, metrics, license), "", f"# {repo_id.split('/')[1]}", "", what]
    for title, body in sections:
        lines += ["", f"## {title}", "", *body]
    return "\n".join([*lines, ""])


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
        license=license,
        with_onnx=with_onnx,
    )
    staging = Path(dry_run) if dry_run is not None else Path(tempfile.mkdtemp(prefix="comkd-push-"))
    staging.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copyfile(student_file, staging / STUDENT_FILENAME)
        if with_onnx:
            shutil.copyfile(onnx_path, staging / ONNX_FILENAME)
        (staging / "README.md").write_text(card, encoding="utf-8")
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

"""Publishing a distilled student on the Hugging Face Hub (``comkd push STUDENT ORG/NAME``): the
repository gets ``student.safetensors``, ``student.onnx`` when an ONNX export is given or sits
beside the student file, and ``README.md`` (``deploy.card``). Fetching is ``comkd.models.hub``."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..models.backbones import ModelError
from ..models.hub import ONNX_FILENAME, STUDENT_FILENAME, parse_hub_ref
from .card import model_card
from .run_record import read_json, read_yaml, run_results


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
        results=read_json(results_path),
        config=read_yaml(student_file.parent / "config.yaml"),
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

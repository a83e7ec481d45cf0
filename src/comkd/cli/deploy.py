"""The commands around a distilled student: predict, export, classes, push; and bench, presets."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from ..config import list_presets
from . import train  # noqa: F401  (the training commands register first: comkd --help lists them first)
from .common import (
    _check_out,
    _print_json,
    _print_run,
    _run,
    _usage_error,
    app,
)
from .options import Call, StudentFileArg, command


def _benchmarks() -> None:
    """Make the repository's ``benchmarks`` package (not in a user's wheel) importable from a source
    checkout: the one an editable install points at, or the working folder; elsewhere one line, exit 2."""
    import sys

    for root in (Path(__file__).resolve().parents[3], Path.cwd()):  # src/comkd/cli/deploy.py -> repo
        if (root / "benchmarks" / "run.py").is_file() and (root / "src" / "comkd").is_dir():
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))
            return
    _usage_error(
        "comkd bench: the benchmarks are not installed with the package; run it in a checkout of the "
        "comkd repository (pip install -e . there, or run it from the repository's root folder)"
    )


@app.command()
@command("device", options=("threads",), build=False)
def bench(
    call: Call,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="JSON file to write (an existing folder gets bench.json; default bench.json). The GPU "
            "check needs it, or $OUT (it then writes $OUT/gpu_check.json).",
        ),
    ] = None,
    quick: Annotated[bool, typer.Option(help="A < 1 minute smoke run.")] = False,
    shards: Annotated[str | None, typer.Option(help="WebDataset shards for the data-path figures.")] = None,
    only: Annotated[
        str | None,
        typer.Option(
            help="One section alone, merged into --out: data (the data path), eager (the paper "
            "student's eager images/s at batch 1, 8, 64), limits (the matmul peak and each figure's share), "
            "ranks (cache, warm start and evaluation under torchrun, 2 ranks vs 1 process)."
        ),
    ] = None,
    profile: Annotated[
        str,
        typer.Option(
            help="cpu: the benchmarks above; gpu: the GPU check (paper pair, random weights: stage-2 "
            "images/s online and cached, bf16, torch.compile, stage-1 step time, peak memory, utilisation)."
        ),
    ] = "cpu",
    no_compile: Annotated[
        bool, typer.Option("--no-compile", help="GPU check: leave out every torch.compile measurement.")
    ] = False,
    compile_budget_s: Annotated[
        float | None,
        typer.Option(help="GPU check: skip the compiled measurements left once one compilation took longer."),
    ] = None,
) -> None:
    """Speed and memory benchmarks (JSON with machine and versions)."""
    device, threads = call.flags.get("device", "auto"), call.threads
    _benchmarks()
    from benchmarks.run import check_request

    if out is None:
        if profile == "gpu" and not os.environ.get("OUT"):
            _usage_error(
                "--out: the GPU check needs a file to write (or $OUT, where it writes gpu_check.json)"
            )
        out = Path(os.environ["OUT"]) / "gpu_check.json" if profile == "gpu" else Path("bench.json")
    if compile_budget_s is not None and not compile_budget_s > 0:
        _usage_error(f"--compile-budget-s: must be a positive number of seconds, got {compile_budget_s}")

    try:  # every option, before any work starts
        check_request(
            out, device=device, threads=threads, shards=shards, only=only, profile=profile, quick=quick
        )
    except ValueError as e:
        _usage_error(str(e))
    if profile == "gpu":  # --threads: set by ``command`` before this body
        from benchmarks.gpu_check import gpu_check

        _print_run(
            gpu_check,
            out,
            quick=quick,
            device=device,
            compile=not no_compile,
            compile_budget_s=compile_budget_s,
        )
        return
    from benchmarks import run_bench

    _print_run(run_bench, out, quick=quick, device=device, threads=threads, shards=shards, only=only)


@app.command()
@command(options=(), build=False)
def presets(call: Call) -> None:
    """List the built-in config presets."""
    presets_ = list_presets()
    width = max(map(len, presets_))
    for name, what in presets_.items():
        typer.echo(f"{name:<{width}}  {what}")


# -- using the student --------------------------------------------------------------------------
@app.command("predict")
@command("device", options=(), build=False)
def predict_cmd(
    call: Call,
    student_file: Annotated[
        Path, typer.Argument(help="student.safetensors, its .onnx export, or hf-hub:ORG/NAME.")
    ],
    images: Annotated[list[str], typer.Argument(help="Image files, folders (recursive) or glob patterns.")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="CSV or JSONL file (default: stdout).")
    ] = None,
    fmt: Annotated[
        str | None, typer.Option("--format", help="csv | jsonl (default: from --out's suffix).")
    ] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="Classes per image.")] = 5,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    runtime: Annotated[str, typer.Option(help="auto | torch | onnx (auto: by the file's suffix).")] = "auto",
    progress: Annotated[bool, typer.Option(help="Progress bar on stderr.")] = True,
    skip_bad: Annotated[bool, typer.Option(help="Leave out unreadable images instead of stopping.")] = False,
) -> None:
    """Top-k class names and probabilities for images, one row per image (CSV or JSON lines)."""
    device = call.flags.get("device", "auto")
    _check_out(out)
    from ..data.unlabelled import collect_images
    from ..deploy.predict import load_predictor, predict_files

    def body():
        model = load_predictor(student_file, runtime, device)
        return predict_files(
            model,
            collect_images(images),
            out,
            fmt=fmt,
            top_k=top_k,
            batch_size=batch_size,
            progress=progress,
            skip_bad=skip_bad,
        )

    typer.echo(json.dumps(_run(body), default=str), err=out is None)


@app.command("export")
@command(options=(), build=False)
def export_cmd(
    call: Call,
    student_file: StudentFileArg,
    fmt: Annotated[str, typer.Option("--format", help="onnx | torchscript.")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="File to write (default: next to the student).")
    ] = None,
    check_images: Annotated[
        list[str] | None,
        typer.Option("--check-images", help="Images (files, folders, globs; repeat) to check the export on."),
    ] = None,
    quantize: Annotated[
        str | None, typer.Option(help="int8: also write an int8 ONNX (dynamic quantisation).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per check batch.")] = 64,
) -> None:
    """A deployable student (dynamic batch, preprocessing in the file's metadata), checked against
    PyTorch on real images: top-1 agreement and max |Δ logit|."""
    _check_out(out)  # before the export's work
    from ..data.unlabelled import collect_images
    from ..deploy.export import export_student

    def body():
        images = collect_images(check_images) if check_images else ()
        return export_student(
            student_file, fmt, out, batch_size=batch_size, quantize=quantize, check_images=images
        )

    _print_json(_run(body))


@app.command("classes")
@command("teacher.model", "teacher.pretrained", "teacher.prompts", "device", options=("config", "sets"))
def classes_cmd(
    call: Call,
    student_file: StudentFileArg,
    names: Annotated[Path, typer.Option("--names", help="New class names, one a line.")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="New student file (default: next to it).")
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Skip the check that the teacher is the student's own.")
    ] = False,
) -> None:
    """New class names: W recomputed by the teacher's text tower and prompts, in a new student file.
    Without --config or --teacher the teacher is rebuilt from what the student file records; a
    teacher other than the recorded one is refused, naming the digest that differs."""
    _check_out(out)
    cfg = call.cfg
    from ..deploy.classes import recompute_classes

    from_record = call.config is None and "teacher.model" not in call.flags
    _print_run(recompute_classes, cfg, student_file, names, out, force=force, from_record=from_record)


@app.command("push")
@command(options=(), build=False)
def push_cmd(
    call: Call,
    student_file: Annotated[Path, typer.Argument(help="student.safetensors from distill.")],
    repo_id: Annotated[str, typer.Argument(help="Hub repository ORG/NAME (created if missing).")],
    onnx: Annotated[
        Path | None, typer.Option(help="ONNX export to upload too (default: STUDENT.onnx when it exists).")
    ] = None,
    results: Annotated[
        Path | None, typer.Option(help="results.json for the model card (default: beside the student).")
    ] = None,
    license: Annotated[
        str, typer.Option(help="Licence id for the card's header (e.g. mit, apache-2.0).")
    ] = "other",
    private: Annotated[bool, typer.Option(help="Create the repository private.")] = False,
    token: Annotated[str | None, typer.Option(help="Hub token (default: huggingface_hub's login).")] = None,
    dry_run: Annotated[
        Path | None,
        typer.Option("--dry-run", help="Write the folder that would be uploaded here; upload nothing."),
    ] = None,
) -> None:
    """Publish a student on the Hugging Face Hub: the student file, its ONNX export and a model card
    (scores from results.json, the teacher, the recipe); load it with hf-hub:ORG/NAME."""
    from ..deploy.hub import push_student

    _print_run(
        push_student,
        student_file,
        repo_id,
        onnx=onnx,
        results=results,
        license=license,
        private=private,
        token=token,
        dry_run=dry_run,
    )

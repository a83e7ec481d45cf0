"""The training commands: the three stages, evaluate, run (every stage for a protocol), demo and
cache-teacher, each with the config keys it exposes (``options.command``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from ..config import ConfigError
from .common import (
    _check_seeds,
    _note_method_spelling,
    _print_json,
    _print_run,
    _run,
    _usage_error,
    _write_results,
    app,
)
from .options import CACHE_DTYPES, Call, StudentFileArg, command

DATA = ("data.dataset", "data.root", "data.split_file")
TEACHER = ("teacher.model", "teacher.pretrained")
STUDENT = ("student.model", "student.pretrained")


def optim(stage: str) -> tuple[str, ...]:
    """The flags of a stage's schedule: ``--epochs``, ``--lr``, ``--batch-size``."""
    return tuple(f"{stage}.optim.{k}" for k in ("epochs", "lr", "batch_size"))


@app.command()
@command(
    *DATA[:2], "teacher.model", "student.model", *optim("pretrain"), "seed", "device", stages=("pretrain",)
)
def pretrain(
    call: Call, which: Annotated[str, typer.Option(help="teacher, student or both.")] = "both"
) -> None:
    """Stage 0: contrastive CLIP pre-training (offline teachers and students)."""
    cfg = call.cfg
    if which not in ("teacher", "student", "both"):
        _usage_error(f"--which: {which!r} is not allowed; choose one of teacher, student, both")
    roles = ("teacher", "student") if which == "both" else (which,)
    from ..engine.stages import run_pretrain

    _print_run(run_pretrain, cfg, cfg.output_dir, which=roles, resume=call.resume, overwrite=call.overwrite)


@app.command("train-teacher")
@command(
    *DATA, *TEACHER, "data.num_shots", *optim("train_teacher"), "seed", "device", stages=("train_teacher",)
)
def train_teacher(call: Call) -> None:
    """Stage 1: PromptSRC prompt learning on labelled few-shot base classes."""
    from ..engine.stages import run_train_teacher

    cfg = call.cfg
    _print_run(run_train_teacher, cfg, cfg.output_dir, resume=call.resume, overwrite=call.overwrite)


@app.command()
@command(
    "distill.method",
    "distill.recipe",
    *DATA,
    *TEACHER,
    "teacher.prompts",
    *STUDENT,
    "distill.teacher_cache",
    "distill.kd_weight",
    "distill.align_weight",
    "distill.temperature",
    *optim("distill"),
    "seed",
    "device",
    stages=("distill",),
)
def distill(
    call: Call,
    evaluate: Annotated[
        bool, typer.Option(help="Score the student on the test split and write its scores to results.json.")
    ] = True,
) -> None:
    """Stage 2: distil the teacher into the student on unlabelled images."""
    cfg = call.cfg
    _note_method_spelling(call.flags.get("distill.method"))

    def body():
        from ..protocols.runner import PROTOCOLS, distill_and_score
        from ..runlock import run_lock

        # known before it trains: an own-data stage config scores on its full.test, if any (as the run)
        if evaluate and PROTOCOLS[cfg.protocol].scoring(cfg) is None:
            typer.secho(
                f"note: {cfg.data.dataset} data has no labelled test set (full.test unset), so the student "
                "is not scored; set full.test=FOLDER_OR_CSV to score it",
                fg="yellow",
                err=True,
            )
        with run_lock(cfg.output_dir, overwrite=call.overwrite):  # held until results.json is written
            return distill_and_score(
                cfg, cfg.distill.method, cfg.output_dir, resume=call.resume, score=evaluate
            )

    _print_json(_run(body))


@app.command()
@command(*DATA, "protocol", "device", options=("config", "sets", "out", "old_out", "overwrite"))
def evaluate(
    call: Call,
    student_file: StudentFileArg,
    split: Annotated[str, typer.Option(help="Split to score: test (default) or val.")] = "test",
) -> None:
    """Accuracy of a distilled student (base/novel/HM for base2novel), printed as JSON; with --out-dir
    also written to OUT_DIR/results.json (under the folder's run lock; a run's own results.json is
    kept unless --overwrite)."""
    cfg, out = call.cfg, call.out
    from ..engine.utils import resolve_device
    from ..models.io import load_student

    def body():
        from ..protocols.runner import PROTOCOLS

        if out is not None:  # a cheap refusal before the student is scored
            _check_not_a_runs_results(Path(cfg.output_dir) / "results.json", call.overwrite)
        student = load_student(student_file, resolve_device(cfg.device))
        proto = PROTOCOLS[cfg.protocol]
        ecfg = proto.scoring(cfg)  # an own-data run's labelled test images (full.test)
        if ecfg is None:
            raise ConfigError("protocol full: no labelled test images; set full.test=FOLDER_OR_CSV")
        res = {"protocol": cfg.protocol, **proto.score_student(ecfg, student, split)}
        if out is not None:
            from ..runlock import run_lock

            with run_lock(cfg.output_dir):
                _check_not_a_runs_results(Path(cfg.output_dir) / "results.json", call.overwrite)
                _write_results(Path(cfg.output_dir) / "results.json", {"command": "evaluate", **res})
        return res

    _print_json(_run(body))


def _check_not_a_runs_results(path: Path, overwrite: bool) -> None:
    """``evaluate --out-dir``: a ``results.json`` that another command wrote (a run's: teacher,
    methods, warnings) is not replaced unless ``--overwrite``; an earlier evaluate's is."""
    import json

    if overwrite or not path.exists():
        return
    try:
        held = json.loads(path.read_text())
    except (OSError, ValueError):
        held = None
    if not (isinstance(held, dict) and held.get("command") == "evaluate"):
        raise ValueError(
            f"{path} holds a run's results, which evaluate would replace: give another --out-dir, "
            "or --overwrite to replace it"
        )


@app.command()
@command(
    "protocol",
    "data.root",
    "distill.select",
    "distill.recipe",
    "device",
    repeated=("data.dataset", "seed", "distill.method"),
    stages=("run",),
)
def run(
    call: Call,
    source: Annotated[str, typer.Option(help="cross/dg: the teacher's source dataset.")] = "imagenet",
) -> None:
    """All stages for datasets × seeds × methods, then one results table (report.md)."""
    cfg = call.cfg
    from ..methods import canonical_methods
    from ..protocols.runner import run_protocol

    seeds, methods = call.lists["seed"], call.lists["distill.method"]
    _check_seeds(seeds)
    canon = _run(lambda: canonical_methods(methods))  # a typo fails here, before stage 0
    _note_method_spelling(methods)
    res = _run(
        lambda: run_protocol(
            cfg,
            cfg.output_dir,
            datasets=call.lists["data.dataset"] or None,
            seeds=seeds or None,
            methods=canon,
            resume=call.resume,
            overwrite=call.overwrite,
            source=source,
        )
    )
    typer.echo((Path(cfg.output_dir) / "report.md").read_text())
    return res


@app.command()
@command(stages=("run",), default_config="demo")
def demo(call: Call) -> None:
    """The main job on the embedded digits data: pre-train a tiny teacher and student, prompt-tune
    the teacher on base classes, distil with PromptKD and ComKD, evaluate, write report.md."""
    cfg = call.cfg
    from ..protocols.demo import run_demo

    t0 = time.perf_counter()
    res = _run(lambda: run_demo(cfg, Path(cfg.output_dir), resume=call.resume, overwrite=call.overwrite))
    typer.echo((Path(cfg.output_dir) / "report.md").read_text())
    typer.echo(f"demo finished in {time.perf_counter() - t0:.0f} s; results in {cfg.output_dir}/results.json")
    return res


@app.command("cache-teacher")
@command(
    *DATA,
    *TEACHER,
    "teacher.prompts",
    "student.model",
    "seed",
    "device",
    options=("config", "sets", "out", "old_out", "overwrite", "threads"),
)
def cache_teacher(
    call: Call,
    views: Annotated[
        int | None, typer.Option(help="Augmented views per image (K; default: distill epochs).")
    ] = None,
    dtype: Annotated[str, typer.Option(help="float16, bfloat16 or float32.")] = "float16",
) -> None:
    """Store the teacher's image features for K augmented views of every training image (a folder
    that holds a cache is refused unless --overwrite)."""
    cfg = call.cfg
    if views is not None and views < 1:
        _usage_error(f"--views: must be >= 1, got {views}")
    if dtype not in CACHE_DTYPES:
        _usage_error(f"--dtype: {dtype!r} is not allowed; choose one of {', '.join(CACHE_DTYPES)}")
    from ..engine.stages import run_cache_teacher

    _print_run(run_cache_teacher, cfg, cfg.output_dir, views=views, dtype=dtype, overwrite=call.overwrite)

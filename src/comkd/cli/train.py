"""The training commands: the three stages, evaluate, run (every stage for a protocol), demo and
cache-teacher."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from ..config import ConfigError
from ..config_io import deep_update
from ..methods import METHODS
from .common import (
    _cfg,
    _check_seeds,
    _note_method_spelling,
    _out_dir,
    _plural_alias,
    _print_json,
    _run,
    _set_threads,
    _setup_logging,
    _usage_error,
    _write_results,
    app,
)
from .options import (
    CACHE_DTYPES,
    AlignWeightOpt,
    BatchSizeOpt,
    ConfigOpt,
    DatasetOpt,
    DeviceOpt,
    EpochsOpt,
    KdWeightOpt,
    LrOpt,
    NumShotsOpt,
    OldOutOpt,
    OutOpt,
    OverwriteOpt,
    ProtocolOpt,
    QuietOpt,
    RecipeOpt,
    ResumeOpt,
    RootOpt,
    SeedOpt,
    SetOpt,
    SplitFileOpt,
    StudentOpt,
    StudentPretrainedOpt,
    TeacherOpt,
    TeacherPretrainedOpt,
    TeacherPromptsOpt,
    TemperatureOpt,
    ThreadsOpt,
    VerboseOpt,
    _overrides,
    _stage_optim,
)


@app.command()
def pretrain(
    config: ConfigOpt = None,
    sets: SetOpt = None,
    out: OutOpt = None,
    old_out: OldOutOpt = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    dataset: Annotated[str | None, typer.Option(help="Dataset name (comkd.data.DATASETS).")] = None,
    root: Annotated[Path | None, typer.Option(help="Dataset root folder.")] = None,
    teacher: Annotated[str | None, typer.Option(help="Teacher open_clip model.")] = None,
    student: Annotated[str | None, typer.Option(help="Student open_clip model.")] = None,
    which: Annotated[str, typer.Option(help="teacher, student or both.")] = "both",
    epochs: EpochsOpt = None,
    lr: LrOpt = None,
    batch_size: BatchSizeOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    threads: ThreadsOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Stage 0: contrastive CLIP pre-training (offline teachers and students)."""
    _set_threads(threads)
    _setup_logging(verbose, quiet)
    out = _out_dir(out, old_out)
    ov = deep_update(
        _overrides(dataset=dataset, root=root, teacher=teacher, student=student, seed=seed, device=device),
        _stage_optim("pretrain", epochs, lr, batch_size),
    )
    cfg = _cfg(config, sets, ov, out, stages=("pretrain",))
    if which not in ("teacher", "student", "both"):
        _usage_error(f"--which: {which!r} is not allowed; choose one of teacher, student, both")
    roles = ("teacher", "student") if which == "both" else (which,)
    from ..engine.stages import run_pretrain

    _print_json(
        _run(lambda: run_pretrain(cfg, cfg.output_dir, which=roles, resume=resume, overwrite=overwrite))
    )


@app.command("train-teacher")
def train_teacher(
    config: ConfigOpt = None,
    sets: SetOpt = None,
    out: OutOpt = None,
    old_out: OldOutOpt = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    dataset: DatasetOpt = None,
    root: RootOpt = None,
    split_file: SplitFileOpt = None,
    teacher: TeacherOpt = None,
    teacher_pretrained: TeacherPretrainedOpt = None,
    num_shots: NumShotsOpt = None,
    epochs: EpochsOpt = None,
    lr: LrOpt = None,
    batch_size: BatchSizeOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    threads: ThreadsOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Stage 1: PromptSRC prompt learning on labelled few-shot base classes."""
    _set_threads(threads)
    _setup_logging(verbose, quiet)
    out = _out_dir(out, old_out)
    ov = deep_update(
        _overrides(
            dataset=dataset,
            root=root,
            split_file=split_file,
            teacher=teacher,
            teacher_pretrained=teacher_pretrained,
            num_shots=num_shots,
            seed=seed,
            device=device,
        ),
        _stage_optim("train_teacher", epochs, lr, batch_size),
    )
    cfg = _cfg(config, sets, ov, out, stages=("train_teacher",))
    from ..engine.stages import run_train_teacher

    _print_json(_run(lambda: run_train_teacher(cfg, cfg.output_dir, resume=resume, overwrite=overwrite)))


@app.command()
def distill(
    config: ConfigOpt = None,
    sets: SetOpt = None,
    out: OutOpt = None,
    old_out: OldOutOpt = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    method: Annotated[str | None, typer.Option(help=" | ".join(METHODS))] = None,
    recipe: RecipeOpt = None,
    dataset: DatasetOpt = None,
    root: RootOpt = None,
    split_file: SplitFileOpt = None,
    teacher: TeacherOpt = None,
    teacher_pretrained: TeacherPretrainedOpt = None,
    teacher_prompts: Annotated[str | None, typer.Option(help="Prompts from train-teacher.")] = None,
    student: StudentOpt = None,
    student_pretrained: StudentPretrainedOpt = None,
    teacher_cache: Annotated[str | None, typer.Option(help="Cache from cache-teacher.")] = None,
    kd_weight: KdWeightOpt = None,
    align_weight: AlignWeightOpt = None,
    temperature: TemperatureOpt = None,
    epochs: EpochsOpt = None,
    lr: LrOpt = None,
    batch_size: BatchSizeOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    evaluate: Annotated[
        bool, typer.Option(help="Score the student on the test split and write results.json.")
    ] = True,
    threads: ThreadsOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Stage 2: distil the teacher into the student on unlabelled images."""
    _set_threads(threads)
    _setup_logging(verbose, quiet)
    out = _out_dir(out, old_out)
    ov = deep_update(
        _overrides(
            method=method,
            recipe=recipe,
            dataset=dataset,
            root=root,
            split_file=split_file,
            teacher=teacher,
            teacher_pretrained=teacher_pretrained,
            teacher_prompts=teacher_prompts,
            student=student,
            student_pretrained=student_pretrained,
            teacher_cache=teacher_cache,
            kd_weight=kd_weight,
            align_weight=align_weight,
            temperature=temperature,
            seed=seed,
            device=device,
        ),
        _stage_optim("distill", epochs, lr, batch_size),
    )
    cfg = _cfg(config, sets, ov, out, stages=("distill",))
    _note_method_spelling(method)
    from ..engine.distill import run_distill
    from ..engine.evaluation import evaluate_student
    from ..engine.utils import is_main, resolve_device
    from ..models.io import load_student

    def body():
        from ..protocols.full import scoring_config
        from ..runlock import run_lock

        # what the student will be scored on, known before it trains (a stage config of an own-data
        # run scores on its full.test; one with no labelled test set is not scored, as the run did)
        ecfg = scoring_config(cfg) if evaluate else None
        if evaluate and ecfg is None:
            typer.secho(
                f"note: {cfg.data.dataset} data has no labelled test set (full.test unset), so the student "
                "is not scored; set full.test=FOLDER_OR_CSV to score it",
                fg="yellow",
                err=True,
            )
        with run_lock(cfg.output_dir, overwrite=overwrite):  # held until results.json is written
            info = run_distill(cfg, cfg.output_dir, resume=resume)
            info.pop("history", None)
            if ecfg is not None:
                student_m = load_student(info["student"], resolve_device(cfg.device))
                res = evaluate_student(ecfg, student_m)
                if is_main():
                    _write_results(Path(cfg.output_dir) / "results.json", res)
                info["results"] = res
        return info

    _print_json(_run(body))


@app.command()
def evaluate(
    student_file: Annotated[
        Path, typer.Argument(help="student.safetensors from distill, or hf-hub:ORG/NAME.")
    ],
    config: ConfigOpt = None,
    sets: SetOpt = None,
    out: OutOpt = None,
    old_out: OldOutOpt = None,
    dataset: DatasetOpt = None,
    root: RootOpt = None,
    split_file: SplitFileOpt = None,
    protocol: ProtocolOpt = None,
    split: Annotated[str, typer.Option(help="Split to score: test (default) or val.")] = "test",
    device: DeviceOpt = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace OUT_DIR/results.json when it holds a run's results.")
    ] = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Accuracy of a distilled student (base/novel/HM for base2novel), printed as JSON; with --out-dir
    also written to OUT_DIR/results.json (under the folder's run lock; a run's own results.json is
    kept unless --overwrite)."""
    _setup_logging(verbose, quiet)
    out = _out_dir(out, old_out)
    cfg = _cfg(
        config,
        sets,
        _overrides(dataset=dataset, root=root, split_file=split_file, protocol=protocol, device=device),
        out,
    )
    from ..engine.evaluation import evaluate_student
    from ..engine.utils import resolve_device
    from ..models.io import load_student

    def body():
        if out is not None:  # a cheap refusal before the student is scored
            _check_not_a_runs_results(Path(cfg.output_dir) / "results.json", overwrite)
        student = load_student(student_file, resolve_device(cfg.device))
        from ..protocols.full import scoring_config

        ecfg = scoring_config(cfg)  # an own-data run's labelled test images (full.test)
        if ecfg is None:
            raise ConfigError("protocol full: no labelled test images; set full.test=FOLDER_OR_CSV")
        res = evaluate_student(ecfg, student, split=split)
        if out is not None:
            from ..runlock import run_lock

            with run_lock(cfg.output_dir):
                _check_not_a_runs_results(Path(cfg.output_dir) / "results.json", overwrite)
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
def run(
    config: ConfigOpt = None,
    sets: SetOpt = None,
    out: OutOpt = None,
    old_out: OldOutOpt = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    protocol: Annotated[str | None, typer.Option(help="base2novel | cross | dg | full")] = None,
    dataset: Annotated[list[str] | None, typer.Option(help="Dataset(s); repeat the flag.")] = None,
    root: RootOpt = None,
    seeds: Annotated[
        list[int] | None, typer.Option("--seed", help="Seed(s), as in the other commands; repeat the flag.")
    ] = None,
    methods: Annotated[
        list[str] | None,
        typer.Option("--method", help="Method(s) (" + ", ".join(METHODS) + "); repeat the flag."),
    ] = None,
    old_seeds: Annotated[
        list[int] | None, typer.Option("--seeds", hidden=True, help="Old name of --seed.")
    ] = None,
    old_methods: Annotated[
        list[str] | None, typer.Option("--methods", hidden=True, help="Old name of --method.")
    ] = None,
    source: Annotated[str, typer.Option(help="cross/dg: the teacher's source dataset.")] = "imagenet",
    select: Annotated[str | None, typer.Option(help="last | promptkd")] = None,
    recipe: RecipeOpt = None,
    device: DeviceOpt = None,
    threads: ThreadsOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """All stages for datasets × seeds × methods, then one results table (report.md)."""
    _setup_logging(verbose, quiet)
    _set_threads(threads)
    out = _out_dir(out, old_out)
    seeds = _plural_alias("--seed", seeds, old_seeds)
    methods = _plural_alias("--method", methods, old_methods)
    ov = _overrides(protocol=protocol, root=root, select=select, recipe=recipe, device=device)
    cfg = _cfg(config, sets, ov, out, stages=("run",))
    from ..methods import canonical_methods
    from ..protocols.runner import run_protocol

    _check_seeds(seeds)
    methods_given = methods
    methods = _run(lambda: canonical_methods(methods))  # a typo fails here, before stage 0
    _note_method_spelling(methods_given)
    res = _run(
        lambda: run_protocol(
            cfg,
            cfg.output_dir,
            datasets=dataset,
            seeds=seeds or None,
            methods=methods,
            resume=resume,
            overwrite=overwrite,
            source=source,
        )
    )
    typer.echo((Path(cfg.output_dir) / "report.md").read_text())
    return res


@app.command()
def demo(
    out: OutOpt = None,
    old_out: OldOutOpt = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    threads: ThreadsOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """The main job on the embedded digits data: pre-train a tiny teacher and student, prompt-tune
    the teacher on base classes, distil with PromptKD and ComKD, evaluate, write report.md."""
    _setup_logging(verbose, quiet)
    _set_threads(threads)
    out = _out_dir(out, old_out)
    cfg = _cfg(config or "demo", sets, {}, out, stages=("run",))
    from ..protocols.demo import run_demo

    t0 = time.perf_counter()
    res = _run(lambda: run_demo(cfg, Path(cfg.output_dir), resume=resume, overwrite=overwrite))
    typer.echo((Path(cfg.output_dir) / "report.md").read_text())
    typer.echo(f"demo finished in {time.perf_counter() - t0:.0f} s; results in {cfg.output_dir}/results.json")
    return res


@app.command("cache-teacher")
def cache_teacher(
    config: ConfigOpt = None,
    sets: SetOpt = None,
    out: OutOpt = None,
    old_out: OldOutOpt = None,
    views: Annotated[
        int | None, typer.Option(help="Augmented views per image (K; default: distill epochs).")
    ] = None,
    dtype: Annotated[str, typer.Option(help="float16, bfloat16 or float32.")] = "float16",
    dataset: DatasetOpt = None,
    root: RootOpt = None,
    split_file: SplitFileOpt = None,
    teacher: TeacherOpt = None,
    teacher_pretrained: TeacherPretrainedOpt = None,
    teacher_prompts: TeacherPromptsOpt = None,
    student: StudentOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    overwrite: OverwriteOpt = False,
    threads: ThreadsOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Store the teacher's image features for K augmented views of every training image (a folder
    that holds a cache is refused unless --overwrite)."""
    _set_threads(threads)
    _setup_logging(verbose, quiet)
    out = _out_dir(out, old_out)
    cfg = _cfg(
        config,
        sets,
        _overrides(
            dataset=dataset,
            root=root,
            split_file=split_file,
            teacher=teacher,
            teacher_pretrained=teacher_pretrained,
            teacher_prompts=teacher_prompts,
            student=student,
            seed=seed,
            device=device,
        ),
        out,
    )
    if views is not None and views < 1:
        _usage_error(f"--views: must be >= 1, got {views}")
    if dtype not in CACHE_DTYPES:
        _usage_error(f"--dtype: {dtype!r} is not allowed; choose one of {', '.join(CACHE_DTYPES)}")
    from ..engine.stages import run_cache_teacher

    _print_json(
        _run(lambda: run_cache_teacher(cfg, cfg.output_dir, views=views, dtype=dtype, overwrite=overwrite))
    )

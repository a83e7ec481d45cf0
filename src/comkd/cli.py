"""The ``comkd`` command line (typer). Every command takes ``--config`` (a YAML file or preset
name) and ``--set section.key=value``; named flags override both."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from .config import ConfigError, RunConfig, list_presets, load_config
from .config_io import deep_update
from .methods import METHODS, RECIPE_HELP

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Distil a large CLIP teacher into a small, fast student with ComKD-CLIP.",
    pretty_exceptions_enable=False,
)

CACHE_DTYPES = ("float16", "bfloat16", "float32")
ConfigOpt = Annotated[str | None, typer.Option("--config", "-c", help="YAML config file or preset name.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override any key: section.key=value.")]
OutOpt = Annotated[
    Path | None, typer.Option("--out-dir", help="Folder to write the run into (default: output_dir).")
]
# ``--out`` names a file everywhere (predict, export, classes, bench); on the folder commands it was the
# folder's old name, still taken for now with a warning
OldOutOpt = Annotated[Path | None, typer.Option("--out", hidden=True, help="Old name of --out-dir.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue a killed run from its checkpoint.")]
OverwriteOpt = Annotated[
    bool,
    typer.Option("--overwrite", help="Replace the results of a finished run in --out-dir (else refused)."),
]
RecipeOpt = Annotated[
    str | None,
    typer.Option(
        "--recipe",
        help="Stage-2 reading, every switch at once. "
        + "; ".join(f"{k}: {v}" for k, v in RECIPE_HELP.items())
        + ". Explicit --set keys still win.",
    ),
]


# one help text per option, shared by every command that has it
DeviceOpt = Annotated[
    str | None,
    typer.Option(
        help="Device: auto (default: cuda if available, else mps, else cpu), cpu, cuda, cuda:N, mps."
    ),
]
RootOpt = Annotated[
    Path | None,
    typer.Option(
        help="Dataset root: a CoOp dataset folder, an image folder, a CSV file or WebDataset shards (data.root)."
    ),
]
SplitFileOpt = Annotated[
    Path | None,
    typer.Option(help="CoOp split_zhou_*.json file (data.split_file; default: the dataset's own)."),
]
SeedOpt = Annotated[int | None, typer.Option(help="Run seed (data order, few-shot draw, views).")]
DatasetOpt = Annotated[
    str | None,
    typer.Option(
        help="Dataset name (data.dataset): a CoOp dataset, imagefolder, csv, unlabelled, wds or digits."
    ),
]
TeacherPretrainedOpt = Annotated[
    str | None,
    typer.Option(help="Teacher weights: an open_clip tag, hf-hub:ORG/NAME, a local file, or none (random)."),
]
TeacherOpt = Annotated[
    str | None, typer.Option(help="Teacher open_clip model (e.g. ViT-L-14, comkd-tiny-teacher).")
]
LrOpt = Annotated[float | None, typer.Option(help="This stage's learning rate (<stage>.optim.lr).")]
EpochsOpt = Annotated[int | None, typer.Option(help="This stage's epochs (<stage>.optim.epochs).")]
BatchSizeOpt = Annotated[int | None, typer.Option(help="This stage's batch size (<stage>.optim.batch_size).")]
StudentOpt = Annotated[
    str | None, typer.Option(help="Student open_clip model (e.g. ViT-B-16, comkd-tiny-student) or timm:NAME.")
]
TemperatureOpt = Annotated[float | None, typer.Option(help="KD softmax temperature (distill.temperature).")]
TeacherPromptsOpt = Annotated[
    str | None, typer.Option(help="Teacher prompts file from train-teacher (teacher.prompts).")
]
StudentPretrainedOpt = Annotated[
    str | None,
    typer.Option(help="Student weights: an open_clip tag, hf-hub:ORG/NAME, a local file, or none (random)."),
]
ProtocolOpt = Annotated[
    str | None, typer.Option(help="base2novel | cross | dg | full (how the student is scored).")
]
NumShotsOpt = Annotated[
    int | None, typer.Option(help="Labelled images per class for the teacher's prompts (data.num_shots).")
]
KdWeightOpt = Annotated[
    float | None,
    typer.Option(help="Weight of the KD term (distill.kd_weight; default: the paper's per-dataset value)."),
]
AlignWeightOpt = Annotated[float | None, typer.Option(help="Weight of IFAlign (distill.align_weight).")]


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"comkd {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """Distil a large CLIP teacher into a small, fast student with ComKD-CLIP."""


def _overrides(**flags) -> dict:
    """Map named flags (only those given) to nested config keys."""
    paths = {
        "seed": "seed",
        "device": "device",
        "dataset": "data.dataset",
        "root": "data.root",
        "split_file": "data.split_file",
        "image_size": "data.image_size",
        "num_shots": "data.num_shots",
        "teacher": "teacher.model",
        "teacher_pretrained": "teacher.pretrained",
        "teacher_prompts": "teacher.prompts",
        "student": "student.model",
        "student_pretrained": "student.pretrained",
        "method": "distill.method",
        "recipe": "distill.recipe",
        "kd_weight": "distill.kd_weight",
        "align_weight": "distill.align_weight",
        "temperature": "distill.temperature",
        "teacher_cache": "distill.teacher_cache",
        "select": "distill.select",
        "protocol": "protocol",
        "num_workers": "data.num_workers",
    }
    out: dict = {}
    for name, value in flags.items():
        if value is None:
            continue
        node = out
        *parents, leaf = paths[name].split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = str(value) if isinstance(value, Path) else value
    return out


def _stage_optim(section: str, epochs: int | None, lr: float | None, batch_size: int | None) -> dict:
    o = {k: v for k, v in (("epochs", epochs), ("lr", lr), ("batch_size", batch_size)) if v is not None}
    return {section: {"optim": o}} if o else {}


def _out_dir(out: Path | None, old_out: Path | None) -> Path | None:
    """``--out-dir``, or the old ``--out`` of a folder command (with a warning); both is an error."""
    if old_out is None:
        return out
    if out is not None:
        _usage_error("give the folder once: --out-dir (--out is its old name here)")
    typer.secho("note: --out is now --out-dir for commands that write a folder", fg="yellow", err=True)
    return old_out


def _plural_alias(name: str, given: list | None, old: list | None) -> list | None:
    """A repeatable option of ``run`` under its old plural name (``--seeds``, ``--methods``), taken
    with a note; the two spellings together are an error."""
    if not old:
        return given
    if given:
        _usage_error(f"give {name} once: {name}s is its old name")
    typer.secho(
        f"note: {name}s is now {name} (repeat the flag), as in the other commands", fg="yellow", err=True
    )
    return old


def _cfg(config: str | None, sets: list[str] | None, overrides: dict, out: Path | None) -> RunConfig:
    try:
        cfg = load_config(config, overrides, sets)
    except ConfigError as e:
        typer.secho(f"config error: {e}", fg="red", err=True)
        raise typer.Exit(2) from None
    if out is not None:
        cfg.output_dir = str(out)
    if _QUIET:
        cfg.progress = False
    return cfg


def _usage_error(msg: str) -> None:
    typer.secho(f"config error: {msg}", fg="red", err=True)
    raise typer.Exit(2)


QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Errors only: no warnings, no progress bars.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Also log each step's information.")]
_QUIET = False


def _setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    global _QUIET
    _QUIET = quiet
    level = logging.ERROR if quiet else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("comkd").setLevel(logging.INFO)
    logging.getLogger().handlers[0].setLevel(level)
    for noisy in ("root", "open_clip", "timm"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _run(fn):
    """Run a command body; expected user errors become one red line and exit code 1, and so does
    a full or read-only disk (named as such)."""
    from .data import DataError
    from .engine.loop import NonFiniteLossError
    from .models import ModelError

    try:
        return fn()
    except (ConfigError, DataError, ModelError, NonFiniteLossError, FileNotFoundError, ValueError) as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(1) from None
    except Exception as e:  # noqa: BLE001 - only disk errors are turned into a line; the rest re-raise
        msg = _disk_error(e)
        if msg is None:
            raise
        typer.secho(f"error: {msg}", fg="red", err=True)
        raise typer.Exit(1) from None


def _disk_error(e: BaseException) -> str | None:
    """'disk full' / 'read-only' for an exception from writing a file (torch and safetensors raise
    their own types with the OS message inside), else None."""
    import errno

    code = e.errno if isinstance(e, OSError) else None
    text = str(e)
    where = f" while writing {e.filename}" if isinstance(e, OSError) and e.filename else ""
    if code == errno.ENOSPC or "No space left on device" in text:
        return f"disk full{where}; free some space and rerun (with --resume where the command has it)"
    if code == errno.EROFS or "Read-only file system" in text:
        return (
            f"cannot write{where or ' the output'}: read-only file system; choose another --out-dir or --out"
        )
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied: {e.filename}" if e.filename else f"permission denied ({text})"
    return None


def _write_results(path: Path, res) -> None:
    """Write ``results.json``; if the disk refuses, print the results first so they are not lost."""
    from .engine import pipeline as P

    try:
        P.write_json(path, res)
    except Exception as e:
        if _disk_error(e) is not None:
            typer.echo(json.dumps(res, indent=2, default=str))
        raise


def _read_json(path: Path, what: str):
    """A user-given JSON file, or a one-line error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _shape_errors(path_desc: str, fn):
    """Run ``fn``; a file of the wrong shape (KeyError, TypeError, ...) becomes a ValueError naming it."""
    import yaml

    try:
        return fn()
    except (KeyError, TypeError, AttributeError, IndexError, yaml.YAMLError) as e:
        raise ValueError(
            f"{path_desc}: not the expected content ({type(e).__name__}: {str(e)[:200]})"
        ) from None


def _print_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


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
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Stage 0: contrastive CLIP pre-training (offline teachers and students)."""
    _setup_logging(verbose, quiet)
    out = _out_dir(out, old_out)
    ov = deep_update(
        _overrides(dataset=dataset, root=root, teacher=teacher, student=student, seed=seed, device=device),
        _stage_optim("pretrain", epochs, lr, batch_size),
    )
    cfg = _cfg(config, sets, ov, out)
    if which not in ("teacher", "student", "both"):
        _usage_error(f"--which: {which!r} is not allowed; choose one of teacher, student, both")
    roles = ("teacher", "student") if which == "both" else (which,)
    from .engine.pipeline import run_pretrain

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
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Stage 1: PromptSRC prompt learning on labelled few-shot base classes."""
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
    cfg = _cfg(config, sets, ov, out)
    from .engine.pipeline import run_train_teacher

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
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Stage 2: distil the teacher into the student on unlabelled images."""
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
    cfg = _cfg(config, sets, ov, out)
    from .engine import pipeline as P
    from .models.io import load_student

    def body():
        from .runlock import run_lock

        with run_lock(cfg.output_dir, overwrite=overwrite):  # held until results.json is written
            info = P.run_distill(cfg, cfg.output_dir, resume=resume)
            info.pop("history", None)
            if evaluate:
                student_m = load_student(info["student"], P.resolve_device(cfg.device))
                res = P.evaluate_student(cfg, student_m)
                if P.is_main():
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
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Accuracy of a distilled student (base/novel/HM for base2novel), printed as JSON; with --out-dir
    also written to OUT_DIR/results.json."""
    _setup_logging(verbose, quiet)
    out = _out_dir(out, old_out)
    cfg = _cfg(
        config,
        sets,
        _overrides(dataset=dataset, root=root, split_file=split_file, protocol=protocol, device=device),
        out,
    )
    from .engine import pipeline as P
    from .models.io import load_student

    def body():
        student = load_student(student_file, P.resolve_device(cfg.device))
        ecfg = cfg
        if cfg.protocol == "full":  # the labelled test images of an own-data run (full.test)
            from .protocols.full import eval_config

            ecfg = eval_config(cfg)
            if ecfg is None:
                raise ConfigError("protocol full: no labelled test images; set full.test=FOLDER_OR_CSV")
        res = P.evaluate_student(ecfg, student, split=split)
        if out is not None:
            _write_results(Path(cfg.output_dir) / "results.json", res)
        return res

    _print_json(_run(body))


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
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """All stages for datasets × seeds × methods, then one results table (report.md)."""
    _setup_logging(verbose, quiet)
    out = _out_dir(out, old_out)
    seeds = _plural_alias("--seed", seeds, old_seeds)
    methods = _plural_alias("--method", methods, old_methods)
    ov = _overrides(protocol=protocol, root=root, select=select, recipe=recipe, device=device)
    cfg = _cfg(config, sets, ov, out)
    from .methods import canonical_methods
    from .protocols.runner import run_protocol

    methods = _run(lambda: canonical_methods(methods))  # a typo fails here, before stage 0
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
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """The main job on the embedded digits data: pre-train a tiny teacher and student, prompt-tune
    the teacher on base classes, distil with PromptKD and ComKD, evaluate, write report.md."""
    _setup_logging(verbose, quiet)
    out = _out_dir(out, old_out)
    cfg = _cfg(config or "demo", sets, {}, out)
    from .protocols.demo import run_demo

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
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Store the teacher's image features for K augmented views of every training image."""
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
    from .engine.pipeline import run_cache_teacher

    _print_json(_run(lambda: run_cache_teacher(cfg, cfg.output_dir, views=views, dtype=dtype)))


@app.command()
def bench(
    out: Annotated[Path, typer.Option("--out", "-o", help="JSON file to write.")] = Path("bench.json"),
    quick: Annotated[bool, typer.Option(help="A < 1 minute smoke run.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
    threads: Annotated[int | None, typer.Option(help="torch threads (default: torch's).")] = None,
    shards: Annotated[str | None, typer.Option(help="WebDataset shards for the data-path figures.")] = None,
    only: Annotated[
        str | None, typer.Option(help="'data': only the data-path section, merged into --out.")
    ] = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Speed and memory benchmarks (JSON with machine and versions)."""
    _setup_logging(verbose, quiet)
    from .bench import run_bench

    _print_json(run_bench(out, quick=quick, device=device, threads=threads, shards=shards, only=only))


@app.command()
def presets(quiet: QuietOpt = False, verbose: VerboseOpt = False) -> None:
    """List the built-in config presets."""
    _setup_logging(verbose, quiet)
    presets_ = list_presets()
    width = max(map(len, presets_))
    for name, what in presets_.items():
        typer.echo(f"{name:<{width}}  {what}")


def main() -> None:  # pragma: no cover
    app(sys.argv[1:])


# -- using the student --------------------------------------------------------------------------
@app.command("predict")
def predict_cmd(
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
    device: Annotated[str, typer.Option(help="torch runtime: auto, cpu, cuda, ...")] = "auto",
    progress: Annotated[bool, typer.Option(help="Progress bar on stderr.")] = True,
    skip_bad: Annotated[bool, typer.Option(help="Leave out unreadable images instead of stopping.")] = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Top-k class names and probabilities for images, one row per image (CSV or JSON lines)."""
    _setup_logging(verbose, quiet)
    from .data.unlabelled import collect_images
    from .deploy.predict import load_predictor, predict_files

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

    summary = _run(body)
    typer.echo(json.dumps(summary, default=str), err=out is None)


@app.command("export")
def export_cmd(
    student_file: Annotated[
        Path, typer.Argument(help="student.safetensors from distill, or hf-hub:ORG/NAME.")
    ],
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
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """A deployable student (dynamic batch, preprocessing in the file's metadata), checked against
    PyTorch on real images: top-1 agreement and max |Δ logit|."""
    _setup_logging(verbose, quiet)
    from .data.unlabelled import collect_images
    from .deploy.export import export_student

    _print_json(
        _run(
            lambda: export_student(
                student_file,
                fmt,
                out,
                batch_size=batch_size,
                quantize=quantize,
                check_images=collect_images(check_images) if check_images else (),
            )
        )
    )


@app.command("classes")
def classes_cmd(
    student_file: Annotated[
        Path, typer.Argument(help="student.safetensors from distill, or hf-hub:ORG/NAME.")
    ],
    names: Annotated[Path, typer.Option("--names", help="New class names, one a line.")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="New student file (default: next to it).")
    ] = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    teacher: Annotated[str | None, typer.Option(help="The teacher it was distilled from.")] = None,
    teacher_pretrained: Annotated[str | None, typer.Option(help="That teacher's weights.")] = None,
    teacher_prompts: Annotated[
        str | None, typer.Option(help="That teacher's prompts (train-teacher).")
    ] = None,
    device: DeviceOpt = None,
    force: Annotated[
        bool, typer.Option(help="Skip the check that the teacher is the student's own.")
    ] = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """New class names: W recomputed by the teacher's text tower and prompts, in a new student file.
    Without --config or --teacher the teacher is rebuilt from what the student file records; a
    teacher other than the recorded one is refused, naming the digest that differs."""
    _setup_logging(verbose, quiet)
    cfg = _cfg(
        config,
        sets,
        _overrides(
            teacher=teacher,
            teacher_pretrained=teacher_pretrained,
            teacher_prompts=teacher_prompts,
            device=device,
        ),
        None,
    )
    from .deploy.classes import recompute_classes

    # no --config and no --teacher: the teacher the student file records
    from_record = config is None and teacher is None
    _print_json(
        _run(lambda: recompute_classes(cfg, student_file, names, out, force=force, from_record=from_record))
    )


if __name__ == "__main__":  # pragma: no cover - `python -m comkd.cli` / `torchrun -m comkd.cli`
    main()


@app.command("push")
def push_cmd(
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
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Publish a student on the Hugging Face Hub: the student file, its ONNX export and a model card
    (scores from results.json, the teacher, the recipe); load it with hf-hub:ORG/NAME."""
    _setup_logging(verbose, quiet)
    from .deploy.hub import push_student

    _print_json(
        _run(
            lambda: push_student(
                student_file,
                repo_id,
                onnx=onnx,
                results=results,
                license=license,
                private=private,
                token=token,
                dry_run=dry_run,
            )
        )
    )

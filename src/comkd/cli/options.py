"""Every option of the command line, defined once (name, type, help text) and shared by the
commands that take it, and the table from named flags to the config keys they set."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..methods import RECIPE_HELP

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
    typer.Option(
        help="Teacher weights: an open_clip tag, a local file, or none (random); an hf-hub:ORG/NAME "
        "model names its own (give it as --teacher)."
    ),
]
TeacherOpt = Annotated[
    str | None, typer.Option(help="Teacher open_clip model (e.g. ViT-L-14, comkd-tiny-teacher).")
]
LrOpt = Annotated[float | None, typer.Option(help="This stage's learning rate (<stage>.optim.lr).")]
EpochsOpt = Annotated[int | None, typer.Option(help="This stage's epochs (<stage>.optim.epochs).")]
BatchSizeOpt = Annotated[
    int | None,
    typer.Option(
        help="This stage's batch size (<stage>.optim.batch_size): images a step over all processes; "
        "per process with --set <stage>.optim.batch_per=rank (lr rule: <stage>.optim.lr_scaling)."
    ),
]
StudentOpt = Annotated[
    str | None, typer.Option(help="Student open_clip model (e.g. ViT-B-16, comkd-tiny-student) or timm:NAME.")
]
TemperatureOpt = Annotated[float | None, typer.Option(help="KD softmax temperature (distill.temperature).")]
TeacherPromptsOpt = Annotated[
    str | None, typer.Option(help="Teacher prompts file from train-teacher (teacher.prompts).")
]
StudentPretrainedOpt = Annotated[
    str | None,
    typer.Option(
        help="Student weights: an open_clip tag, a local file, or none (random); an hf-hub:ORG/NAME "
        "model names its own (give it as --student)."
    ),
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

ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        help="CPU threads for torch (default: torch's, one per core); on a busy machine fewer run "
        "faster (two 2-thread jobs on 2 cores ran the demo ~10x slower)."
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Errors only: no warnings, no progress bars.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Also log each step's information.")]


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

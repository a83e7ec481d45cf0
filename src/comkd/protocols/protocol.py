"""What a protocol is: which datasets a run reads, how its teacher is prepared, what the students
are scored on and what row each scored model writes (docs/architecture.md, "A protocol"). The
paper's three are here: ``base2novel`` and ``cross`` / ``dg``; ``full`` is in ``full.py``.

Folder layout of a run ``OUT`` (``Protocol.folder``)::

    OUT/config.yaml, results.json, report.md, plots/
    OUT/<source>/pretrain/              stage 0 (offline presets only; once per source dataset)
    OUT/<source>/seed<k>/teacher/       stage 1 (base2novel: the source is the dataset itself)
    OUT/<dataset>/seed<k>/<method>/     stage 2 + its results.json
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..config import RunConfig
from ..data import DataError
from ..engine.builders import (
    STUDENT_CLIP,
    TEACHER_CLIP,
    TEACHER_PROMPTS,
    build_teacher,
    eval_loader,
    load_role_clip,
    make_dataset,
)
from ..engine.checkpoint import prune_checkpoints
from ..engine.evaluation import (
    clip_logits,
    evaluate,
    evaluate_student,
    evaluate_subset,
    has_val_split,
    student_logits_on,
    teacher_logits,
)
from ..engine.lit import ridge_head
from ..engine.runplan import plan_part
from ..engine.stages import run_pretrain, run_train_teacher
from ..engine.tasks import accuracy, predict
from ..engine.utils import resolve_device
from ..methods import CROSS_KD_WEIGHT, CROSS_STUDENT_VISION_DEPTH

BASE2NOVEL_DATASETS = [
    "imagenet",
    "caltech101",
    "oxford_pets",
    "stanford_cars",
    "oxford_flowers",
    "food101",
    "fgvc_aircraft",
    "sun397",
    "dtd",
    "eurosat",
    "ucf101",
]
CROSS_TARGETS = [d for d in BASE2NOVEL_DATASETS if d != "imagenet"]
DG_TARGETS = ["imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"]


def image_only(cfg: RunConfig) -> bool:
    """Whether the student is an image tower without a text tower of its own (``timm:``)."""
    return cfg.student.model.startswith("timm:")


CLIP_FILES = {"teacher": TEACHER_CLIP, "student": STUDENT_CLIP}


def pretrain_stage(
    cfg: RunConfig,
    out: Path,
    resume: bool,
    data: RunConfig | None = None,
    roles: tuple[str, ...] = ("teacher", "student"),
    pool: RunConfig | None = None,
) -> RunConfig:
    """Stage 0 of ``roles`` into ``out/pretrain`` on ``data`` (default ``cfg``; ``pool``: the
    unlabelled images of ``run_pretrain``), unless ``resume`` finds their weights there: ``cfg``
    with those weights."""
    out = out / "pretrain"
    with plan_part("pretrain"):
        if not (resume and all((out / CLIP_FILES[r]).exists() for r in roles)):
            run_pretrain(data or cfg, out, which=roles, resume=resume, pool=pool)
    prune_checkpoints(out, keep=cfg.keep_checkpoints)
    cfg = copy.deepcopy(cfg)
    for r in roles:
        getattr(cfg, r).pretrained = str(out / CLIP_FILES[r])
    return cfg


def teacher_stage(cfg: RunConfig, out: Path, resume: bool, data: RunConfig | None = None) -> RunConfig:
    """Stage 1 into ``out/teacher`` on ``data`` (default ``cfg``), unless ``resume`` finds its
    prompts there: ``cfg`` with the learned prompts."""
    out = out / "teacher"
    prompts = out / TEACHER_PROMPTS
    with plan_part("teacher"):
        if not (resume and prompts.exists()):
            run_train_teacher(data or cfg, out, resume=resume)
    prune_checkpoints(out, keep=cfg.keep_checkpoints)
    cfg = copy.deepcopy(cfg)
    cfg.teacher.prompts = str(prompts)
    return cfg


def for_dataset(cfg: RunConfig, dataset: str | None) -> RunConfig:
    """A copy of ``cfg`` reading ``dataset`` (a split file belongs to one dataset: dropped)."""
    c = copy.deepcopy(cfg)
    if dataset is not None and dataset != c.data.dataset:
        c.data.dataset = dataset
        c.data.split_file = None
    return c


class Protocol:
    """One protocol; the defaults are the paper's (PromptKD's scripts). Scores are percent."""

    name = ""
    halves = False  # scored on the base and the novel classes with their HM, else on all classes
    default_datasets: list[str] = []

    # -- which datasets ------------------------------------------------------------------------
    def groups(self, cfg: RunConfig, datasets: list[str] | None, source: str) -> list[tuple[str, list[str]]]:
        """(the dataset stage 0 and the teacher learn on, the datasets its students are scored on)."""
        return [(d, [d]) for d in datasets or [cfg.data.dataset]]

    def check_run(self, cfg: RunConfig, datasets: list[str] | None, seeds: list[int]) -> None:
        """Refuse, before any stage, a run this protocol cannot make (one line)."""

    def default_methods(self, cfg: RunConfig) -> list[str]:
        return ["promptkd", "comkd"]

    # -- where and how the stages run --------------------------------------------------------------
    def folder(self, out: Path, dataset: str, seed: int | None = None) -> Path:
        """The folder of ``dataset``'s stages (of one seed, when given)."""
        return out / dataset / (f"seed{seed}" if seed is not None else "")

    def trains_teacher(self, cfg: RunConfig) -> bool:
        return True

    def pretrain(self, cfg: RunConfig, out: Path, resume: bool) -> RunConfig:
        """Stage 0 when ``pretrain.enabled`` (into ``out/pretrain``): ``cfg`` with its weights."""
        return pretrain_stage(cfg, out, resume) if cfg.pretrain.enabled else cfg

    def teacher(self, cfg: RunConfig, out: Path, resume: bool) -> tuple[RunConfig, str]:
        """Stage 1 into ``out/teacher``: ``cfg`` with the learned prompts, and how the teacher was
        prepared (``prompted``)."""
        return teacher_stage(cfg, out, resume), "prompted"

    def target(self, cfg: RunConfig, dataset: str) -> RunConfig:
        """The config that distils and scores on ``dataset`` with the teacher of ``cfg``."""
        return for_dataset(cfg, dataset)

    # -- what is scored ------------------------------------------------------------------------------
    def scoring(self, cfg: RunConfig) -> RunConfig | None:
        """The config whose ``eval_split`` scores the models of ``cfg``; None: nothing to score on.
        Unlabelled data to score on is refused here, in one line, before anything trains."""
        if cfg.data.dataset == "unlabelled":
            raise DataError(
                f"data.root {cfg.data.root}: unlabelled images have no test split to score the student on; "
                "give labelled test images (--set protocol=full --set full.test=FOLDER_OR_CSV) or --no-evaluate"
            )
        return cfg

    def checks_teacher(self, cfg: RunConfig) -> bool:
        """Whether the teacher is scored on val against the undistilled student before stage 2."""
        return has_val_split(cfg)

    def score_teacher(self, cfg: RunConfig, splits: tuple[str, ...]) -> list[dict[str, Any]]:
        """The prompted teacher, built once, scored on each of ``splits`` (``evaluate_teacher``'s
        accuracy)."""
        device = resolve_device(cfg.device)
        teacher = build_teacher(cfg, device).eval()
        return [
            self.measure(cfg, teacher.preprocess, s, lambda ds: teacher_logits(teacher, ds), device)
            for s in splits
        ]

    def score_zero_shot(self, cfg: RunConfig, splits: tuple[str, ...]) -> list[dict[str, Any]]:
        """The undistilled student CLIP, zero-shot with its own text tower, on each of ``splits``
        (``evaluate_clip_zero_shot``'s accuracy); an image-only student (``timm:``):
        ``undistilled_head``, fitted once for all ``splits``."""
        device = resolve_device(cfg.device)
        loaded = load_role_clip(cfg, "student", device)
        if not image_only(cfg):
            return [
                self.measure(
                    cfg,
                    loaded.preprocess,
                    s,
                    lambda ds: clip_logits(loaded, ds, ds.templates, device),
                    device,
                )
                for s in splits
            ]
        teacher, a = self.undistilled_head(cfg, loaded, device)

        def logits_for(ds):  # the tower's features through a [E, D], normalised, against W [C, E]
            w = teacher.class_text_features(ds.full_classnames)[ds.class_indices].float()
            return lambda x: F.normalize(loaded.model(x).float() @ a.t(), dim=-1) @ w.t()

        return [self.measure(cfg, loaded.preprocess, s, logits_for, device) for s in splits]

    @torch.no_grad()
    def measure(self, cfg: RunConfig, spec, split: str, logits_for, device) -> dict[str, Any]:
        """The ``results.json`` entry (``evaluate``'s) on ``split`` of the model whose
        ``images -> logits`` on a dataset ``ds`` is ``logits_for(ds)``."""

        def acc(ds) -> float:
            return accuracy(*predict(logits_for(ds), eval_loader(cfg, ds, device), device))

        return evaluate(cfg, spec, split, acc, self.halves)

    def shots(self, cfg: RunConfig, spec) -> Any:
        """The labelled images the teacher learnt from (stage 1's shots, evaluation transform)."""
        return make_dataset(
            cfg, "train", spec, train=False, subsample=cfg.train_teacher.subsample, few_shot=True
        )

    def undistilled_head(self, cfg: RunConfig, loaded, device) -> tuple[Any, torch.Tensor]:
        """PromptKD's image-only student without distillation: its tower, a linear projection and
        the prompted teacher's class text features W (what the distilled student is scored against).
        The projection is ridge (``engine.lit.ridge_head``, λ = ``pretrain.ridge_lambda``) of the
        tower's features of the teacher's labelled ``shots`` onto W of each shot's class, so it depends
        on the seed. Returns the teacher (eval mode) and the projection ``[E, D]``."""
        loaded.model.eval()
        teacher = build_teacher(cfg, device).eval()
        ds = self.shots(cfg, loaded.preprocess)
        with torch.no_grad():
            w = teacher.class_text_features(ds.full_classnames)[ds.class_indices].float()
        a, _, _ = ridge_head(loaded.model, ds, w, cfg.pretrain.ridge_lambda, device, cfg.data.eval_batch_size)
        return teacher, a.float()

    def score_student(self, cfg: RunConfig, student, split: str) -> dict[str, Any]:
        """The distilled student on ``split`` (``evaluate_student``'s accuracy)."""
        device = next(student.parameters()).device
        return self.measure(cfg, student.preprocess, split, lambda ds: student_logits_on(student, ds), device)

    def select_score(self, cfg: RunConfig):
        """``distill.select: promptkd``: the score each epoch's student is picked by (PromptKD's:
        base-test accuracy for base2novel, test accuracy otherwise)."""

        def fn(student) -> dict:
            if self.halves:
                ds = make_dataset(cfg, "test", student.preprocess, train=False, subsample="base")
                acc = evaluate_subset(student, ds, cfg)
                return {"score": acc, "select_base_test_acc": acc}
            acc = evaluate_student(cfg, student)["acc"]
            return {"score": acc, "select_test_acc": acc}

        return fn

    @staticmethod
    def row(res: dict) -> dict[str, float]:
        """The table row of one scored model: base, novel, hm (or acc)."""
        if "base" in res:
            return {"base": res["base"]["acc"], "novel": res["novel"]["acc"], "hm": res["hm"]}
        return {"acc": res["acc"]}

    def extra_results(self, cfg: RunConfig, mode: str) -> dict[str, Any]:
        """Keys of ``results.json`` particular to this protocol."""
        return {}

    def report(self, results: dict[str, Any], out: Path, curves: dict) -> None:
        from .report import write_report

        write_report(results, out, curves=curves)


class Base2Novel(Protocol):
    """Teacher prompts on the base classes of each dataset; students scored on base and novel."""

    name = "base2novel"
    halves = True


class Transfer(Protocol):
    """``cross`` / ``dg``: one teacher per seed prompt-tuned on all classes of the source dataset,
    then each method on each target (dg: distilled on the target images, transductively), with
    PromptKD's cross-dataset student (``protocol_recipe``)."""

    def __init__(self, name: str, targets: list[str]) -> None:
        self.name, self.default_datasets = name, targets
        self.source: RunConfig | None = None  # the config the teacher learnt on (set by ``target``)

    def groups(self, cfg: RunConfig, datasets: list[str] | None, source: str) -> list[tuple[str, list[str]]]:
        return [(source, list(datasets or self.default_datasets))]

    def shots(self, cfg: RunConfig, spec) -> Any:
        """The source dataset's shots, which the teacher learnt from: an image-only student's
        undistilled projection never sees a target label."""
        if self.source is None:
            raise ValueError(f"{self.name}: shots before any target (the source config is unknown)")
        return super().shots(self.source, spec)

    def target(self, cfg: RunConfig, dataset: str) -> RunConfig:
        self.source = cfg
        c = protocol_recipe(for_dataset(cfg, dataset), self.name)
        if self.name == "dg":
            c.distill.split = "test"
        return c


def _vision_layers(model: str) -> int | None:
    """The image tower's layer count from the open_clip model config (None when unknown)."""
    import open_clip

    from ..models import register_tiny_configs

    register_tiny_configs()
    name = Path(model).stem if model.endswith(".json") else model
    layers = ((open_clip.get_model_config(name) or {}).get("vision_cfg") or {}).get("layers")
    return layers if isinstance(layers, int) else None


def protocol_recipe(cfg: RunConfig, protocol: str) -> RunConfig:
    """``cfg`` with the protocol's student settings filled in where they are unset (None):
    cross/dg get PromptKD's cross-dataset depth and w_kd; base2novel keeps the per-dataset
    w_kd (``methods.paper_kd_weight``) and depth min(9, layers). The values are the recipe's
    (``comkd.methods``: PromptKD's cross-dataset student, docs/method.md "Evaluation")."""
    c = copy.deepcopy(cfg)
    if protocol in ("cross", "dg"):
        if c.student.vision_depth is None:  # capped at the tower's layers, as the default min(9, layers)
            layers = _vision_layers(c.student.model)
            c.student.vision_depth = min(CROSS_STUDENT_VISION_DEPTH, layers or CROSS_STUDENT_VISION_DEPTH)
        if c.distill.kd_weight is None:
            c.distill.kd_weight = CROSS_KD_WEIGHT
    return c

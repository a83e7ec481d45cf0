"""Gathering ``comkd run`` folders into the results page's JSON (``docs/results.json`` and
``docs/curves.json``): the scores, per-epoch curves, the run setup (split and model sizes, wall
times) and EduAttention statistics measured on the saved students (this part loads models; the
page itself, ``experiments.results_page``, only reads JSON). Run through
``python -m experiments.results_page collect``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from comkd.engine.utils import read_metrics, write_json

CURVE_KEYS = ("epoch", "loss", "kd", "align", "alpha", "time_s", "feature")


def _count_params(module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def _model_sizes(name: str, image_size: int | None) -> dict[str, Any]:
    from comkd.models import load_clip

    loaded = load_clip(name, None, image_size=image_size)
    m = loaded.model
    vcfg = (loaded.config or {}).get("vision_cfg", {}) if isinstance(loaded.config, dict) else {}
    return {
        "model": name,
        "params": _count_params(m),
        "vision_params": _count_params(m if loaded.is_timm else m.visual),  # timm: an image tower alone
        "vision_width": vcfg.get("width"),
        "vision_layers": vcfg.get("layers"),
        "patch_size": vcfg.get("patch_size"),
        "embed_dim": (loaded.config or {}).get("embed_dim"),
    }


def _split_sizes(cfg) -> dict[str, int]:
    from comkd.data import load_splits
    from comkd.engine.builders import loader_options

    s = load_splits(cfg.data.dataset, cfg.data.root, **loader_options(cfg))
    return {k: len(s.split(k)) for k in s.split_names}


def _epoch_records(path: Path) -> list[dict]:
    return [{k: r[k] for k in CURVE_KEYS if k in r} for r in read_metrics(path) if r.get("type") == "epoch"]


def _step_records(path: Path) -> list[dict]:
    return [
        {k: r[k] for k in ("epoch", "step", "kd", "align", "alpha", "loss") if k in r}
        for r in read_metrics(path)
        if "type" not in r and "step" in r
    ]


def _last_epoch(path: Path, stage: str, key: str) -> float | None:
    recs = [
        r for r in read_metrics(path) if r.get("type") == "epoch" and r.get("stage") == stage and key in r
    ]
    return float(recs[-1][key]) * (100.0 if key == "acc" else 1.0) if recs else None


def _stage_seconds(path: Path, stage_prefix: str = "") -> float:
    return float(
        sum(
            r.get("time_s", 0.0)
            for r in read_metrics(path)
            if r.get("type") == "epoch" and str(r.get("stage", "")).startswith(stage_prefix)
        )
    )


def attention_stats(
    student_path: Path, cfg, max_images: int = 10_000, split: str = "test"
) -> dict[str, float]:
    """EduAttention on the ``split`` images of a saved student: normalised entropy of the weights over
    the N classes (1 = uniform, 0 = one class), the mean largest weight, how often the most
    attended class is the student's own prediction, |f_e − u_s| / |u_s|, and the mean cosine
    of each image's FC_o(f_att) to their mean (1 = the same vector for every image)."""
    import torch

    from comkd.engine.builders import make_dataset
    from comkd.models.io import load_student

    student = load_student(student_path, "cpu")
    ea = student.edu_attention
    ds = make_dataset(cfg, split, student.preprocess, train=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=256, shuffle=False, num_workers=0)
    w = student.text_features
    ent, top, agree, ratio, n = 0.0, 0.0, 0.0, 0.0, 0
    deltas, preds = [], []
    with torch.no_grad():
        for images, *_ in loader:
            pred = student(images).logits.argmax(-1)
            preds.append(pred)
            n += len(images)
            if ea is None:
                if n >= max_images:
                    break
                continue
            u = student.encode(images)
            delta, attn = ea.attend(u, w.to(u.dtype))
            a = attn.mean(1)  # [B, N], averaged over heads
            ent += float((-(a.clamp_min(1e-12).log() * a).sum(-1) / math.log(a.shape[-1])).sum())
            top += float(a.max(-1).values.sum())
            agree += float((a.argmax(-1) == pred).float().sum())
            ratio += float(((ea(u, w.to(u.dtype)) - u).norm(dim=-1) / u.norm(dim=-1)).sum())
            deltas.append(delta)
            if n >= max_images:
                break
    p = torch.cat(preds)
    modal = 100 * float(torch.bincount(p).max()) / len(p)
    if ea is None:
        return {"modal_class_share": modal, "images": n, "classes": int(w.shape[0])}
    with torch.no_grad():
        d = torch.cat(deltas)
        same = float(torch.nn.functional.cosine_similarity(d, d.mean(0, keepdim=True)).mean())
    return {
        "alpha": float(ea.alpha.detach()),
        "gate": float(ea.gate().detach()),
        "mode": ea.mode,
        "entropy": ent / n,
        "max_weight": top / n,
        "argmax_is_prediction": 100 * agree / n,
        "delta_over_u": ratio / n,
        "delta_cos_to_mean": same,
        "modal_class_share": modal,
        "images": n,
        "classes": int(w.shape[0]),
    }


def collect_runs(
    runs: dict[str, str | Path],
    out_results: str | Path,
    out_curves: str | Path | None = None,
    *,
    attention: bool = True,
) -> tuple[dict, dict]:
    """Gather ``comkd run`` folders (``{label: run_dir}``) into ``out_results`` (results.json in the
    page's format, datasets renamed to ``label``) and ``out_curves`` (training curves, setup,
    EduAttention statistics). A run folder holds one base2novel dataset."""
    from comkd.config import load_config

    results: dict[str, dict] = {}
    extra: dict[str, Any] = {"curves": {}, "steps": {}, "setup": {}, "attention": {}, "step0": {}}
    for label, run_dir in runs.items():
        run_dir = Path(run_dir)
        res = json.loads((run_dir / "results.json").read_text())
        if res.get("protocol") != "base2novel" or len(res["datasets"]) != 1:
            raise ValueError(f"{run_dir}: expected a base2novel run over one dataset")
        ((ds_key, table),) = res["datasets"].items()
        results[label] = table
        cfg = load_config(run_dir / "config.yaml")
        seeds = res.get("seeds") or []
        ds_dir = run_dir / ds_key
        curves: dict[str, list] = {}
        distill_s: dict[str, list[float]] = {}
        for m in table:
            if m in ("teacher", "student_zeroshot"):
                continue
            curves[m] = [_epoch_records(ds_dir / f"seed{s}" / m / "metrics.jsonl") for s in seeds]
            distill_s[m] = [_stage_seconds(ds_dir / f"seed{s}" / m / "metrics.jsonl") for s in seeds]
        extra["curves"][label] = curves
        step0: dict[str, list] = {}
        for m in curves:
            per_seed = [
                json.loads(p.read_text()).get("step0")
                for p in (ds_dir / f"seed{s}" / m / "results.json" for s in seeds)
                if p.exists()
            ]
            if per_seed and all(per_seed):
                step0[m] = per_seed
        extra["step0"][label] = step0
        extra["steps"][label] = (
            {m: _step_records(ds_dir / f"seed{seeds[0]}" / m / "metrics.jsonl") for m in curves}
            if seeds
            else {}
        )
        pre = ds_dir / "pretrain"
        pre_res = json.loads((pre / "results.json").read_text()) if (pre / "results.json").exists() else {}
        wall = (
            json.loads((run_dir / "wall_time.json").read_text())
            if (run_dir / "wall_time.json").exists()
            else {}
        )
        extra["setup"][label] = {
            "run_dir": str(run_dir),
            "dataset": cfg.data.dataset,
            "root": cfg.data.root,
            "split_file": cfg.data.split_file,
            "subdir": cfg.data.subdir,
            "fractions": cfg.data.fractions,
            "split_seed": cfg.data.split_seed,
            "image_size": cfg.data.image_size,
            "num_shots": cfg.data.num_shots,
            "splits": _split_sizes(cfg),
            "pretrain_split": cfg.pretrain.split,
            "distill_split": cfg.distill.split,
            "pools": cfg.data.pools,
            "test_folder": cfg.data.test_folder,
            "pretrain_splits": {
                "teacher": cfg.pretrain.teacher_split or cfg.pretrain.split,
                "student": cfg.pretrain.student_split or cfg.pretrain.split,
            },
            "pretrain_eval_split": pre_res.get("teacher", {}).get("eval_split"),
            # images each tower pre-trained on (fewer than its split with pretrain.*_shots)
            "pretrain_images": {
                r: pre_res[r]["pool_images"]
                for r in ("teacher", "student")
                if "pool_images" in pre_res.get(r, {})
            },
            "pretrain_shots": {"teacher": cfg.pretrain.teacher_shots, "student": cfg.pretrain.student_shots},
            "seeds": seeds,
            "teacher": _model_sizes(cfg.teacher.model, cfg.data.image_size),
            "student": _model_sizes(cfg.student.model, cfg.data.image_size),
            "pretrain": {
                "epochs": cfg.pretrain.optim.epochs,
                "batch_size": cfg.pretrain.optim.batch_size,
                "teacher_epochs": cfg.pretrain.teacher_epochs or cfg.pretrain.optim.epochs,
                "student_epochs": cfg.pretrain.student_epochs or cfg.pretrain.optim.epochs,
                "teacher_lr": cfg.pretrain.teacher_lr or cfg.pretrain.optim.lr,
                "student_lr": cfg.pretrain.student_lr or cfg.pretrain.optim.lr,
                "teacher_zero_shot": pre_res.get("teacher", {}).get("zero_shot_acc"),
                "student_zero_shot": pre_res.get("student", {}).get("zero_shot_acc"),
                "teacher_train_acc": _last_epoch(pre / "metrics.jsonl", "pretrain_teacher", "acc"),
                "student_train_acc": _last_epoch(pre / "metrics.jsonl", "pretrain_student", "acc"),
                "teacher_s": _stage_seconds(pre / "metrics.jsonl", "pretrain_teacher"),
                "student_s": _stage_seconds(pre / "metrics.jsonl", "pretrain_student"),
            },
            "teacher_train": {
                "epochs": cfg.train_teacher.optim.epochs,
                "batch_size": cfg.train_teacher.optim.batch_size,
                "lr": cfg.train_teacher.optim.lr,
                "seconds": [_stage_seconds(ds_dir / f"seed{s}" / "teacher" / "metrics.jsonl") for s in seeds],
            },
            "distill": {
                "epochs": cfg.distill.optim.epochs,
                "batch_size": cfg.distill.optim.batch_size,
                "lr": cfg.distill.optim.lr,
                "warmup_epochs": cfg.distill.optim.warmup_epochs,
                "kd_weight": _kd_weight(cfg),
                "align_weight": cfg.distill.align_weight,
                "optimizer": cfg.distill.optim.optimizer,
                "crop_scale_min": cfg.distill.augment.crop_scale_min,
                "edu_mode": cfg.student.edu_mode,
                "projector": cfg.student.projector,
                "projector_bn": cfg.student.projector_bn,
                "projector_init": cfg.distill.projector_init,
                "ifalign_on": cfg.distill.ifalign_on,
                "scope": cfg.student.scope,
                "temperature": cfg.distill.temperature,
                "seconds": distill_s,
                # None when the run's saved config predates the key (the plain rate, 1.0)
                "edu_lr_scale": (yaml.safe_load((run_dir / "config.yaml").read_text()) or {})
                .get("distill", {})
                .get("edu_lr_scale"),
            },
            "wall_time_s": wall.get("seconds"),
            "wall_time": wall,
        }
        if attention:
            att: dict[str, list] = {}
            for m in table:
                if m in ("teacher", "student_zeroshot"):
                    continue
                paths = [ds_dir / f"seed{s}" / m / "student.safetensors" for s in seeds]
                stats = [attention_stats(p, cfg) for p in paths if p.exists()]
                if stats:
                    att[m] = stats
            extra["attention"][label] = att
    _merge_variants(results, extra)
    write_json(out_results, results)
    if out_curves is not None:
        write_json(out_curves, extra)
    return results, extra


def _merge_variants(results: dict, extra: dict) -> None:
    """Fold a run labelled ``LABEL+VARIANT`` (e.g. ``cifar10+paper``: the same stage 0 and 1, stage 2
    in another reading) into ``LABEL``: its distillation methods become ``<method>_<variant>`` rows,
    its stage-2 setup ``setup[LABEL]["distill_<variant>"]``. Its teacher and undistilled student
    must equal ``LABEL``'s (the same stages 0 and 1), else it is refused."""
    for label in [k for k in results if "+" in k]:
        base, _, variant = label.partition("+")
        if base not in results:
            raise ValueError(f"run {label!r}: no run labelled {base!r} to add variant {variant!r} to")
        table = results.pop(label)
        for ref in ("teacher", "student_zeroshot"):
            if ref in table and table[ref] != results[base].get(ref):
                raise ValueError(
                    f"run {label!r}: its {ref} differs from {base!r}'s; a variant must reuse stages 0-1"
                )
        renamed = {m: f"{m}_{variant}" for m in table if m not in ("teacher", "student_zeroshot")}
        for m, new in renamed.items():
            results[base][new] = table[m]
        for key in ("curves", "steps", "attention", "step0"):
            part = extra.get(key, {}).pop(label, {})
            for m, v in part.items():
                extra[key].setdefault(base, {})[renamed.get(m, m)] = v
        setup = extra.get("setup", {}).pop(label, None)
        if setup is not None and base in extra.get("setup", {}):
            extra["setup"][base][f"distill_{variant}"] = setup["distill"]
            if setup.get("wall_time"):
                extra["setup"][base].setdefault("variant_wall_times", {})[variant] = setup["wall_time"]


def _kd_weight(cfg) -> float:
    from comkd.config_rules import resolve_recipe

    return resolve_recipe(cfg).distill.kd_weight


# -- the page ----------------------------------------------------------------------------------

"""Choose the stage-2 recipe on VALIDATION data (never the test images).

    python -m experiments.sweep_recipe --preset demo --base runs/demo/run [--seeds 1 2 3]

Each variant is a list of ``--set`` overrides on top of the preset (``paper``: the ``<preset>_paper``
preset instead). Stage 0, and stage 1 of each seed where present, are reused from ``--base`` (a
run of the same preset: ``BASE/<dataset>/pretrain``, ``BASE/<dataset>/seed<k>/teacher``), so only
stage 2 runs again; every variant's teacher, undistilled student and distilled students are
evaluated on the ``val`` split (``eval_split=val``). Writes ``experiments/results/sweep_<preset>.json``
with the per-seed val HMs of every variant and method (``--json-out``: also a copy for the results
page, e.g. ``docs/sweep_demo.json``); the recipe is the variant with the best mean ComKD val HM.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

VARIANTS: dict[str, list[str]] = {
    # the recipe's pieces: bounded cosine EduAttention, frozen-BN projector warm-started by ridge,
    # IFAlign on the projector output, AdamW with a small step
    "mlp_lr1e-4": [],
    "mlp_lr3e-4": ["distill.optim.lr=0.0003"],
    "mlp_lr3e-5": ["distill.optim.lr=0.00003"],
    "linear_lr1e-4": ["student.projector=linear"],
    "linear_lr3e-4": ["student.projector=linear", "distill.optim.lr=0.0003"],
    "mlp_lr1e-4_crop0.5": ["distill.augment.crop_scale_min=0.5"],
    "full_scope": ["student.scope=full"],  # the tower learns too, at distill.tower_lr_scale x lr
    "paper": [],  # the `<preset>_paper` preset: stage 2 in the paper's plain reading
}


def _val_attention(out: Path, res: dict) -> dict[str, list[float]]:
    """EduAttention of each seed's saved comkd student on the val images: normalised entropy and how
    often the most-attended class is the student's prediction (experiments.results_page)."""
    from comkd.config import load_config
    from experiments.results_collect import attention_stats

    cfg = load_config(out / "config.yaml")
    ((ds_key, _),) = res["datasets"].items()
    stats = [
        attention_stats(p, cfg, split="val")
        for p in (out / ds_key / f"seed{s}" / "comkd" / "student.safetensors" for s in res.get("seeds") or [])
        if p.exists()
    ]
    stats = [x for x in stats if "entropy" in x]
    if not stats:
        return {}
    return {k: [x[k] for x in stats] for k in ("entropy", "argmax_is_prediction")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", required=True)
    ap.add_argument(
        "--base", required=True, help="finished run folder of the same preset (its pretrain is reused)"
    )
    ap.add_argument("--out", default="runs/sweep")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1])
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument(
        "--json-out", default=None, help="also write the summary here (e.g. docs/sweep_demo.json)"
    )
    ap.add_argument(
        "--set", dest="sets", action="append", default=[], help="extra overrides for every variant"
    )
    ap.add_argument(
        "--variant",
        dest="custom",
        action="append",
        default=[],
        help="an extra variant NAME=KEY=VALUE[,KEY=VALUE...] (run with the built-in ones named in --variants)",
    )
    ap.add_argument(
        "--methods", nargs="+", default=["promptkd", "comkd"], help="methods per variant (comkd decides)"
    )
    args = ap.parse_args()
    for item in args.custom:
        name, _, sets = item.partition("=")
        VARIANTS[name] = [x for x in sets.split(",") if x]
        if name not in args.variants:
            args.variants.append(name)
    base = Path(args.base)
    (ds_dir,) = [p for p in base.iterdir() if (p / "pretrain").is_dir()]
    code = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    summary: dict = {"preset": args.preset, "split": "val", "seeds": args.seeds, "code": code, "variants": {}}
    for name in args.variants:
        out = Path(args.out) / args.preset / name
        if not (out / ds_dir.name / "pretrain").exists():
            (out / ds_dir.name).mkdir(parents=True, exist_ok=True)
            shutil.copytree(ds_dir / "pretrain", out / ds_dir.name / "pretrain")
        # stage 1 does not depend on a stage-2 variant: reuse it when the base has it (not for a
        # variant of stage 1 itself or of the teacher's prompts)
        stage1_variant = any(
            x.startswith(("train_teacher.", "teacher_train.", "teacher."))
            for x in [*VARIANTS[name], *args.sets]
        )
        for s in args.seeds:
            teacher = ds_dir / f"seed{s}" / "teacher"
            if (
                not stage1_variant
                and (teacher / "teacher_prompts.safetensors").exists()
                and not (out / ds_dir.name / f"seed{s}").exists()
            ):
                shutil.copytree(teacher, out / ds_dir.name / f"seed{s}" / "teacher")
        cmd = [
            sys.executable,
            "-m",
            "comkd.cli",
            "run",
            "--config",
            f"{args.preset}_paper" if name == "paper" else args.preset,
            "--out-dir",
            str(out),
            "--resume",
            *[x for m in args.methods for x in ("--method", m)],
            "--set",
            "eval_split=val",
            "--set",
            "progress=false",
        ]
        for s in args.seeds:
            cmd += ["--seed", str(s)]
        for s in [*VARIANTS[name], *args.sets]:
            cmd += ["--set", s]
        base_res = base / "results.json"
        if (
            name != "paper"
            and not VARIANTS[name]
            and not args.sets
            and base_res.exists()
            and json.loads(base_res.read_text()).get("split") == "val"
        ):
            res = json.loads(base_res.read_text())  # the base run is this variant, already scored on val
            summary["variants"][name] = {
                "sets": [],
                "from": str(base),
                **{m: v["hm"] for m, v in next(iter(res["datasets"].values())).items()},
            }
            att = _val_attention(base, res)
            if att:
                summary["variants"][name]["comkd_attention_val"] = att
            print(name, "from", base, flush=True)
            continue
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        res = json.loads((out / "results.json").read_text())
        (table,) = res["datasets"].values()
        assert res["split"] == "val"
        summary["variants"][name] = {"sets": VARIANTS[name] + args.sets, **{m: table[m]["hm"] for m in table}}
        if name == "paper":
            summary["variants"][name]["preset"] = f"{args.preset}_paper"
        att = _val_attention(out, res)
        if att:
            summary["variants"][name]["comkd_attention_val"] = att
        row = {
            m: round(sum(v) / len(v), 2)
            for m, v in summary["variants"][name].items()
            if m not in ("sets", "preset", "comkd_attention_val")
        }
        print(name, row, flush=True)
    best = max(summary["variants"], key=lambda k: sum(summary["variants"][k]["comkd"]))
    summary["chosen"] = best
    path = Path("experiments/results") / f"sweep_{args.preset}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=1))
    print("chosen on val:", best, "->", path)


if __name__ == "__main__":
    main()

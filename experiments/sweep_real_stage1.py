"""The stage-1 choice of the real-towers evidence (docs/results.md "Real pretrained towers"): the
teacher's CoOp context (optimiser, learning rate, epochs) on its base shots, scored on the val split
(base, novel, HM), seed 1, never on test images. Writes docs/real_stage1_sweep.json.

    python -m experiments.sweep_real_stage1 [STAGE0_TEACHER_FILE]   (default: run_real_evidence.sh's)
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from comkd.config import load_config
from comkd.engine.builders import build_teacher
from comkd.engine.evaluation import evaluate_teacher
from comkd.engine.stages import run_train_teacher
from comkd.engine.utils import resolve_device

GRID = [("sgd", 0.002, 5), ("sgd", 0.02, 10), ("sgd", 0.2, 10), ("adamw", 0.002, 10)]


def sweep(preset: str, stage0: str, work: Path) -> list[dict]:
    base = load_config(preset, sets=[f"teacher.pretrained={stage0}", "progress=false"])
    rows = []
    for opt, lr, epochs in GRID:
        c = copy.deepcopy(base)
        o = c.train_teacher.optim
        o.optimizer, o.lr, o.epochs = opt, lr, epochs
        out, t0 = work / f"{Path(preset).stem}_{opt}_{lr}_{epochs}", time.time()
        run_train_teacher(c, out)
        c.teacher.prompts = str(out / "teacher_prompts.safetensors")
        res = evaluate_teacher(c, build_teacher(c, resolve_device("cpu")), split="val", halves=True)
        rows.append(
            {
                "optimizer": opt,
                "lr": lr,
                "epochs": epochs,
                "val_base": res["base"]["acc"],
                "val_novel": res["novel"]["acc"],
                "val_hm": res["hm"],
                "seconds": round(time.time() - t0, 1),
            }
        )
        print(Path(preset).stem, rows[-1], flush=True)
    return rows


def main() -> None:
    torch.set_num_threads(2)
    stage0 = sys.argv[1] if len(sys.argv) > 1 else "runs/real_evidence/stage0/teacher_clip.safetensors"
    with tempfile.TemporaryDirectory() as tmp:
        found = {
            name: sweep(f"experiments/configs/{name}_real.yaml", stage0, Path(tmp))
            for name in ("cifar10", "dtd10")
        }
    Path("docs/real_stage1_sweep.json").write_text(
        json.dumps({"seed": 1, "split": "val", "runs": found}, indent=1)
    )


if __name__ == "__main__":
    main()

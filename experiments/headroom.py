"""Headroom probe: how much could any gate-type reading of ComKD add on top of a trained PromptKD
student? No training of the student: on its saved features, each candidate head is fitted alone
(everything else frozen) to the same KD objective stage 2 minimises, and scored on the val pool.

Heads, each a map from the student feature u_s ``[B, d]`` and the stored class features W
``[N, d]`` to logits ``[B, N]`` that starts as PromptKD's own (so a fit can only lower the KL):

* ``cosine gate``: EduAttention's cosine reading, u_s + tanh(α)·norm(FC_o(softmax(τ·cos(Q, K))V));
* ``paper gate``: the paper's reading, u_s + α·FC_o(softmax(QKᵀ/√C)V);
* ``feature offset``: u_s + b, one vector b ∈ R^d for every image;
* ``logit temperature``: the logits times one scalar;
* ``class bias``: the logits plus one bias per class.

The student's own fused-feature normalisation (``renorm_fused``) is applied after each feature
head, as in its forward. Reported per head and seed: the KD loss on the distillation pool before and
after (its relative reduction), the same on the val pool, and val base / novel / HM accuracy.

    python -m experiments.headroom RUN_DIR --out docs/headroom.json

RUN_DIR is a ``comkd run`` folder of one base2novel dataset with a ``promptkd`` student per seed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn.functional as F
import typer
from torch import nn

HEADS = ("cosine gate", "paper gate", "feature offset", "logit temperature", "class bias")


def kd_loss(q_s: torch.Tensor, q_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(q_t/T) ‖ softmax(q_s/T)) · T², averaged over images (the KD term of stage 2
    without its weight)."""
    t = temperature
    kl = F.kl_div(F.log_softmax(q_s / t, -1), F.log_softmax(q_t / t, -1), log_target=True, reduction="sum")
    return kl * t * t / q_s.shape[0]


class Head(nn.Module):
    """One candidate on top of frozen (u_s, W): logits = scale · g(u_s) · Wᵀ, then a logit map."""

    def __init__(self, kind: str, dim: int, classes: int, scale: float, renorm: bool):
        super().__init__()
        from comkd.models.edu_attention import EduAttention

        if kind not in HEADS:
            raise ValueError(f"unknown head {kind!r}; choose one of {', '.join(HEADS)}")
        self.kind, self.scale, self.renorm = kind, scale, renorm
        self.edu = (
            EduAttention(dim, mode="cosine" if kind == "cosine gate" else "paper", init_temperature=scale)
            if kind.endswith("gate")
            else None
        )
        self.offset = nn.Parameter(torch.zeros(dim)) if kind == "feature offset" else None
        self.log_t = nn.Parameter(torch.zeros(())) if kind == "logit temperature" else None
        self.bias = nn.Parameter(torch.zeros(classes)) if kind == "class bias" else None

    def forward(self, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        f = self.edu(u, w) if self.edu is not None else u
        if self.offset is not None:
            f = f + self.offset
        if self.renorm:
            f = F.normalize(f, dim=-1)
        q = self.scale * f @ w.t()
        if self.log_t is not None:
            q = q * self.log_t.exp()
        if self.bias is not None:
            q = q + self.bias
        return q


def fit_head(
    head: Head, u: torch.Tensor, w: torch.Tensor, q_t: torch.Tensor, temperature: float, steps: int, lr: float
) -> list[float]:
    """Full-batch Adam on the KD loss; returns the loss every 50 steps."""
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    trace = []
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = kd_loss(head(u, w), q_t, temperature)
        loss.backward()
        opt.step()
        if i % 50 == 0:
            trace.append(float(loss.detach()))
    return trace


def base_novel_hm(
    logits: torch.Tensor, labels: torch.Tensor, base: list[int], novel: list[int]
) -> dict[str, float]:
    """Accuracy on base and novel images, logits sliced to each half (as the evaluation does)."""
    from comkd.stats import harmonic_mean

    out = {}
    for name, idx in (("base", base), ("novel", novel)):
        pos = {c: i for i, c in enumerate(idx)}
        keep = torch.tensor([int(y) in pos for y in labels])
        y = torch.tensor([pos[int(v)] for v in labels[keep]])
        out[name] = 100.0 * float((logits[keep][:, idx].argmax(-1) == y).float().mean())
    out["hm"] = harmonic_mean(out["base"], out["novel"])
    return out


@torch.no_grad()
def _features(cfg, student, teacher, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """u_s, u_t and labels (over all classes) for the unaugmented images of ``split``."""
    from comkd.engine.builders import eval_loader, make_dataset
    from comkd.engine.tasks import adapt_images

    ds = make_dataset(cfg, split, student.preprocess, train=False, subsample="all")
    us, ut, ys = [], [], []
    for images, y, _ in eval_loader(cfg, ds, torch.device("cpu")):
        us.append(student.encode(images))
        ut.append(teacher.encode_image(adapt_images(images, student.preprocess, teacher.preprocess)))
        ys.append(torch.as_tensor(y))
    labels = torch.as_tensor(ds.class_indices)[torch.cat(ys)]  # indices into W
    return torch.cat(us), torch.cat(ut), labels


def probe_seed(
    stage2_dir: Path, *, steps: int, lr: float, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Every head fitted alone on one seed's PromptKD student (``stage2_dir``: its stage-2 folder)."""
    from comkd import load_student
    from comkd.config import load_config
    from comkd.engine.builders import build_teacher, make_dataset

    cfg = load_config(stage2_dir / "config.yaml")
    student = load_student(stage2_dir / "student.safetensors").eval()
    if student.edu_attention is not None:
        raise ValueError(f"{stage2_dir}: the probe starts from a student without EduAttention (promptkd)")
    teacher = build_teacher(cfg, torch.device("cpu")).eval()
    w = student.text_features.float()
    s_s, s_t, t = float(student.logit_scale), float(teacher.logit_scale), float(cfg.distill.temperature)
    u_tr, ut_tr, _ = _features(cfg, student, teacher, cfg.distill.split)
    u_va, ut_va, y_va = _features(cfg, student, teacher, "val")
    q_tr, q_va = s_t * ut_tr @ w.t(), s_t * ut_va @ w.t()
    base = list(make_dataset(cfg, "val", student.preprocess, train=False, subsample="base").class_indices)
    novel = list(make_dataset(cfg, "val", student.preprocess, train=False, subsample="novel").class_indices)
    renorm = bool(student.arch.renorm_fused)
    res: dict[str, Any] = {"images": {"pool": len(u_tr), "val": len(u_va)}, "heads": {}}
    with torch.no_grad():
        q0_tr, q0_va = s_s * F.normalize(u_tr, dim=-1) @ w.t(), s_s * F.normalize(u_va, dim=-1) @ w.t()
        res["promptkd"] = {
            "kd_pool": float(kd_loss(q0_tr, q_tr, t)),
            "kd_val": float(kd_loss(q0_va, q_va, t)),
            **base_novel_hm(q0_va, y_va, base, novel),
            "teacher_val": base_novel_hm(q_va, y_va, base, novel),
        }
    for kind in HEADS:
        torch.manual_seed(0)
        head = Head(kind, w.shape[1], w.shape[0], s_s, renorm)
        with torch.no_grad():
            start = float(kd_loss(head(u_tr, w), q_tr, t))
        trace = fit_head(head, u_tr, w, q_tr, t, steps, lr)
        with torch.no_grad():
            q1_tr, q1_va = head(u_tr, w), head(u_va, w)
            row = {
                "kd_start": start,
                "kd_pool": float(kd_loss(q1_tr, q_tr, t)),
                "kd_val": float(kd_loss(q1_va, q_va, t)),
                "trace": trace,
                **base_novel_hm(q1_va, y_va, base, novel),
            }
        p0 = res["promptkd"]
        row["kd_pool_reduction_pct"] = 100.0 * (p0["kd_pool"] - row["kd_pool"]) / p0["kd_pool"]
        row["kd_val_reduction_pct"] = 100.0 * (p0["kd_val"] - row["kd_val"]) / p0["kd_val"]
        row["hm_change"] = row["hm"] - p0["hm"]
        res["heads"][kind] = row
        log(
            f"  {kind}: pool KD {p0['kd_pool']:.4f} -> {row['kd_pool']:.4f} "
            f"({row['kd_pool_reduction_pct']:+.2f}%), val HM {p0['hm']:.2f} -> {row['hm']:.2f}"
        )
    return res


def summarise(per_seed: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Mean and sample std over seeds of each head's KL reductions and val HM change."""
    from comkd.stats import mean_std

    out = {}
    for kind in HEADS:
        rows = [r["heads"][kind] for r in per_seed.values()]
        out[kind] = {}
        for key in ("kd_pool_reduction_pct", "kd_val_reduction_pct", "hm_change"):
            m, s = mean_std([r[key] for r in rows])
            out[kind][key] = m
            out[kind][key + "_sd"] = s
    return out


app = typer.Typer(add_completion=False, help=__doc__.split("\n\n")[0])


@app.command()
def main(
    run_dir: Annotated[Path, typer.Argument(help="A `comkd run` folder (base2novel, one dataset).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="JSON file to write.")] = Path(
        "docs/headroom.json"
    ),
    method: Annotated[str, typer.Option(help="The stage-2 folder probed in every seed.")] = "promptkd",
    steps: Annotated[int, typer.Option(help="Full-batch Adam steps per head.")] = 1000,
    lr: Annotated[float, typer.Option(help="Adam learning rate of the heads.")] = 1e-2,
) -> None:
    """Fit each head alone on every seed's saved student; write per-seed figures and the summary."""
    from comkd.engine.utils import write_json
    from experiments.results_page import headroom_table

    res = json.loads((run_dir / "results.json").read_text())
    ((ds_key, _),) = res["datasets"].items()
    per_seed = {}
    for s in res["seeds"]:
        d = run_dir / ds_key / f"seed{s}" / method
        typer.echo(f"seed {s}: {d}")
        per_seed[str(s)] = probe_seed(d, steps=steps, lr=lr, log=typer.echo)
    summary = summarise(per_seed)
    write_json(
        out,
        {
            "run": str(run_dir),
            "dataset": ds_key,
            "method": method,
            "steps": steps,
            "lr": lr,
            "seeds": per_seed,
            "summary": summary,
        },
    )
    typer.echo("\n".join(headroom_table(summary, len(per_seed))))
    typer.echo(f"wrote {out}")


if __name__ == "__main__":
    app()

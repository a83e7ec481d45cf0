"""The machine's limit, measured in the same run: the dense matmul peak of the device with GEMMs
shaped like the models' own, and each model figure's share of it (model FLOP utilisation).

A ViT block's big GEMMs multiply ``rows = batch × tokens`` activations by the MLP's
``width × 4·width`` and ``4·width × width`` weights (and attention's ``width × 3·width``); the peak
is the best GFLOP/s (2 FLOPs per multiply-add) over those shapes for each model width. On CPU it
is fp32; on CUDA fp32 (TF32 off), tf32 and bf16.
"""

from __future__ import annotations

import time
from typing import Any


def paper_towers(image_size: int = 224) -> dict[str, tuple[int, int]]:
    """(width, tokens) of the paper pair's image towers at ``image_size`` px: ViT-L/14 (257 tokens
    at 224 px) and ViT-B/16 (197, plus its 4 visual prompt tokens)."""
    return {
        "vit_l14": (1024, (image_size // 14) ** 2 + 1),
        "vit_b16": (768, (image_size // 16) ** 2 + 1 + 4),
    }


def gemm_shapes(width: int, tokens: int, batch: int) -> list[tuple[int, int, int]]:
    """``(m, k, n)`` of a ViT block's three largest GEMMs for ``batch`` images."""
    rows = batch * tokens
    return [(rows, width, 4 * width), (rows, 4 * width, width), (rows, width, 3 * width)]


def _dtypes(device) -> dict[str, Any]:
    import torch

    if device.type == "cuda":
        return {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}
    return {"fp32": torch.float32}


def time_gemm(m: int, k: int, n: int, dtype, device, min_s: float, tf32: bool = False) -> float:
    """GFLOP/s of ``[m, k] @ [k, n]`` in ``dtype``: one warm-up, then repeats until ``min_s``
    seconds have passed (at least 2), synchronised on CUDA."""
    import torch

    from .timing import sync

    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=g).to(device=device, dtype=dtype)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        with torch.no_grad():
            a @ b
            sync(device)
            reps, t0 = 0, time.perf_counter()
            while reps < 2 or time.perf_counter() - t0 < min_s:
                a @ b
                reps += 1
            sync(device)
            elapsed = time.perf_counter() - t0
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return 2.0 * m * k * n * reps / elapsed / 1e9


def matmul_peak(device, batch: int, min_s: float = 0.5, towers: dict | None = None) -> dict[str, Any]:
    """The device's dense matmul peak: per dtype, the best GFLOP/s over the towers' GEMM shapes
    for ``batch`` images, with every shape's figure (``shapes``) to show how much it varies."""
    towers = towers or paper_towers()
    out: dict[str, Any] = {"batch": batch, "shapes": {}}
    for name, dtype in _dtypes(device).items():
        best = 0.0
        for tower, (width, tokens) in towers.items():
            for m, k, n in gemm_shapes(width, tokens, batch):
                gf = time_gemm(m, k, n, dtype, device, min_s, tf32=name == "tf32")
                out["shapes"][f"{name} {tower} {m}x{k}x{n}"] = gf
                best = max(best, gf)
        out[f"{name}_gflops_per_s"] = best
    return out


def utilisation(images_per_s: float, gflops_per_image: float, peak_gflops_per_s: float) -> dict[str, float]:
    """Achieved GFLOP/s of a model figure and its share of the peak (model FLOP utilisation)."""
    achieved = images_per_s * gflops_per_image
    return {
        "gflops_per_s": achieved,
        "mfu": achieved / peak_gflops_per_s if peak_gflops_per_s > 0 else float("nan"),
    }


def limits_section(res: dict[str, Any], device, batch: int, image_size: int, min_s: float) -> dict[str, Any]:
    """``matmul_peak`` and the utilisation of the paper pair's teacher and student forwards (from
    figures already in ``res``: images/s and GFLOPs per image), and of the deployed student in
    each runtime at batch 1 and at its batch (the student's GFLOPs per image from ``res``)."""
    peak = matmul_peak(device, batch, min_s, paper_towers(image_size))
    peak["image_size"] = image_size
    p32 = peak["fp32_gflops_per_s"]
    out: dict[str, Any] = {"matmul_peak": peak}
    for role in ("teacher", "student"):
        ips, gf = res.get(f"paper_{role}_images_per_s"), res.get(f"paper_{role}_gflops_per_image")
        if ips and gf:
            out[f"paper_{role}_utilisation"] = utilisation(ips, gf, p32)
    by_batch, gf = res.get("eager_student_images_per_s_by_batch"), res.get("paper_student_gflops_per_image")
    if isinstance(by_batch, dict) and gf:
        out["eager_student_utilisation_by_batch"] = {b: utilisation(v, gf, p32) for b, v in by_batch.items()}
    dep = res.get("deployed_student")
    if isinstance(dep, dict) and gf and dep.get("student") == "ViT-B-16":
        b = dep["batch"]
        rates = {
            f"{rt} b1": 1000.0 / ms
            for rt, ms in dep.get("latency_ms_b1", {}).items()
            if rt != "teacher_eager"
        }
        rates |= {
            f"{rt} b{b}": v for rt, v in dep.get(f"throughput_ips_b{b}", {}).items() if rt != "teacher_eager"
        }
        out["deployed_student_utilisation"] = {k: utilisation(v, gf, p32) for k, v in rates.items() if v > 0}
    return out

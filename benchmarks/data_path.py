"""Data-path benchmarks (part of ``comkd bench``): WebDataset shards against a folder of the same
images, and the peak memory of a streamed distillation epoch as the pool grows.

* ``read_rate``: images per second read, decoded and transformed (the distillation train
  transform at the student's input size) in one process, from the shards (streamed by
  ``WdsImageDataset``) and from a folder holding the same images as files (written from the shards
  into a temporary folder, read by ``ImageDataset``).
* ``epoch_peak_memory``: one online distillation epoch (tiny teacher and student, random weights)
  over pools of 1x, 2x and 4x ``items`` samples streamed from the shards, each in a fresh
  process; the figure is the growth of the peak resident memory over the process's baseline after
  the imports. Streaming keeps it flat: only the index (keys and labels) grows with the pool.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_SHARDS = "../shared/data/cifar10/train_wds/cifar10-train-{000000..000004}.tar"


def find_shards(shards: str | None) -> str | None:
    """``shards`` if given; else the CIFAR-10 training shards next to the repository, if present."""
    if shards:
        return shards
    from comkd.data.errors import DataError
    from comkd.data.wds import expand_shards

    try:
        expand_shards(DEFAULT_SHARDS)
    except DataError:
        return None
    return DEFAULT_SHARDS


def _drain(dataset: Any) -> int:
    n = 0
    for _ in dataset:
        n += 1
    return n


def read_rate(shards: str, items: int, image_size: int = 32, reps: int = 3) -> dict[str, Any]:
    """Images per second (median of ``reps``) from the shards and from a folder of the same images."""
    from comkd.data import build_dataset, build_transform
    from comkd.data.dataset import ImageDataset
    from comkd.data.records import Datum
    from comkd.data.wds import iter_shard, parse_item_path

    tf = build_transform(image_size, train=True, scale=(0.8, 1.0))
    ds = build_dataset("wds", shards, "train", tf, pools=[f"train=0:{items}"])
    with tempfile.TemporaryDirectory(prefix="comkd-bench-folder-") as tmp:
        files: list[Datum] = []
        by_shard: dict[str, dict[str, Datum]] = {}
        for d in ds.data:
            shard, key = parse_item_path(d.path)
            by_shard.setdefault(shard, {})[key] = d
        for shard, keys in by_shard.items():
            for key, data in iter_shard(shard):
                if key in keys and data is not None:
                    p = Path(tmp) / str(keys[key].label) / f"{key.replace('/', '_')}.jpg"
                    p.parent.mkdir(exist_ok=True)
                    p.write_bytes(data)
                    files.append(Datum(str(p), keys[key].label, keys[key].classname))
        folder = ImageDataset(files, ds.classnames, tf)
        rates: dict[str, list[float]] = {"shards": [], "folder": []}
        _drain(ds), _drain(folder)  # warm the page cache for both
        for _ in range(reps):
            for name, src in (("shards", ds), ("folder", folder)):
                t0 = time.perf_counter()
                n = _drain(src)
                rates[name].append(n / (time.perf_counter() - t0))
    med = {k: sorted(v)[len(v) // 2] for k, v in rates.items()}
    return {
        "images": len(ds),
        "image_size": image_size,
        "images_per_s": med,
        "shards_vs_folder": med["shards"] / med["folder"],
        "reps": reps,
    }


def _peak_rss_mb() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def distill_epoch_peak(shards: str, items: int, batch: int = 32, threads: int = 1) -> dict[str, Any]:
    """Run one streamed online distillation epoch in this process; peak memory growth in MB."""
    import torch

    from comkd.config import OptimConfig
    from comkd.data import build_dataset, build_transform
    from comkd.engine.loop import fit
    from comkd.engine.tasks import DistillTask, TeacherOutputs
    from comkd.losses import build_loss
    from comkd.models import TINY_STUDENT, TINY_TEACHER, create_student, create_teacher

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    teacher = create_teacher(TINY_TEACHER, image_size=32)
    student = create_student(TINY_STUDENT, teacher_dim=teacher.embed_dim, image_size=32)
    tf = build_transform(32, train=True, scale=(0.8, 1.0))
    ds = build_dataset(
        "wds",
        shards,
        "train",
        None,
        pools=[f"train=0:{items}"],
        train_transform=tf,
        view_seed=1,
        unlabelled=True,
    )
    w = teacher.class_text_features(ds.full_classnames)
    student.set_text_features(w, ds.full_classnames)
    task = DistillTask(
        student,
        TeacherOutputs(teacher, student.preprocess),
        w,
        float(teacher.logit_scale),
        build_loss("comkd", kd_weight=1.0),
    )
    base = _peak_rss_mb()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="comkd-bench-epoch-") as tmp:
        fit(
            task,
            ds,
            OptimConfig(optimizer="adamw", lr=1e-4, epochs=1, batch_size=batch, warmup_epochs=0),
            out_dir=tmp,
            seed=1,
            device=torch.device("cpu"),
            progress=False,
        )
    return {
        "items": len(ds),
        "peak_mb": _peak_rss_mb() - base,
        "baseline_mb": base,
        "epoch_s": time.perf_counter() - t0,
    }


def epoch_peak_memory(
    shards: str, items: int, threads: int = 1, batch: int = 32, together: bool = False
) -> dict[str, Any]:
    """``distill_epoch_peak`` at 1x, 2x, 4x ``items``, each in a fresh interpreter (one after the
    other; ``together`` starts the three at once, for the smoke run: its peaks stay per process,
    its ``epoch_s`` then mean nothing)."""
    from .report import child_env

    env = child_env(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))

    def start(m: int) -> subprocess.Popen:
        code = (
            "import json, logging; logging.disable(logging.WARNING); from benchmarks.data_path import distill_epoch_peak; "
            f"print(json.dumps(distill_epoch_peak({shards!r}, {items * m}, batch={batch}, threads={threads})))"
        )
        return subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def finish(m: int, proc: subprocess.Popen) -> dict:
        try:
            stdout, stderr = proc.communicate(timeout=3600)
        finally:
            if proc.poll() is None:
                proc.kill()
        if proc.returncode != 0:
            raise RuntimeError(f"distillation epoch at {m}x failed: {stderr.strip().splitlines()[-1:]}")
        return json.loads(stdout.strip().splitlines()[-1])

    out: dict[str, Any] = {}
    if together:
        procs = {m: start(m) for m in (1, 2, 4)}
        try:
            for m, proc in procs.items():
                out[f"{m}x"] = finish(m, proc)
        finally:  # one failed: the others are not left running
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
    else:
        for m in (1, 2, 4):
            out[f"{m}x"] = finish(m, start(m))
    return {
        "pool_items": {k: v["items"] for k, v in out.items()},
        "peak_mb": {k: v["peak_mb"] for k, v in out.items()},
        "epoch_s": {k: v["epoch_s"] for k, v in out.items()},
        "peak_4x_over_1x": out["4x"]["peak_mb"] / max(out["1x"]["peak_mb"], 1e-9),
    }


def bench_data_path(shards: str | None, quick: bool = False, threads: int = 1) -> dict[str, Any]:
    """Both figures under ``data_path`` (``skipped`` with the reason when no shards are found)."""
    found = find_shards(shards)
    if found is None:
        return {
            "data_path": {"skipped": f"no WebDataset shards (looked for {DEFAULT_SHARDS}); pass --shards"}
        }
    from comkd.data.shards import expand_shards, scan_shard

    # a whole shard (streaming reads every sample of a shard it touches; a partial pool would be
    # charged for samples it skips), or 100 samples in the smoke run
    first = expand_shards(found)[0]
    items = 100 if quick else len(scan_shard(first))
    # the smoke run's 64-256 items come from the first shard, so it indexes only that one
    source = first if quick else found
    res = {"shards": source, "read": read_rate(source, items, reps=1 if quick else 3)}
    res["distill_epoch"] = (
        epoch_peak_memory(source, 64, threads=threads, together=True)
        if quick
        else epoch_peak_memory(found, 1000, threads=threads)
    )
    res["decode"] = decode_section(quick)
    return {"data_path": res}


#: what a GPU's stage 2 would need from the host: the paper pair's stage-2 rate estimated from
#: FLOPs for one H200-class GPU (online teacher; several times more from the teacher cache). It was
#: (1300, 2500) from FLOP counts that missed attention; the corrected counts (2026-12-07: ViT-L/14
#: teacher 164.6, ViT-B/16 student 36.2 GFLOPs per image, not 105.4 and 23.3) scale it by 0.64
GPU_STAGE2_IMAGES_PER_S = (830, 1600)


def decode_section(quick: bool) -> dict[str, Any]:
    """``decode_rates`` on DTD-10's JPEGs next to the repository (``skipped`` without them), with
    the cores each decoder would need to feed ``GPU_STAGE2_IMAGES_PER_S``."""
    if not Path(DEFAULT_DECODE_FOLDER).is_dir():
        return {"skipped": f"no JPEG folder at {DEFAULT_DECODE_FOLDER}"}
    r = decode_rates(DEFAULT_DECODE_FOLDER, 40 if quick else 200, reps=1 if quick else 2)
    lo, hi = GPU_STAGE2_IMAGES_PER_S
    r["gpu_stage2_images_per_s_estimate"] = [lo, hi]
    for name in ("pil", "torchvision"):
        per_core = r[f"{name}_images_per_s_per_core"]
        r[f"{name}_cores_to_feed_gpu"] = [lo / per_core, hi / per_core]
    return r


DEFAULT_DECODE_FOLDER = "../shared/data/dtd10/images"


def decode_rates(folder: str | Path, n: int = 200, size: int = 224, reps: int = 2) -> dict[str, Any]:
    """Images per second on one core to read, decode and crop the paper's training view
    (RandomResizedCrop(``size``, 0.08-1), flip, to a float tensor) of ``n`` JPEG files, with PIL and
    with torchvision's decoder (``torchvision.io.decode_jpeg``, libjpeg-turbo), and how far the two
    decoders' pixels differ on the same files (0-255 levels, before any crop)."""
    import random

    import numpy as np
    import torch
    import torchvision.transforms.v2 as T
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    files = sorted(str(p) for p in Path(folder).rglob("*.jpg"))[:n]
    if not files:
        raise FileNotFoundError(f"no .jpg files under {folder}")
    view = T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True),
            T.RandomHorizontalFlip(),
            T.ToDtype(torch.float32, scale=True),
        ]
    )

    def pil(path: str) -> torch.Tensor:
        with Image.open(path) as im:
            return view(T.functional.pil_to_tensor(im.convert("RGB")))

    def tv(path: str) -> torch.Tensor:
        return view(decode_jpeg(read_file(path), mode=ImageReadMode.RGB))

    out: dict[str, Any] = {"files": len(files), "size": size, "folder": str(folder)}
    import warnings

    # torchvision 0.29 deprecates its decoders (superseded by TorchCodec) and warns on every call
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The image decoding and encoding", DeprecationWarning)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for name, fn in (("pil", pil), ("torchvision", tv)):
                random.seed(0)
                torch.manual_seed(0)
                best = float("inf")
                for _ in range(reps):
                    t0 = time.perf_counter()
                    for f in files:
                        fn(f)
                    best = min(best, time.perf_counter() - t0)
                out[f"{name}_images_per_s_per_core"] = len(files) / best
            diffs = []
            for f in files[:50]:
                with Image.open(f) as im:
                    a = np.asarray(im.convert("RGB"), dtype=np.int16)
                b = (
                    decode_jpeg(read_file(f), mode=ImageReadMode.RGB)
                    .permute(1, 2, 0)
                    .numpy()
                    .astype(np.int16)
                )
                diffs.append(np.abs(a - b))
            out["max_abs_pixel_diff"] = int(max(d.max() for d in diffs))
            out["mean_abs_pixel_diff"] = float(np.mean([d.mean() for d in diffs]))
        finally:
            torch.set_num_threads(threads)
    out["torchvision_vs_pil"] = out["torchvision_images_per_s_per_core"] / out["pil_images_per_s_per_core"]
    return out

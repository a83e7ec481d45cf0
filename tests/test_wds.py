"""WebDataset shards (`dataset: wds`): the index, pools, streaming split over ranks and loader
workers, bad shards and samples, the teacher cache keyed by sample key, and distillation with
2 DDP processes and with 2 loader workers. Shards are written here from real CIFAR-10 JPEGs."""

from __future__ import annotations

import io
import itertools
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from comkd.data import DataError, build_dataset, build_transform, load_splits
from comkd.data.shards import scan_shard
from comkd.data.wds import parse_pools
from support import subprocess_env

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
pytestmark = pytest.mark.skipif(not (CIFAR / "train_subset").is_dir(), reason="needs ../shared/data/cifar10")

N_SHARDS, PER_SHARD = 4, 12  # 48 samples, every class present


def _real_images(n: int) -> list[tuple[bytes, int]]:
    names = [line.split("\t")[1].strip() for line in (CIFAR / "classes.tsv").read_text().splitlines()[1:]]
    files = [
        (p, names.index(c.name))
        for c in sorted((CIFAR / "train_subset").iterdir())
        for p in sorted(c.iterdir())[:5]
    ]
    files = files[::2] + files[1::2]  # interleave classes
    return [(p.read_bytes(), label) for p, label in files[:n]]


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_shards(
    folder: Path,
    n_shards: int = N_SHARDS,
    per_shard: int = PER_SHARD,
    labels: bool = True,
    corrupt: str | None = None,
) -> str:
    """Shards ``folder/s-00000{0..n-1}.tar`` of real JPEGs; keys s<shard>_<i>. Returns the brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    images = _real_images(n_shards * per_shard)
    for s in range(n_shards):
        with tarfile.open(folder / f"s-{s:06d}.tar", "w") as tf:
            for j in range(per_shard):
                data, label = images[s * per_shard + j]
                key = f"s{s}_{j:03d}"
                _add(tf, f"{key}.jpg", data[:40] if key == corrupt else data)
                if labels:
                    _add(tf, f"{key}.cls", str(label).encode())
    shutil.copy(CIFAR / "classes.tsv", folder / "classes.tsv")
    return str(folder / ("s-{000000.." + f"{n_shards - 1:06d}" + "}.tar"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("wds"))


def test_index_reads_keys_and_labels_from_the_shards(shards):
    first = scan_shard(shards.replace("{000000..000003}", "000000"))
    assert first.keys == tuple(f"s0_{j:03d}" for j in range(PER_SHARD))
    expect = [label for _, label in _real_images(PER_SHARD)]
    assert list(first.labels) == expect
    s = load_splits("wds", shards, pools=["pretrain=0:20", "val=20:30", "train=30:48"])
    assert [len(s.split(k)) for k in ("pretrain", "val", "train", "test")] == [20, 10, 18, 0]
    assert s.split("train")[0].path.endswith("#s2_006")  # ordinal 30 = shard 2, item 6
    assert s.classnames[0] == "airplane" and len(s.classnames) == 10


def test_pools_are_checked():
    assert parse_pools(["a=0:5", "b=5:9"], 10, "x") == {"a": (0, 5), "b": (5, 9)}
    with pytest.raises(DataError, match="overlaps"):
        parse_pools(["a=0:5", "b=4:9"], 10, "x")
    with pytest.raises(DataError, match="within 0..10"):
        parse_pools(["a=0:11"], 10, "x")
    with pytest.raises(DataError, match="name=start:stop"):
        parse_pools(["a:0-5"], 10, "x")


def test_extra_pool_and_test_folder(shards):
    s = load_splits(
        "wds", shards, pools=["pretrain_student=0:8", "train=8:48"], test_folder=str(CIFAR / "train_subset")
    )
    assert len(s.split("pretrain_student")) == 8 and len(s.test) == 1000
    # the loader says how each split is read: its pools from the shards, the test folder as files
    assert [s.reader(k) for k in ("pretrain_student", "train", "test")] == ["shards", "shards", "files"]
    ds = build_dataset("wds", shards, "pretrain_student", None, pools=["pretrain_student=0:8", "train=8:48"])
    assert len(ds) == 8 and ds.streaming
    test = build_dataset(
        "wds", shards, "test", None, pools=["train=8:48"], test_folder=str(CIFAR / "train_subset")
    )
    assert len(test) == 1000 and not getattr(test, "streaming", False)
    with pytest.raises(DataError, match="unknown split 'nope'.*pretrain_student"):
        build_dataset("wds", shards, "nope", None, pools=["pretrain_student=0:8"])


def test_fractions_split_per_class_without_pools(shards):
    s = load_splits("wds", shards, fractions=[0.0, 0.5, 0.0, 0.5])
    assert len(s.train) + len(s.test) == 48 and not {d.path for d in s.train} & {d.path for d in s.test}


def _items(ds) -> list[int]:
    return [int(i) for _, _, i in ds]


def test_stream_yields_every_item_once_in_shard_order(shards):
    tf = build_transform(train=False, image_size=32)
    ds = build_dataset("wds", shards, "train", tf, pools=["train=0:48"])
    out = list(ds)
    assert [i for _, _, i in out] == list(range(48))
    assert out[0][0].shape == (3, 32, 32)
    assert [lab for _, lab, _ in out] == ds.labels
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2)
    assert sorted(int(i) for b in loader for i in b[2]) == list(range(48))  # workers split the shards


def test_training_streams_split_ranks_and_workers_exactly_once(shards):
    ds = build_dataset(
        "wds", shards, "train", build_transform(train=False, image_size=32), pools=["train=0:48"]
    )
    ds.shuffle_buffer = 8

    def first(
        stream, n: int = 24
    ) -> list[int]:  # a stream of several ranks is endless: the loop takes its batches
        loader = torch.utils.data.DataLoader(stream, batch_size=4, num_workers=2)
        return [int(i) for b in itertools.islice(loader, n // 4) for i in b[2]]

    for epoch in (0, 1):
        parts = []
        for r in range(2):
            st = ds.training_stream(r, 2, seed=3, workers=2)
            st.set_epoch(epoch)
            parts.append(first(st))
        assert sorted(parts[0] + parts[1]) == list(range(48)) and len(parts[0]) == len(parts[1]) == 24
        again = ds.training_stream(0, 2, seed=3)
        again.set_epoch(epoch)
        assert first(again) == parts[0]  # the order depends only on (seed, epoch, rank, worker)
        if epoch == 0:
            first_epoch = parts[0]
        # a rank's stream goes on past its share: its own samples again, reshuffled
        st1 = ds.training_stream(1, 2, seed=3, workers=2)
        st1.set_epoch(epoch)
        later = first(st1, 48)[24:]
        assert sorted(later) == sorted(parts[1]) and later != parts[1]
    assert parts[0] != first_epoch  # a new epoch, a new order


def test_each_rank_opens_only_its_own_shards(shards, monkeypatch):
    """Two ranks of a training stream (and of a cache replay) open disjoint halves of the 4 shards;
    one process opens each shard once; fewer shards than ranks x workers is refused in one line."""
    import comkd.data.wds as wds

    opened: list[str] = []
    real = wds.iter_shard

    def counting(shard):
        opened.append(Path(shard).name)
        return real(shard)

    monkeypatch.setattr(wds, "iter_shard", counting)
    tf = build_transform(train=True, image_size=32)
    ds = build_dataset("wds", shards, "train", None, pools=["train=0:48"], train_transform=tf, view_seed=3)
    per_rank, replayed = [], []
    for r in range(2):
        opened.clear()
        st = ds.training_stream(r, 2, seed=3)
        st.set_epoch(0)
        assert len(list(itertools.islice(iter(st), 24))) == 24
        per_rank.append(sorted(opened))
        opened.clear()
        assert len(list(ds.replay_stream(3, 0, r, 2))) == 24  # the cache replay splits the same way
        replayed.append(sorted(opened))
    for parts in (per_rank, replayed):
        assert len(parts[0]) == len(parts[1]) == 2 and not set(parts[0]) & set(parts[1])
    opened.clear()
    one = ds.training_stream(0, 1, seed=3)
    one.set_epoch(0)
    assert len(list(one)) == 48 and sorted(opened) == sorted(per_rank[0] + per_rank[1])
    with pytest.raises(DataError, match=r"4 shard\(s\) cannot be split over 2 processes x 3 loader worker"):
        ds.training_stream(0, 2, seed=3, workers=3)


def test_bad_shards_are_named_errors(tmp_path, shards):
    with pytest.raises(DataError, match="shard not found: .*s-000004.tar"):
        load_splits("wds", shards.replace("000003}", "000009}"))
    src = Path(shards.replace("{000000..000003}", "000001"))
    cut = tmp_path / "cut"
    cut.mkdir()
    for p in Path(src).parent.glob("s-*.tar"):
        shutil.copy(p, cut / p.name)
    shutil.copy(src.parent / "classes.tsv", cut / "classes.tsv")
    data = (cut / src.name).read_bytes()
    (cut / src.name).write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"shard .*s-000001.tar is truncated"):
        load_splits("wds", str(cut / "s-{000000..000003}.tar"))
    (cut / src.name).write_bytes(b"not a tar file at all" * 30)
    with pytest.raises(DataError, match="s-000001.tar is truncated or not a tar file"):
        load_splits("wds", str(cut / "s-{000000..000003}.tar"))
    dup = tmp_path / "dup"
    dup.mkdir()
    with tarfile.open(dup / "d-000000.tar", "w") as tf:
        for name in ("a.jpg", "a.cls", "b.jpg", "a.png"):
            _add(tf, name, b"1")
    shutil.copy(src.parent / "classes.tsv", dup / "classes.tsv")
    with pytest.raises(DataError, match="key 'a' appears more than once"):
        load_splits("wds", str(dup / "d-000000.tar"))
    with tarfile.open(dup / "d-000000.tar", "w") as tf:
        _add(tf, "a.jpg", b"1")
        _add(tf, "a.cls", b"12")
    with pytest.raises(DataError, match="sample 'a' has label 12, outside the 10 classes"):
        load_splits("wds", str(dup / "d-000000.tar"))
    with tarfile.open(dup / "d-000000.tar", "w") as tf:
        _add(tf, "a.txt", b"hello")
    with pytest.raises(DataError, match="sample 'a' has no image"):
        load_splits("wds", str(dup / "d-000000.tar"))


def test_truncated_shard_met_while_streaming_is_named(tmp_path):
    pattern = write_shards(tmp_path / "w", n_shards=2)
    ds = build_dataset("wds", pattern, "train", None, pools=["train=0:24"])
    victim = tmp_path / "w" / "s-000001.tar"
    victim.write_bytes(victim.read_bytes()[:3000])  # cut after the index was read
    with pytest.raises(DataError, match="s-000001.tar"):
        list(ds)


def test_corrupt_sample_is_skipped_and_counted_or_a_named_error(tmp_path):
    pattern = write_shards(tmp_path / "c", n_shards=2, corrupt="s1_004")
    ds = build_dataset(
        "wds", pattern, "train", build_transform(train=False, image_size=32), pools=["train=0:24"]
    )
    with pytest.raises(DataError, match="cannot decode sample 's1_004' of shard .*s-000001.tar"):
        list(ds)
    ds = build_dataset(
        "wds",
        pattern,
        "train",
        build_transform(train=False, image_size=32),
        pools=["train=0:24"],
        skip_bad=True,
    )
    assert len(ds) == 23 and len(ds.skipped) == 1 and ds.skipped[0][0].endswith("#s1_004")
    assert sorted(_items(ds)) == list(range(23))


def test_unlabelled_shards_go_to_train(tmp_path):
    pattern = write_shards(tmp_path / "u", n_shards=1, labels=False)
    s = load_splits("wds", pattern)
    assert len(s.train) == PER_SHARD and not s.test and all(d.label == -1 for d in s.train)
    with pytest.raises(DataError, match="outside the class list"):
        build_dataset("wds", pattern, "train", None)  # labels are needed unless unlabelled
    assert len(build_dataset("wds", pattern, "train", None, unlabelled=True)) == PER_SHARD


def test_teacher_cache_rows_are_keyed_by_sample_key(tmp_path):
    """A cache built from the stream holds, in row i, the teacher's feature of view k of item i
    (computed here independently, one image at a time); its fingerprint is the sample keys, so
    moving the shards keeps it valid, and distillation replay reads the right rows."""
    from comkd.engine.cache_build import build_teacher_cache
    from comkd.engine.cache_format import dataset_fingerprint
    from comkd.engine.cache_read import CachedTeacherOutputs
    from comkd.engine.tasks import adapt_images
    from comkd.models import TINY_TEACHER, create_teacher

    pattern = write_shards(tmp_path / "a", n_shards=2)
    torch.manual_seed(0)
    teacher = create_teacher(TINY_TEACHER, image_size=32)
    tf = build_transform(train=True, image_size=32, scale=(0.5, 1.0))
    ds = build_dataset(
        "wds", pattern, "train", None, pools=["train=0:24"], train_transform=tf, view_seed=5, unlabelled=True
    )
    path = build_teacher_cache(
        teacher,
        ds,
        tmp_path / "c.bin",
        views=2,
        seed=5,
        batch_size=7,
        device="cpu",
        dtype=torch.float32,
        num_workers=2,
        progress=False,
    )
    moved = tmp_path / "b"
    shutil.copytree(tmp_path / "a", moved)
    ds2 = build_dataset(
        "wds",
        str(moved / "s-{000000..000001}.tar"),
        "train",
        None,
        pools=["train=0:24"],
        train_transform=tf,
        view_seed=5,
        unlabelled=True,
    )
    assert dataset_fingerprint(ds2) == dataset_fingerprint(ds)
    outputs = CachedTeacherOutputs.open(path, dataset=ds2, device=torch.device("cpu"))
    views = {int(i): img for img, _, i in ds2.replay_stream(5, 1)}
    for i in (0, 13, 23):
        with torch.no_grad():
            want = torch.nn.functional.normalize(
                teacher.encode_image(adapt_images(views[i][None], teacher.preprocess, teacher.preprocess)),
                dim=-1,
            )
        got = outputs(None, torch.tensor([i]), 1)
        assert torch.allclose(got, want, atol=1e-5), i


DDP_SCRIPT = r"""
import json, os, sys
from collections import defaultdict
import torch
from comkd.config import load_config
from comkd.engine.distill import run_distill
from comkd.engine import tasks as T
from comkd.engine.utils import rank

seen = defaultdict(list)
step = T.DistillTask.step
def recording(self, batch, epoch):
    seen[epoch] += batch[2].tolist()
    return step(self, batch, epoch)
T.DistillTask.step = recording
import comkd.data.wds as W
opened = []
real_iter_shard = W.iter_shard
W.iter_shard = lambda shard: opened.append(os.path.basename(shard)) or real_iter_shard(shard)

pattern, out, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = load_config(sets=[
    "data.dataset=wds", f"data.root={pattern}", 'data.pools=["train=0:48"]', "data.image_size=32",
    f"data.num_workers={workers}", "data.shuffle_buffer=6",
    "teacher.model=comkd-tiny-teacher", "teacher.pretrained=none",
    "student.model=comkd-tiny-student", "student.pretrained=none",
    "distill.optim.epochs=2", "distill.optim.batch_size=8", "distill.optim.warmup_epochs=0",
    "progress=false", "seed=2",
])
run_distill(cfg, out)
with open(os.path.join(out, f"seen{rank()}.json"), "w") as f:
    json.dump({**seen, "opened": opened}, f)
"""


@pytest.mark.slow
@pytest.mark.parametrize("procs,workers", [(2, 0), (1, 2)], ids=["2-ddp-processes", "2-loader-workers"])
def test_distillation_streams_every_sample_once_per_epoch(tmp_path, procs, workers):
    pattern = write_shards(tmp_path / "s")
    script = tmp_path / "run.py"
    script.write_text(DDP_SCRIPT)
    env = subprocess_env()  # one thread, no torchrun variables inherited
    launch = [sys.executable]
    if procs > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
    r = subprocess.run(
        [*launch, str(script), pattern, str(tmp_path / "out"), str(workers)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    per_rank = [json.loads((tmp_path / "out" / f"seen{k}.json").read_text()) for k in range(procs)]
    for epoch in ("0", "1"):
        got = Counter(i for seen in per_rank for i in seen[epoch])
        assert sorted(got) == list(range(48)) and set(got.values()) == {1}, epoch  # each sample once
        if procs > 1:
            assert len(per_rank[0][epoch]) == len(per_rank[1][epoch]) == 24
    assert per_rank[0]["0"] != per_rank[0]["1"]  # shuffled anew each epoch
    assert (tmp_path / "out" / "student.safetensors").exists()
    if procs > 1:  # each rank opened 2 of the 4 shards an epoch (every shard, before)
        assert [len(r["opened"]) for r in per_rank] == [4, 4]


def test_data_path_bench_on_small_shards(tmp_path):
    from benchmarks.data_path import distill_epoch_peak, read_rate

    pattern = write_shards(tmp_path / "b")
    r = read_rate(pattern, 40, reps=1)
    assert r["images"] == 40 and set(r["images_per_s"]) == {"shards", "folder"}
    assert all(v > 0 for v in r["images_per_s"].values())
    m = distill_epoch_peak(pattern, 24, batch=4)  # in-process here; the bench runs 1x/2x/4x in fresh ones
    assert m["items"] == 24 and m["epoch_s"] > 0 and m["peak_mb"] >= 0


class _PixelTask:
    """A toy task on streamed images: a linear map of each image's channel means."""

    name = "pixels"

    def __init__(self):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(3, 1)
        self.seen: list[int] = []

    def modules(self):
        return {"model": self.model}

    def parameter_groups(self):
        return [{"params": list(self.model.parameters())}]

    def wrap(self, wrapped):
        pass

    def step(self, batch, epoch):
        x, _, idx = batch
        self.seen += idx.tolist()
        return {"loss": (self.model(x.mean(dim=(2, 3))) ** 2).mean()}


def test_streamed_fit_resumes_mid_epoch_exactly(tmp_path, shards):
    from comkd.config import OptimConfig
    from comkd.engine.loop import fit

    tf = build_transform(train=True, image_size=32, scale=(0.5, 1.0))
    ds = build_dataset(
        "wds", shards, "train", None, pools=["train=0:48"], train_transform=tf, view_seed=4, shuffle_buffer=5
    )
    cfg = OptimConfig(optimizer="adamw", lr=0.05, epochs=2, batch_size=8, warmup_epochs=0)
    kw = {"seed": 4, "device": torch.device("cpu"), "progress": False}
    whole = _PixelTask()
    fit(whole, ds, cfg, out_dir=tmp_path / "a", **kw)
    assert len(whole.seen) == 96 and sorted(whole.seen[:48]) == list(range(48))  # 6 batches an epoch
    part = _PixelTask()
    fit(part, ds, cfg, out_dir=tmp_path / "b", ckpt_every=1, stop_after_steps=8, **kw)  # epoch 2, batch 2
    rest = _PixelTask()
    fit(rest, ds, cfg, out_dir=tmp_path / "b", resume=True, **kw)
    assert part.seen[:64] + rest.seen == whole.seen  # the resumed run skips exactly what was seen
    for k, v in whole.model.state_dict().items():
        assert torch.equal(v, rest.model.state_dict()[k]), k


def test_loader_options_follow_the_loader_signature(shards):
    from comkd.config import ConfigError, load_config
    from comkd.engine.builders import loader_options

    cfg = load_config(
        sets=[
            "data.dataset=wds",
            f"data.root={shards}",
            'data.pools=["train=0:48"]',
            "data.test_folder=somewhere",
        ]
    )
    kw = loader_options(cfg)
    assert kw["pools"] == ["train=0:48"] and kw["test_folder"] == "somewhere" and "subdir" not in kw
    with pytest.raises(ConfigError, match=r"data.pools: dataset 'imagefolder' does not take"):
        loader_options(load_config(sets=["data.dataset=imagefolder", 'data.pools=["train=0:4"]']))
    with pytest.raises(ConfigError, match=r"data.fractions: dataset 'dtd' does not take"):
        loader_options(load_config(sets=["data.dataset=dtd", "data.fractions=[0,1,0,0]"]))


def test_the_shard_index_is_kept_between_processes_and_rebuilt_when_stale(tmp_path, monkeypatch):
    """The index read from the tar headers is written once (``index_dir``) and read by later
    processes without scanning; a shard changed since, or a damaged index file, is scanned again."""
    from comkd.data import shards as sh

    monkeypatch.setenv("COMKD_CACHE_DIR", str(tmp_path / "cache"))
    pattern = write_shards(tmp_path / "s")
    scanned: list[str] = []
    real = sh._scan
    monkeypatch.setattr(sh, "_scan", lambda path, *a: scanned.append(Path(path).name) or real(path, *a))

    def new_process() -> list[str]:
        sh._indexed.cache_clear()  # what a fresh process starts with
        return [d.path for d in load_splits("wds", pattern, pools=["train=0:48"]).split("train")]

    first = new_process()
    kept = sorted((tmp_path / "cache" / "shard-index").glob("*.json"))
    assert len(scanned) == 4 and len(kept) == 4
    assert new_process() == first and len(scanned) == 4  # read back, nothing scanned
    shard0 = Path(pattern.replace("{000000..000003}", "000000"))
    st = shard0.stat()
    os.utime(shard0, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the shard changed since
    shard2 = os.path.abspath(pattern.replace("{000000..000003}", "000002"))
    Path(sh._index_file(shard2)).write_text('{"format": 1, "keys": [')  # cut short
    assert new_process() == first
    assert sorted(scanned[4:]) == ["s-000000.tar", "s-000002.tar"]
    assert json.loads(Path(sh._index_file(shard2)).read_text())["path"] == shard2  # rewritten whole


WARM_SCRIPT = r"""
import json, os, sys
import torch
torch.set_num_threads(1)
import comkd.data.wds as W
opened = []
real_iter_shard = W.iter_shard
W.iter_shard = lambda shard: opened.append(os.path.basename(shard)) or real_iter_shard(shard)
from comkd.config import load_config
from comkd.engine.builders import build_student, build_teacher, make_dataset
from comkd.engine.distill import warm_start_projector
from comkd.engine.tasks import TeacherOutputs
from comkd.engine.utils import exit_process, init_distributed, is_main, rank

init_distributed()
pattern, out = sys.argv[1], sys.argv[2]
cfg = load_config(sets=[
    "data.dataset=wds", f"data.root={pattern}", 'data.pools=["train=0:48"]', "data.image_size=32",
    "data.eval_batch_size=8", "teacher.model=comkd-tiny-teacher", "teacher.pretrained=none",
    "student.model=comkd-tiny-student", "student.pretrained=none", "student.projector_bn=frozen",
    "distill.projector_init=ridge", "progress=false", "seed=2",
])
torch.manual_seed(0)
dev = torch.device("cpu")
teacher = build_teacher(cfg, dev, prompts="")
student = build_student(cfg, teacher.embed_dim, dev)
ds = make_dataset(cfg, "train", student.preprocess, train=True, unlabelled=True, augment=cfg.distill.augment)
n = warm_start_projector(student, ds, TeacherOutputs(teacher, student.preprocess), cfg, dev)
if is_main():
    torch.save(student.projector.state_dict(), os.path.join(out, "projector.pt"))
with open(os.path.join(out, f"warm{rank()}.json"), "w") as f:
    json.dump({"n": n, "opened": opened}, f)
exit_process(0)  # how a comkd command ends (cli.main)
"""


@pytest.mark.slow
def test_the_warm_start_of_a_stream_is_shared_by_the_ranks(tmp_path):
    """Under torchrun each rank warm-starts the projector on its own 2 of the 4 shards (the views
    of epoch 0, as a cache replay reads them), and the summed fit equals one process's."""
    pattern = write_shards(tmp_path / "s")
    script = tmp_path / "warm.py"
    script.write_text(WARM_SCRIPT)
    env = subprocess_env()  # one thread, no torchrun variables inherited
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    outs = []
    for name, launch in (("one", [sys.executable]), ("two", torchrun)):
        out = tmp_path / name
        out.mkdir()
        r = subprocess.run(
            [*launch, str(script), pattern, str(out)], env=env, capture_output=True, text=True, timeout=300
        )
        assert r.returncode == 0, r.stderr[-3000:]
        outs.append(out)
    one = json.loads((outs[0] / "warm0.json").read_text())
    ranks = [json.loads((outs[1] / f"warm{r}.json").read_text()) for r in range(2)]
    assert one["n"] == ranks[0]["n"] == ranks[1]["n"] == 48
    assert len(one["opened"]) == 4 and [len(r["opened"]) for r in ranks] == [2, 2]
    assert not set(ranks[0]["opened"]) & set(ranks[1]["opened"])
    p1, p2 = (torch.load(o / "projector.pt") for o in outs)
    for k, v in p1.items():
        torch.testing.assert_close(p2[k].float(), v.float(), rtol=1e-4, atol=1e-5, msg=k)

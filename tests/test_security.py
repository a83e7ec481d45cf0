"""Files a user hands us are data, never code: a crafted checkpoint or weight file must not run."""

from __future__ import annotations

import pickle
import subprocess

import pytest
import torch

from comkd.engine.checkpoint import CheckpointError, load_checkpoint
from comkd.models import create_teacher
from comkd.models.backbones import TINY_TEACHER, ModelError, load_clip


class _Exploit:
    """Unpickling this object calls ``open(path, "w")``: creates the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _write_exploit(path, marker) -> None:
    # torch.save writes a zip whose data.pkl holds the payload: the format --resume reads
    torch.save({"task": "distill", "payload": _Exploit(str(marker))}, path)


def test_crafted_checkpoint_does_not_execute_and_names_file(tmp_path) -> None:
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "checkpoint.pt"
    _write_exploit(ckpt, marker)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="checkpoint.pt"):
        load_checkpoint(ckpt)
    assert not marker.exists()
    # a legacy (non-zip) pickle too
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps({"task": "distill", "x": _Exploit(str(marker))}, protocol=2))
    with pytest.raises(CheckpointError, match="legacy.pt"):
        load_checkpoint(legacy)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04truncated"])
def test_empty_or_truncated_checkpoint_is_one_line_error(tmp_path, content) -> None:
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(content)
    with pytest.raises(CheckpointError, match="checkpoint.pt") as err:
        load_checkpoint(ckpt)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_resume_from_crafted_checkpoint_through_the_cli(tmp_path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    marker = tmp_path / "pwned"
    _write_exploit(out / "checkpoint.pt", marker)
    from support import DISTILL_CMD, subprocess_env

    cmd = [*DISTILL_CMD, "--out-dir", str(out), "--resume"]
    env = subprocess_env()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0
    assert not marker.exists(), "unpickling the checkpoint executed code"
    assert "checkpoint.pt" in r.stderr + r.stdout
    assert "Traceback" not in r.stderr


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_weights_are_refused_without_running_them(tmp_path) -> None:
    # torch.jit.load would run this archive's __setstate__ (arbitrary TorchScript code)
    class Boom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(2))

        def forward(self, x):
            return x + self.w

        @torch.jit.export
        def __getstate__(self):
            return (self.w, self.training)

        @torch.jit.export
        def __setstate__(self, state: tuple[torch.Tensor, bool]):
            self.w = state[0]
            self.training = state[1]

    path = tmp_path / "ViT-B-16.pt"
    torch.jit.save(torch.jit.script(Boom()), str(path))
    with pytest.raises(ModelError, match="TorchScript") as err:
        create_teacher(TINY_TEACHER, pretrained=str(path))
    assert "ViT-B-16.pt" in str(err.value) and "state_dict" in str(err.value)


def test_pickled_weight_file_is_refused(tmp_path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "weights.pt"
    _write_exploit(path, marker)
    with pytest.raises(ModelError, match="weights.pt"):
        load_clip(TINY_TEACHER, str(path))
    assert not marker.exists()


def _broken_zip(path) -> None:
    """A zip whose end record is intact (``zipfile.is_zipfile`` says yes) but whose central
    directory is damaged: a torch.save file with its directory's signatures overwritten."""
    import io
    import zipfile

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    path.write_bytes(buf.getvalue().replace(b"PK\x01\x02", b"PK\x00\x00"))
    assert zipfile.is_zipfile(path)


@pytest.mark.parametrize(
    ("flag", "command"), [("--teacher-pretrained", "train-teacher"), ("--student-pretrained", "distill")]
)
def test_a_broken_zip_as_weights_is_one_line_naming_it(tmp_path, flag, command) -> None:
    from typer.testing import CliRunner

    from comkd import cli

    bad = tmp_path / "broken_weights.pt"
    _broken_zip(bad)
    with pytest.raises(ModelError, match="broken_weights.pt.*damaged zip"):
        load_clip(TINY_TEACHER, str(bad))
    args = [command, "--config", "demo", flag, str(bad), "--out-dir", str(tmp_path / "o"), "--no-evaluate"]
    r = CliRunner().invoke(cli.app, args[:-1] if command == "train-teacher" else args)
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(bad) in lines[0], r.output


def _pickled_teacher(path, marker, legacy: bool) -> None:
    """Tiny-teacher weights with a payload the weights-only reader refuses (it would open a file)."""
    sd = load_clip(TINY_TEACHER, None, image_size=16).model.state_dict()
    obj = {"state_dict": sd, "payload": _Exploit(str(marker))}
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)


@pytest.mark.parametrize("kind", ["legacy .bin", "zip .pt", "local-dir folder"])
def test_a_pickled_teacher_is_refused_in_one_line_with_what_to_ask_for(tmp_path, kind) -> None:
    """Nothing of the pickle runs; the line names the file, says it is a pickle and what to use
    instead, and suggests no command that would unpickle it."""
    import json

    from typer.testing import CliRunner

    from comkd import cli
    from support import TINY_DISTILL_OPTS, one_line_error

    marker = tmp_path / "pwned"
    if kind == "local-dir folder":
        folder = tmp_path / "teacher"
        folder.mkdir()
        weights = folder / "open_clip_pytorch_model.bin"
        _pickled_teacher(weights, marker, legacy=False)
        cfg = {"model_cfg": load_clip(TINY_TEACHER, None).config, "preprocess_cfg": {}}
        (folder / "open_clip_config.json").write_text(json.dumps(cfg))
        flags = ["--teacher", f"local-dir:{folder}"]
    else:
        weights = tmp_path / ("teacher.bin" if kind.startswith("legacy") else "teacher.pt")
        _pickled_teacher(weights, marker, legacy=kind.startswith("legacy"))
        flags = ["--teacher", TINY_TEACHER, "--teacher-pretrained", str(weights)]
    r = CliRunner().invoke(cli.app, ["distill", *flags, *TINY_DISTILL_OPTS, "--out-dir", str(tmp_path / "o")])
    one_line_error(r, f"{weights} is a pickle", "weights only, never code", ".safetensors")
    assert "weights_only=False" not in r.output
    assert not marker.exists(), "unpickling the teacher executed code"
    assert not (tmp_path / "o" / "student.safetensors").exists()

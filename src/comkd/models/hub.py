"""Students on the Hugging Face Hub: ``hf-hub:ORG/NAME`` (optionally ``@REVISION``) names the
student file of a hub repository, fetched through huggingface_hub's download and cache (so
``HF_HUB_OFFLINE=1`` reads the local cache, as every huggingface_hub user expects). Publishing
(what a repository holds) is ``comkd.deploy.hub``.
"""

from __future__ import annotations

import re
from pathlib import Path

from .backbones import ModelError

HUB_PREFIX = "hf-hub:"
STUDENT_FILENAME = "student.safetensors"
ONNX_FILENAME = "student.onnx"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_hub_ref(ref: str | Path) -> bool:
    """Whether ``ref`` names a hub repository (``hf-hub:ORG/NAME``) rather than a local file."""
    return str(ref).startswith(HUB_PREFIX)


def parse_hub_ref(ref: str) -> tuple[str, str | None]:
    """``hf-hub:ORG/NAME[@REVISION]`` -> ``(ORG/NAME, REVISION or None)``; a one-line
    ``ModelError`` for anything else."""
    body = ref[len(HUB_PREFIX) :] if ref.startswith(HUB_PREFIX) else ref
    repo_id, _, revision = body.partition("@")
    if not _REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id:
        raise ModelError(
            f"{ref!r} is not a hub student id; write hf-hub:ORG/NAME (or hf-hub:ORG/NAME@REVISION)"
        )
    return repo_id, revision or None


def hub_file(ref: str, filename: str = STUDENT_FILENAME) -> Path:
    """The local path of ``filename`` in the hub repository ``ref``, downloaded into (or, offline,
    read from) huggingface_hub's cache. Errors are one line naming the repository and the file."""
    from huggingface_hub import hf_hub_download  # a dependency of comkd (pyproject.toml)
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, revision = parse_hub_ref(ref)
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, library_name="comkd"))
    except LocalEntryNotFoundError:
        raise ModelError(
            f"{ref}: {filename} is not in the local Hugging Face cache and the hub cannot be reached "
            "(HF_HUB_OFFLINE set, or no network); download it once online, or give a local file"
        ) from None
    except RevisionNotFoundError:
        raise ModelError(f"{ref}: the hub repository {repo_id} has no revision {revision!r}") from None
    except EntryNotFoundError:
        raise ModelError(
            f"{ref}: the hub repository {repo_id} has no {filename} (not pushed by comkd?)"
        ) from None
    except RepositoryNotFoundError:
        raise ModelError(
            f"{ref}: no hub repository {repo_id} (or it is private: log in with `hf auth login`)"
        ) from None
    except OSError as e:  # network and cache errors
        raise ModelError(
            f"{ref}: cannot fetch {filename}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        ) from None


def student_and_out(ref: str | Path, out: str | Path | None, suffix: str) -> tuple[Path, Path | None]:
    """The local student file for ``ref`` (``student_path``) and where a command writes what it
    makes from it: ``out``, or for ``hf-hub:ORG/NAME`` by default ``NAME<suffix>`` in the current
    folder (never inside huggingface_hub's cache); None when the caller picks the default."""
    if out is None and is_hub_ref(ref):
        out = parse_hub_ref(str(ref))[0].split("/")[1] + suffix
    return student_path(ref), None if out is None else Path(out)


def student_path(ref: str | Path, filename: str = STUDENT_FILENAME) -> Path:
    """A local student file for ``ref``: the path itself, or the hub file of ``hf-hub:ORG/NAME``."""
    return hub_file(str(ref), filename) if is_hub_ref(ref) else Path(ref)

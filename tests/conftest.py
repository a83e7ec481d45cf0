"""Shared fixtures: ``one_thread`` (tiny models on one torch thread) and ``tiny_teacher_files``
(two random tiny teachers on disk), and a guard that refuses rerun plugins. Plain helpers are in
support.py."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import torch_threads, write_tiny_teacher

# plugins that rerun or skip a failing test and report it passed: a flaky test is a failing test here
_RERUNNERS = ("rerunfailures", "flaky", "pytest_rerunfailures", "retry", "pytest_retry")


def pytest_unconfigure(config) -> None:
    if getattr(config, "_comkd_cache_dir", None):
        shutil.rmtree(config._comkd_cache_dir, ignore_errors=True)


def pytest_configure(config) -> None:
    # shard indexes kept between processes go to a folder of this session, not the user's ~/.cache
    if "COMKD_CACHE_DIR" not in os.environ:
        os.environ["COMKD_CACHE_DIR"] = tempfile.mkdtemp(prefix="comkd-test-cache-")
        config._comkd_cache_dir = os.environ["COMKD_CACHE_DIR"]
    active = [name for name in _RERUNNERS if config.pluginmanager.hasplugin(name)]
    if active:
        raise pytest.UsageError(
            f"test rerun plugin(s) {', '.join(active)} loaded: comkd's suite reruns nothing; "
            "disable with -p no:<name> or uninstall"
        )


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models run as fast on one thread, and far steadier on a busy shared CPU."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def tiny_teacher_files(tmp_path_factory) -> dict[str, Path]:
    """Two different random tiny teachers on disk: ``weights_a``/``prompts_a`` and ``weights_b``/
    ``prompts_b`` (seeds 0 and 1), shared by every test that needs teacher files."""
    d = tmp_path_factory.mktemp("tiny_teachers")
    out = {}
    for tag, seed in (("a", 0), ("b", 1)):
        out[f"weights_{tag}"], out[f"prompts_{tag}"] = write_tiny_teacher(d, tag, seed)
    return out

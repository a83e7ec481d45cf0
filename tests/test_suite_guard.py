"""The suite itself: a flaky test is a failing test, so a plugin that reruns failures is refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("plugin", ["rerunfailures", "flaky"])
def test_a_rerun_plugin_stops_the_suite_before_any_test(tmp_path, plugin) -> None:
    # a stand-in registered under the plugin's own name (what `pip install pytest-<plugin>` gives)
    (tmp_path / f"{plugin}.py").write_text("")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", plugin, "tests/test_stats.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0
    assert f"test rerun plugin(s) {plugin} loaded" in r.stdout + r.stderr
    assert " passed" not in r.stdout  # refused before running a test

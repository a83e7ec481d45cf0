"""The fork server of ``bench_peak_memory`` (``benchmarks.memory``); run it as
``python -m benchmarks.forkserver``.

One fresh interpreter imports torch and comkd once, then forks a child per stage (before any
torch compute or CUDA use in the server), so each stage starts from the same clean process
without paying the imports (~5 s here) again. Jobs come on stdin, results go to stdout, one JSON
object a line: a job is the keyword arguments of ``stage_peak_memory``, a result is its dict, or
``{"stage": ..., "error": ...}`` when the stage raised or its process died. POSIX only (``fork``).
"""

from __future__ import annotations

import json
import os
import sys
import traceback

from comkd.data.builtin import _digit_images

from .memory import stage_peak_memory


def run_forked(job: dict) -> str:
    """Run ``stage_peak_memory(**job)`` in a forked child; its result as one JSON line (no newline)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            res = stage_peak_memory(**job)
        except BaseException as e:
            res = {"stage": job["stage"], "error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
        os.write(w, json.dumps(res).encode())
        os._exit(0)
    os.close(w)
    chunks = []
    while True:
        c = os.read(r, 1 << 16)
        if not c:
            break
        chunks.append(c)
    os.close(r)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode() or json.dumps({"stage": job["stage"], "error": "the stage process died"})


def main() -> None:
    """Serve the jobs on stdin until it closes, one forked child at a time."""
    _digit_images(32)  # decode the embedded digits once, before forking
    for line in sys.stdin:
        sys.stdout.write(run_forked(json.loads(line)) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()

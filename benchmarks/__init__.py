"""Speed and memory benchmarks: ``run_bench(out)`` measures and writes one JSON file; ``comkd bench``
is its command.

Every figure is measured on this machine when the function runs (medians of several timed
repetitions after a warm-up; competing variants are interleaved so drifting machine load hits
both alike). Figures (see ``benchmarks/README.md`` for what each one means and its target):

* ``comkd_vs_promptkd_step_ratio``   ComKD / PromptKD distillation step time (tiny pair, fixed batch)
* ``cache_speedup``                  distillation epoch time online / with the teacher cache
* ``loop_overhead_ratio``            ``engine.loop.fit`` step time on real data / bare step on one batch
* ``inference_speedup_paper_pair``   student ViT-B/16 vs teacher ViT-L/14 images/s (224 px, batch 8)
* ``flops_ratio_paper_pair``         teacher / student FLOPs per image (``timing.count_flops``)
* ``inference_speedup_tiny_pair``, ``flops_ratio_tiny_pair``   the same for the tiny configs
* ``peak_memory_mb``                 per stage, each in a fresh process
* ``epoch_time_s``, ``epoch_time_linearity``   distillation epoch time at 1x, 2x, 4x the data

``quick=True`` shrinks every size (the paper pair runs at 64 px) for a smoke run of under a minute;
its figures are for checking the machinery, not for reporting.

Modules:

* ``run``         ``run_bench``: the fixtures once, every section in turn, the JSON written
* ``sizes``       figure and stage names, the paper pair's names, ``BenchSizes`` (``FULL``, ``QUICK``),
  ``finite_figures`` (no torch)
* ``timing``      device sync, medians, ``count_flops``, ``time_interleaved``
* ``fixtures``    the digits set, seeded tiny students, distillation tasks, ``BareStep``, one ``fit`` epoch
* ``training``    ComKD vs PromptKD step, cache speedup and loop overhead, epoch-time scaling
* ``inference``   tiny-pair and paper-pair inference speed and FLOPs, the deployed student
* ``memory``      peak memory per stage, each in a fresh process
* ``forkserver``  the process ``memory`` forks each stage from (``python -m benchmarks.forkserver``)
* ``data_path``   WebDataset shards vs a folder, streamed epoch memory
* ``report``      machine info, key order and the atomic write of the JSON
* ``errors``      ``BenchError``

The names below are imported on first use, so ``import benchmarks`` does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> the module that defines it
_LAZY = {
    "BenchError": ".errors",
    "BenchSizes": ".sizes",
    "FIGURES": ".sizes",
    "FULL": ".sizes",
    "PAPER_STUDENT": ".sizes",
    "PAPER_TEACHER": ".sizes",
    "QUICK": ".sizes",
    "STAGES": ".sizes",
    "WEIGHTS_NOTE": ".sizes",
    "finite_figures": ".sizes",
    "deployed_pair": ".inference",
    "paper_pair": ".inference",
    "run_bench": ".run",
}

__all__ = [
    "FIGURES",
    "FULL",
    "PAPER_STUDENT",
    "PAPER_TEACHER",
    "QUICK",
    "STAGES",
    "WEIGHTS_NOTE",
    "BenchError",
    "BenchSizes",
    "deployed_pair",
    "finite_figures",
    "paper_pair",
    "run_bench",
]

if TYPE_CHECKING:  # for type checkers and IDEs: the eager imports
    from .errors import BenchError
    from .inference import deployed_pair, paper_pair
    from .run import run_bench
    from .sizes import (
        FIGURES,
        FULL,
        PAPER_STUDENT,
        PAPER_TEACHER,
        QUICK,
        STAGES,
        WEIGHTS_NOTE,
        BenchSizes,
        finite_figures,
    )


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'benchmarks' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])

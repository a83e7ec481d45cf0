"""The ``Task`` protocol: every hook ``engine.loop.fit`` calls is declared, and the stage tasks
have them all (``TaskBase`` gives the optional ones defaults)."""

from __future__ import annotations

import inspect
import re

from comkd.engine import loop
from comkd.engine.tasks import DistillTask, PretrainTask, Task, TaskBase, TeacherPromptTask


def _declared() -> set[str]:
    return {n for n in vars(Task) if not n.startswith("_")} | set(Task.__annotations__)


def test_the_protocol_declares_every_hook_the_loop_calls() -> None:
    called = set(re.findall(r"\btask\.(\w+)", inspect.getsource(loop)))
    assert {"modules", "parameter_groups", "step", "wrap", "state_dict", "extra_metrics"} <= called
    assert called <= _declared(), sorted(called - _declared())


def test_every_stage_task_has_every_hook() -> None:
    hooks = _declared() - {"name"}
    for cls in (PretrainTask, TeacherPromptTask, DistillTask):
        assert issubclass(cls, TaskBase)
        missing = [h for h in hooks if not callable(getattr(cls, h, None))]
        assert not missing, (cls.__name__, missing)
        assert isinstance(cls.name, str) and cls.name != TaskBase.name


def test_taskbase_defaults_keep_nothing_and_log_nothing() -> None:
    base = TaskBase()
    assert base.state_dict() is None and base.extra_metrics() == {}
    base.load_state_dict({"ignored": 1})  # a no-op, not an error
    marker = object()
    base.wrap({"model": marker})
    assert base._m("model", None) is marker and base._m("other", 7) == 7

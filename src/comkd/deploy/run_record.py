"""What a run recorded, read for the model card (``deploy.card``): its ``results.json`` and
``config.yaml``, checked for the types the card reads (a wrong type names the file and the key)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from ..models.backbones import ModelError

_KINDS = {
    bool: "a boolean",
    int: "a number",
    float: "a number",
    str: "text",
    list: "a list",
    dict: "a mapping",
}


def _type_name(v: Any) -> str:
    """What a JSON / YAML value is, in words (with its article)."""
    return "null" if v is None else _KINDS.get(type(v), f"a {type(v).__name__}")


def _check_types(data: dict, path: Path, want: dict[str, tuple[type, ...]], prefix: str = "") -> None:
    """Each key of ``want`` present in ``data`` holds one of its types (or null); else a one-line
    ``ModelError`` naming the file and the key."""
    for key, types in want.items():
        v = data.get(key)
        if v is None or (isinstance(v, types) and not isinstance(v, bool)):
            continue
        fix = "give --results FILE or fix it" if path.suffix == ".json" else "fix or remove it"
        raise ModelError(f"{path}: '{prefix}{key}' is {_type_name(v)}, not {_KINDS[types[0]]}; {fix}")


_NUMBER = (int, float)
RESULTS_TYPES = {
    "base": (dict,),
    "novel": (dict,),
    "hm": _NUMBER,
    "acc": _NUMBER,
    "dataset": (str,),
    "protocol": (str,),
    "teacher": (dict,),
    "student_zeroshot": (dict,),
    "methods": (dict,),
    "datasets": (dict,),
    "seeds": (list,),
}
CONFIG_TYPES = {
    "data": (dict,),
    "distill": (dict,),
    "protocol": (str,),
    "full": (dict,),
    "teacher": (dict,),
    "student": (dict,),
}


def read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise ModelError(f"{path} is not valid JSON; give --results FILE or remove it") from None
    if not isinstance(data, dict):
        raise ModelError(
            f"{path} holds {_type_name(data)}, not a results object (a JSON object with acc or "
            "base/novel/hm); give --results FILE or remove it"
        )
    _check_types(data, path, RESULTS_TYPES)
    for part in ("base", "novel"):
        _check_types(data.get(part) or {}, path, {"acc": _NUMBER}, f"{part}.")
    return data


def read_yaml(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        raise ModelError(f"{path} is not valid YAML; fix or remove it") from None
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ModelError(f"{path} holds {_type_name(data)}, not a config mapping; fix or remove it")
    _check_types(data, path, CONFIG_TYPES)
    _check_types(data.get("data") or {}, path, {"dataset": (str,), "root": (str,)}, "data.")
    _check_types(data.get("full") or {}, path, {"test": (str,)}, "full.")
    _check_types(data.get("distill") or {}, path, {"optim": (dict,)}, "distill.")
    return data


# -- what the card says about the run -------------------------------------------------------------
METRICS = ("base", "novel", "hm", "acc")


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _size(d: Any) -> dict[str, int]:
    """``{"classes", "images"}`` of one scored part (those recorded as positive integers)."""
    if not isinstance(d, dict):
        return {}
    return {k: n for k in ("classes", "images") if type(n := d.get(k)) is int and n > 0}


def _row(v: Any) -> tuple[dict[str, float], dict[str, dict[str, int]]]:
    """The scores (base / novel / hm, or acc) and test-set sizes of one model's result, as
    ``comkd evaluate`` / distill (``{"base": {"acc", "classes", "images"}, ..., "hm"}``), a full run
    (``{"acc", "images", ...}``) or the demo (``{"base": 91.0, ...}``) write it."""
    if not isinstance(v, dict):
        return {}, {}
    scores: dict[str, float | None] = {}
    parts: dict[str, dict[str, int]] = {}
    for k in ("base", "novel"):
        if isinstance(v.get(k), dict):
            scores[k], parts[k] = _num(v[k].get("acc")), _size(v[k])
        else:
            scores[k] = _num(v.get(k))
    scores["hm"], scores["acc"] = _num(v.get("hm")), _num(v.get("acc"))
    if scores["acc"] is not None:
        parts["all"] = _size(v)
    return {k: x for k, x in scores.items() if x is not None}, {k: p for k, p in parts.items() if p}


class Scores:
    """The scores a card shows: ``rows`` (model -> metric -> %: the distilled student under
    ``SELF``, ``teacher``, ``student_zeroshot`` and any other method of its run), the test-set size
    and class count of each scored part (``base``, ``novel`` or ``all``), and a note (which seed)."""

    SELF = "__self__"

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, float]] = {}
        self.parts: dict[str, dict[str, int]] = {}
        self.note: str | None = None

    def add(self, results: dict | None, method: str | None, dataset: str | None, seed: Any) -> None:
        """Fill what is missing from a ``results.json`` of any shape comkd writes."""
        if not results:
            return
        rows, parts, note = _rows_of(results, dataset, seed)
        methods = [m for m in rows if m not in ("teacher", "student_zeroshot", Scores.SELF)]
        if Scores.SELF not in rows and (method in rows or (method is None and len(methods) == 1)):
            rows[Scores.SELF] = rows[method if method in rows else methods[0]]
        for k, v in rows.items():
            if v and not self.rows.get(k):
                self.rows[k] = v
        for k, v in parts.items():
            self.parts[k] = {**v, **self.parts.get(k, {})}
        self.note = self.note or note

    @property
    def student(self) -> dict[str, float]:
        return self.rows.get(Scores.SELF, {})


def _rows_of(results: dict, dataset: str | None, seed: Any) -> tuple[dict, dict, str | None]:
    """model -> scores, part -> size, and a note, from a results.json of any shape: a stage's or
    ``comkd evaluate``'s (the student itself), ``comkd run --protocol full``'s (``teacher``,
    ``student_zeroshot``, ``methods``), a base2novel / cross / dg run's (``datasets``: per-seed
    lists) or ``comkd demo``'s (flat, one entry per model)."""
    rows: dict[str, dict[str, float]] = {}
    parts: dict[str, dict[str, int]] = {}
    note = None
    if isinstance(results.get("datasets"), dict):
        table = results["datasets"]
        ds = dataset if dataset in table else next(iter(table)) if len(table) == 1 else None
        if ds is None or not isinstance(table[ds], dict):
            return {}, {}, None
        seeds = results.get("seeds") if isinstance(results.get("seeds"), list) else []
        i = seeds.index(seed) if seed in seeds else 0 if len(seeds) == 1 else None
        for m, v in table[ds].items():
            if not isinstance(v, dict):
                continue
            row = {}
            for k, xs in v.items():
                vals = [_num(x) for x in xs] if k in METRICS and isinstance(xs, list) and xs else [None]
                if None in vals:
                    continue
                row[k] = vals[i] if i is not None and len(vals) == len(seeds) else sum(vals) / len(vals)
            rows[m] = row
        if len(seeds) > 1:
            note = (
                f"seed {seeds[i]} of the run's {len(seeds)}"
                if i is not None
                else f"mean over {len(seeds)} seeds"
            )
        sizes = results.get("test_size")
        if isinstance(sizes, dict) and isinstance(sizes.get(ds), dict):
            parts = {k: s for k, v in sizes[ds].items() if (s := _size(v))}
        return rows, parts, note
    if isinstance(results.get("methods"), dict):
        for name, v in [
            *((n, results.get(n)) for n in ("teacher", "student_zeroshot")),
            *results["methods"].items(),
        ]:
            rows[name], p = _row(v)
            for k, s in p.items():
                parts.setdefault(k, s)
        if isinstance(results.get("test_size"), dict):
            parts = {k: s for k, v in results["test_size"].items() if (s := _size(v))} or parts
        if isinstance(results.get("classes"), list) and parts.get("all"):
            parts["all"].setdefault("classes", len(results["classes"]))
        return rows, parts, None
    own, parts = _row(results)
    if own:
        return {Scores.SELF: own}, parts, None
    for name, v in results.items():  # the demo: one entry per model
        if (r := _row(v)[0]) and not isinstance(v.get("base"), dict):
            rows[name] = r
    return rows, {}, None


def _belongs(run: dict, student_dir: Path, run_dir: Path) -> bool:
    """Whether the run-level results.json of ``run_dir`` lists the student of ``student_dir``:
    ``OUT/<method>/`` of a full run, ``OUT/<dataset>/seed<k>/<method>/`` of a protocol run."""
    method = student_dir.name
    if isinstance(run.get("methods"), dict):  # a full run's results.json before the one schema
        return student_dir.parent == run_dir and method in run["methods"]
    table, seeds = run.get("details") or run.get("datasets"), run.get("seeds")
    if not isinstance(table, dict) or not isinstance(seeds, list):
        return False
    if run.get("protocol") == "full":  # OUT/<method>/: one dataset, one seed
        return student_dir.parent == run_dir and any(
            isinstance(t, dict) and method in t for t in table.values()
        )
    ds, seed_dir = student_dir.parent.parent.name, student_dir.parent.name
    return (
        student_dir.parent.parent.parent == run_dir
        and isinstance(table.get(ds), dict)
        and method in table[ds]
        and seed_dir in {f"seed{s}" for s in seeds}
    )


def run_results(student_file: Path) -> dict | None:
    """The run-level ``results.json`` of the run that made ``student_file`` (``comkd run`` or
    ``comkd demo``'s ``run/``), where the student sits in it: it holds the teacher's and the
    undistilled student's scores beside the methods'. None when there is none (a file that does
    not parse is passed over: it is not the one the user gave)."""
    here = student_file.resolve().parent
    for up in (here.parent, here.parent.parent.parent):
        try:
            data = read_json(up / "results.json")
        except (ModelError, OSError):
            continue
        if data and _belongs(data, here, up):
            return data
    return None

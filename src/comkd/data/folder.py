"""Own data without code: a folder of class sub-folders, or a CSV file of paths and labels.

Image folder: ``root[/subdir]/<class>/<image>``; classes are the sorted sub-folders. Class names
come from, in order of preference: ``classes.tsv`` (``index<TAB>name`` or ``index<TAB>id<TAB>name``,
optional header) or ``classnames.txt`` (one name per line, line i = label i), found in the image
folder or in ``root``; otherwise the folder names. Underscores become spaces. With a class file,
labels are the file's indices and a sub-folder is matched to a class by its id column, then by
name, then by an integer folder name, then (when the counts agree) by sorted position.

CSV: a header row with ``path`` and ``label`` and/or ``classname`` columns (optional ``split``
column with values pretrain/train/val/test); paths relative to the CSV's folder. With only
``label``, names come from a ``classes.tsv``/``classnames.txt`` next to the CSV, else ``str(label)``;
with only ``classname``, labels are the sorted unique names' positions.

Splits: a CoOp-format ``split_file`` (paths relative to the image folder) or a CSV ``split``
column when given; otherwise each class is split deterministically with
``split_per_class(items, fractions, split_seed)``; default fractions pretrain/train/val/test =
0.0/0.6/0.1/0.3 and ``split_seed=0`` (independent of the few-shot seed, so the test set never
changes across seeds).
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence

from .errors import DataError
from .files import (
    check_labels,
    class_folder_items,
    classnames_from_items,
    clean_classname,
    list_class_dirs,
    read_classes_tsv,
    read_split_file,
)
from .records import DEFAULT_TEMPLATE, SPLIT_NAMES, DatasetSplits, Datum
from .splits import split_per_class

FOLDER_FRACTIONS = (0.0, 0.6, 0.1, 0.3)

log = logging.getLogger(__name__)


def read_class_file(path: str) -> tuple[list[str], dict[str, int]]:
    """Read ``classes.tsv`` (see ``read_classes_tsv``) or a one-name-per-line file -> (names, id map)."""
    if path.endswith(".tsv"):
        return read_classes_tsv(path)
    with open(path, encoding="utf-8") as f:
        names = [clean_classname(line) for line in f if line.strip()]
    if not names:
        raise DataError(f"class-name file {path} is empty")
    return names, {}


def find_class_file(*folders: str, names: Sequence[str] = ("classes.tsv", "classnames.txt")) -> str | None:
    """The first of the files ``names`` in the first of ``folders`` that has one, or None."""
    paths = (os.path.join(folder, fn) for folder in folders for fn in names)
    return next((p for p in paths if os.path.isfile(p)), None)


def _match_folders(folders: list[str], names: list[str], ids: dict[str, int], source: str) -> dict[str, int]:
    by_name = {n.lower(): i for i, n in enumerate(names)}
    out: dict[str, int] = {}
    unmatched = []
    for f in folders:
        if f in ids:
            out[f] = ids[f]
        elif clean_classname(f).lower() in by_name:
            out[f] = by_name[clean_classname(f).lower()]
        elif f.isdigit() and int(f) < len(names):
            out[f] = int(f)
        else:
            unmatched.append(f)
    if unmatched:
        if not out and len(folders) == len(names):
            return {f: i for i, f in enumerate(folders)}
        raise DataError(f"{source}: class folder(s) {unmatched[:5]} match no class in the class file")
    return out


def _resolve(path: str | None, base: str) -> str | None:
    """A relative file name resolves against the dataset folder first (as split files do), then
    against the working directory."""
    if path is None or os.path.isabs(path):
        return path
    inside = os.path.join(base, path)
    return inside if os.path.exists(inside) else path


def load_image_folder(
    root: str,
    *,
    split_file: str | None = None,
    skip_bad: bool = False,
    subdir: str | None = None,
    classes_file: str | None = None,
    fractions: Sequence[float] = FOLDER_FRACTIONS,
    split_seed: int = 0,
    templates: Sequence[str] = (DEFAULT_TEMPLATE,),
) -> DatasetSplits:
    """Read ``root[/subdir]/<class>/<image>`` into splits (see the module docstring for the rules)."""
    if root is None:
        raise DataError("dataset 'imagefolder' needs root= (a folder with one sub-folder per class)")
    root = os.path.abspath(os.path.expanduser(root))
    image_dir = os.path.join(root, subdir) if subdir else root
    if not os.path.isdir(image_dir):
        raise DataError(f"image folder not found: {image_dir}")
    cfile = _resolve(classes_file, root) or find_class_file(image_dir, root)
    if cfile is not None and not os.path.isfile(cfile):
        raise DataError(f"class-name file not found: {cfile}")
    if split_file is not None:
        sfile = split_file if os.path.isabs(split_file) else os.path.join(root, split_file)
        splits = read_split_file(sfile, image_dir)
        classnames = read_class_file(cfile)[0] if cfile else classnames_from_items(splits, sfile)
        check_labels(splits, classnames, f"split file {sfile}")
        splits = {k: [Datum(d.path, d.label, classnames[d.label]) for d in v] for k, v in splits.items()}
        return DatasetSplits("imagefolder", classnames, **splits, templates=list(templates))
    folders = list_class_dirs(image_dir)
    if not folders:
        raise DataError(f"image folder {image_dir} has no class sub-folders")
    if cfile:
        classnames, ids = read_class_file(cfile)
        f2l = _match_folders(folders, classnames, ids, f"{image_dir} with {cfile}")
    else:
        classnames = [clean_classname(f) for f in folders]
        f2l = {f: i for i, f in enumerate(folders)}
    skipped: list[tuple[str, str]] = []
    items = class_folder_items(image_dir, f2l, classnames, image_dir, skipped, skip_bad, empty_ok=True)
    splits = split_per_class(items, fractions, split_seed)
    return DatasetSplits("imagefolder", classnames, **splits, templates=list(templates), skipped=skipped)


def load_csv(
    path: str,
    *,
    classes_file: str | None = None,
    fractions: Sequence[float] = FOLDER_FRACTIONS,
    split_seed: int = 0,
    templates: Sequence[str] = (DEFAULT_TEMPLATE,),
) -> DatasetSplits:
    """Read a CSV of ``path,label`` / ``path,classname`` rows (header required) into splits."""
    if path is None or not os.path.isfile(path):
        raise DataError(f"CSV file not found: {path}")
    base = os.path.dirname(os.path.abspath(path))
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = [c.strip().lower() for c in (reader.fieldnames or [])]
        rows = [{k.strip().lower(): (v or "").strip() for k, v in r.items() if k is not None} for r in reader]
    if "path" not in cols or not ({"label", "classname"} & set(cols)):
        raise DataError(
            f"CSV {path}: header {cols} needs a 'path' column and a 'label' and/or 'classname' column"
        )
    if not rows:
        raise DataError(f"CSV {path} has no rows")
    cfile = _resolve(classes_file, base) or find_class_file(base)
    names_from_file = read_class_file(cfile)[0] if cfile else None
    if "label" in cols:
        labels = []
        for n, r in enumerate(rows, start=2):
            try:
                labels.append(int(r["label"]))
            except ValueError:
                raise DataError(f"CSV {path}: line {n} has non-integer label {r['label']!r}") from None
        if names_from_file is not None:
            classnames = names_from_file
        else:  # a label's name: its first row's classname, else the label itself (rows: not empty)
            pairs: dict[int, str] = {}
            for y, r in zip(labels, rows, strict=True):
                pairs.setdefault(y, clean_classname(r.get("classname", str(y))))
            classnames = [pairs.get(i, str(i)) for i in range(max(labels) + 1)]
    else:
        classnames = names_from_file or sorted({clean_classname(r["classname"]) for r in rows})
        lookup = {c: i for i, c in enumerate(classnames)}
        labels = []
        for n, r in enumerate(rows, start=2):
            c = clean_classname(r["classname"])
            if c not in lookup:
                raise DataError(f"CSV {path}: line {n} class name {r['classname']!r} is not in {cfile}")
            labels.append(lookup[c])
    for n, y in enumerate(labels, start=2):
        if not 0 <= y < len(classnames):
            raise DataError(
                f"CSV {path}: line {n} label {y} is outside the class list (0..{len(classnames) - 1})"
            )
    empty = sorted(set(range(len(classnames))) - set(labels))
    if empty and names_from_file is None:  # labels with gaps would build phantom classes
        raise DataError(
            f"CSV {path}: labels must run 0..K-1 without gaps, but {len(empty)} label(s) have no rows "
            f"({empty[:5]}{', ...' if len(empty) > 5 else ''}; largest label {max(labels)}); fix the labels "
            "or name the classes in a classes.tsv / classnames.txt"
        )
    if empty:  # the names come from a file: a class without rows is dropped, with a warning
        log.warning(
            "CSV %s: %d class(es) of %s have no rows and are dropped: %s",
            path,
            len(empty),
            cfile,
            [classnames[i] for i in empty[:5]],
        )
        keep = [i for i in range(len(classnames)) if i not in set(empty)]
        remap = {old: new for new, old in enumerate(keep)}
        classnames, labels = [classnames[i] for i in keep], [remap[y] for y in labels]
    items: list[Datum] = []
    explicit: dict[str, list[Datum]] = {s: [] for s in SPLIT_NAMES}
    for n, (r, y) in enumerate(zip(rows, labels, strict=True), start=2):  # labels: checked above
        p = r["path"] if os.path.isabs(r["path"]) else os.path.join(base, r["path"])
        d = Datum(os.path.normpath(p), y, classnames[y])
        if "split" in cols:
            if r["split"] not in explicit:
                raise DataError(
                    f"CSV {path}: line {n} split {r['split']!r} is not one of {', '.join(SPLIT_NAMES)}"
                )
            explicit[r["split"]].append(d)
        else:
            items.append(d)
    splits = explicit if "split" in cols else split_per_class(items, fractions, split_seed)
    return DatasetSplits("csv", classnames, **splits, templates=list(templates))

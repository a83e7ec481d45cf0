"""File helpers shared by every dataset reader: image and class-folder listing, class-name
cleaning, ``classes.tsv`` and CoOp-format split files, label checks."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from .errors import DataError
from .records import Datum

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def clean_classname(name: str) -> str:
    """Class name as used in prompts: underscores become spaces, surrounding blanks stripped."""
    return name.replace("_", " ").strip()


def is_image_file(path: str) -> bool:
    """True for a file name with a common image extension (case-insensitive), not hidden."""
    name = os.path.basename(path)
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(folder: str) -> list[str]:
    """Sorted absolute paths of the image files directly inside ``folder`` (hidden files ignored)."""
    with os.scandir(folder) as it:
        names = [e.name for e in it if e.is_file() and is_image_file(e.name)]
    return [os.path.join(folder, n) for n in sorted(names)]


def list_class_dirs(folder: str) -> list[str]:
    """Sorted names of the non-hidden sub-folders of ``folder``."""
    if not os.path.isdir(folder):
        raise DataError(f"image folder not found: {folder}")
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def class_folder_items(
    image_dir: str,
    folder_label: dict[str, int],
    classnames: Sequence[str],
    source: str,
    skipped: list[tuple[str, str]],
    skip_bad: bool,
    empty_ok: bool = False,
) -> list[Datum]:
    """The images of every class sub-folder of ``image_dir``, labelled by ``folder_label``. A folder
    with no images is a ``DataError``, or with ``skip_bad`` is listed in ``skipped`` instead; no
    images at all is a ``DataError`` unless ``empty_ok``."""
    items: list[Datum] = []
    for folder in list_class_dirs(image_dir):
        path = os.path.join(image_dir, folder)
        if folder not in folder_label:
            raise DataError(f"{source}: class folder {path} is not in the class list")
        files = list_images(path)
        if not files:
            if not skip_bad:
                raise DataError(f"class folder has no images: {path}")
            skipped.append((path, "class folder has no images"))
            continue
        y = folder_label[folder]
        items.extend(Datum(p, y, classnames[y]) for p in files)
    if not items and not empty_ok:
        raise DataError(f"{source}: no images found under {image_dir}")
    return items


# -- split files ---------------------------------------------------------------------------------
def read_split_file(path: str, image_dir: str) -> dict[str, list[Datum]]:
    """Parse a CoOp split file ``{"train"|"val"|"test": [[relpath, label, classname], ...]}``.

    Paths become ``join(image_dir, relpath)`` (absolute); class names are cleaned with
    ``clean_classname``. Files are not checked for existence here (``ImageDataset`` does that).
    Raises ``DataError`` naming the file, key and entry for a missing file, bad JSON, a bad entry
    or a label that maps to two different class names.
    """
    if not os.path.isfile(path):
        raise DataError(f"split file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"split file {path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise DataError(
            f"split file {path}: expected an object with keys train/val/test, got {type(raw).__name__}"
        )
    if unknown := sorted(set(raw) - {"train", "val", "test"}):
        raise DataError(f"split file {path}: unknown key(s) {unknown}; expected train, val, test")
    image_dir = os.path.abspath(image_dir)
    names: dict[int, str] = {}
    out: dict[str, list[Datum]] = {}
    for key in ("train", "val", "test"):
        entries = raw.get(key, [])
        if not isinstance(entries, list):
            raise DataError(f"split file {path}: key {key!r} must hold a list of [relpath, label, classname]")
        items = []
        for i, e in enumerate(entries):
            if (
                not isinstance(e, list | tuple)
                or len(e) != 3
                or not isinstance(e[0], str)
                or isinstance(e[1], bool)
                or not isinstance(e[1], int)
                or not isinstance(e[2], str)
            ):
                raise DataError(
                    f"split file {path}: {key}[{i}] = {e!r} is not [relpath, int label, classname]"
                )
            if e[1] < 0:
                raise DataError(f"split file {path}: {key}[{i}] has negative label {e[1]}")
            name = clean_classname(e[2])
            if names.setdefault(e[1], name) != name:
                raise DataError(
                    f"split file {path}: {key}[{i}] gives label {e[1]} the name {name!r}, "
                    f"but an earlier entry named it {names[e[1]]!r}"
                )
            items.append(Datum(os.path.join(image_dir, e[0]), e[1], name))
        out[key] = items
    return out


def read_classes_tsv(path: str) -> tuple[list[str], dict[str, int]]:
    """Read a class table: ``index<TAB>name`` or ``index<TAB>id<TAB>name`` (optional header row).

    With a header, columns are found by name (``index``/``label``; ``name``/``classname``;
    ``wnid``/``id``/``folder``); other columns are ignored. Returns the class names in index order
    (underscores become spaces) and a map id -> index (empty without an id column).
    """
    with open(path, encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    if not rows:
        raise DataError(f"class table {path} is empty")
    i_idx, i_id, i_name = 0, None, None
    if not rows[0][0].strip().lstrip("-").isdigit():
        header = [h.strip().lower() for h in rows.pop(0)]

        def col(*cands: str) -> int | None:
            return next((header.index(c) for c in cands if c in header), None)

        i_idx = col("index", "label", "idx")
        i_name = col("name", "classname", "class_name", "class")
        i_id = col("wnid", "id", "folder", "dir")
        if i_idx is None or i_name is None:
            raise DataError(f"class table {path}: header {header} needs an 'index' and a 'name' column")
    else:
        width = len(rows[0])
        if width == 2:
            i_name = 1
        elif width == 3:
            i_id, i_name = 1, 2
        else:
            raise DataError(f"class table {path}: expected 2 or 3 tab-separated columns, got {width}")
    table: dict[int, str] = {}
    ids: dict[str, int] = {}
    for n, r in enumerate(rows, start=1):
        try:
            idx = int(r[i_idx])
            name = r[i_name]
            ident = r[i_id].strip() if i_id is not None else None
        except (ValueError, IndexError):
            raise DataError(f"class table {path}: malformed row {n}: {r!r}") from None
        if idx in table:
            raise DataError(f"class table {path}: index {idx} appears twice")
        table[idx] = clean_classname(name)
        if ident is not None:
            ids[ident] = idx
    if sorted(table) != list(range(len(table))):
        raise DataError(f"class table {path}: indices must be 0..{len(table) - 1} without gaps")
    return [table[i] for i in range(len(table))], ids


def classnames_from_items(splits: dict[str, list[Datum]], source: str) -> list[str]:
    """Class list from the ``(label, classname)`` pairs of all splits; gaps raise ``DataError``."""
    names: dict[int, str] = {}
    for items in splits.values():
        for d in items:
            names.setdefault(d.label, d.classname)
    if not names:
        raise DataError(f"{source}: no items in any split")
    if missing := sorted(set(range(max(names) + 1)) - set(names)):
        raise DataError(
            f"{source}: labels {missing[:10]}{'...' if len(missing) > 10 else ''} never appear, so their class "
            "names are unknown (put a classes.tsv next to the images to give the full class list)"
        )
    return [names[i] for i in range(len(names))]


def check_labels(splits: dict[str, list[Datum]], classnames: Sequence[str], source: str) -> None:
    """Raise ``DataError`` naming ``source``, the split key and the path for a label outside the class list."""
    n = len(classnames)
    for key, items in splits.items():
        for i, d in enumerate(items):
            if not 0 <= d.label < n:
                raise DataError(
                    f"{source}: {key}[{i}] ({d.path}) has label {d.label}, outside the class list "
                    f"({n} classes, valid labels 0..{n - 1})"
                )

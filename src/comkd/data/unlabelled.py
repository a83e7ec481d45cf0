"""Own data without labels: a folder of images (searched recursively) plus a class-names file.

This is the distillation source of ``--protocol full``: the student learns from the teacher's
outputs on these images, so no labels are needed. Every image goes to the ``train`` split (the
split distillation reads); there is nothing to evaluate on, so the other splits are empty.
Items carry the label ``-1`` (unknown); ``ImageDataset`` accepts it for unlabelled datasets only.

Class names: ``classes_file`` (one name a line, or a ``classes.tsv``), else a ``classnames.txt`` /
``classes.tsv`` inside the folder. The file itself and hidden files/folders are never images.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Sequence

from .errors import DataError
from .files import IMAGE_EXTENSIONS
from .records import DEFAULT_TEMPLATE, DatasetSplits, Datum

UNLABELLED = -1


def is_image_file(path: str) -> bool:
    """True for a file name with a common image extension (case-insensitive), not hidden."""
    name = os.path.basename(path)
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_images_recursive(folder: str) -> list[str]:
    """Sorted absolute paths of every image file under ``folder`` (hidden entries skipped)."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(os.path.join(dirpath, f) for f in filenames if is_image_file(f))
    return sorted(os.path.abspath(p) for p in out)


def collect_images(inputs: Iterable[str | os.PathLike]) -> list[str]:
    """Expand image files, folders (recursively) and glob patterns into a sorted-per-input, de-duplicated
    list of absolute paths. An input that matches nothing raises ``DataError`` naming it."""
    seen: set[str] = set()
    out: list[str] = []

    def add(paths: Sequence[str]) -> None:
        for p in paths:
            if p not in seen:
                seen.add(p)
                out.append(p)

    for item in inputs:
        s = os.path.expanduser(str(item))
        if os.path.isdir(s):
            found = list_images_recursive(s)
            if not found:
                raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under folder {s}")
            add(found)
        elif os.path.isfile(s):
            add([os.path.abspath(s)])
        elif glob.has_magic(s):
            matches = sorted(glob.glob(s, recursive=True))
            files: list[str] = []
            for m in matches:
                if os.path.isdir(m):
                    files.extend(list_images_recursive(m))
                elif is_image_file(m):
                    files.append(os.path.abspath(m))
            if not files:
                raise DataError(f"pattern {s!r} matches no image files")
            add(files)
        else:
            raise DataError(f"no such image file or folder: {s}")
    return out


def read_names_file(path: str) -> list[str]:
    """Class names from a ``classes.tsv`` or a one-name-a-line file; duplicates are refused."""
    from .folder import read_class_file

    if not os.path.isfile(path):
        raise DataError(f"class-names file not found: {path}")
    names = read_class_file(path)[0]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"class-names file {path} lists {dup[:5]} more than once")
    return names


def load_unlabelled_folder(
    root: str,
    *,
    classes_file: str | None = None,
    templates: Sequence[str] = (DEFAULT_TEMPLATE,),
    name: str = "unlabelled",
) -> DatasetSplits:
    """All images under ``root`` as the unlabelled ``train`` split, with the class names of
    ``classes_file`` (see the module docstring)."""
    if root is None:
        raise DataError("dataset 'unlabelled' needs root= (a folder of images)")
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise DataError(f"image folder not found: {root}")
    if classes_file is None:
        for fn in ("classnames.txt", "classes.tsv"):
            if os.path.isfile(os.path.join(root, fn)):
                classes_file = os.path.join(root, fn)
                break
    if classes_file is None:
        raise DataError(
            f"dataset 'unlabelled' ({root}) needs a class-names file: data.classes_file=FILE "
            "(one name a line), or classnames.txt in the folder"
        )
    names = read_names_file(classes_file)
    files = list_images_recursive(root)
    if not files:
        raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    items = [Datum(p, UNLABELLED, "") for p in files]
    return DatasetSplits(name, names, train=items, val=[], test=[], templates=list(templates))

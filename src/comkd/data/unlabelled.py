"""Own data without labels: a folder of images (searched recursively) plus a class-names file.

The distillation pool of ``--protocol full`` (the student learns from the teacher's outputs, so no
labels are needed): every image goes to the ``train`` split, the other splits are empty. Items
carry the label ``-1`` (unknown); ``ImageDataset`` accepts it for unlabelled datasets only.

Class names: ``classes_file`` (one name a line, or a ``classes.tsv``), else a ``classnames.txt`` /
``classes.tsv`` inside the folder. The file itself and hidden files/folders are never images.
"""

from __future__ import annotations

import fnmatch
import glob
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence

from .errors import DataError
from .files import IMAGE_EXTENSIONS, is_image_file
from .folder import find_class_file, read_class_file
from .records import DEFAULT_TEMPLATE, DatasetSplits, Datum

log = logging.getLogger(__name__)

UNLABELLED = -1


def _identity(path: str, st: os.stat_result | None = None) -> tuple[int, int] | str:
    """What makes a file or folder the same one under another name: (st_dev, st_ino) of the
    target of every link; the path itself when it cannot be read (a broken link stays listed, so
    whoever opens it names it)."""
    try:
        st = st or os.stat(path)
    except OSError:
        return os.path.abspath(path)
    return (st.st_dev, st.st_ino)


def walk_images(folder: str) -> Iterator[tuple[tuple[str, ...], str]]:
    """``(parts relative to folder, path)`` of every image file under ``folder``, depth first in
    name order. Links to folders and files are followed, but each real folder is entered once and
    each real file listed once (by device and inode; the first name in that order wins), so a
    link loop ends the walk of that branch, with a warning naming the link. Hidden entries are
    skipped; a folder that cannot be read is skipped with a warning."""
    root = os.path.abspath(folder)
    entered: set[tuple[int, int] | str] = {_identity(root)}
    listed: set[tuple[int, int] | str] = set()
    stack: list[tuple[str, tuple[str, ...], frozenset]] = [(root, (), frozenset(entered))]
    while stack:
        path, parts, ancestors = stack.pop()
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            log.warning("cannot read folder %s (%s); its images are skipped", path, e.strerror or e)
            continue
        subdirs: list[tuple[str, tuple[str, ...], frozenset]] = []
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                is_dir = e.is_dir()  # follows links
                st = e.stat()  # of a link's target
            except OSError:
                is_dir, st = False, None
            key = _identity(e.path, st)
            if is_dir:
                if key in ancestors:
                    log.warning(
                        "link loop: %s leads back to %s, which holds it; not followed",
                        e.path,
                        os.path.realpath(e.path),
                    )
                elif key in entered:
                    log.debug("%s: a folder already walked under another name; skipped", e.path)
                else:
                    entered.add(key)
                    subdirs.append((e.path, (*parts, e.name), ancestors | {key}))
            elif is_image_file(e.name) and key not in listed:
                listed.add(key)
                yield (*parts, e.name), e.path
        stack.extend(reversed(subdirs))


def list_images_recursive(folder: str) -> list[str]:
    """Sorted absolute paths of every image file under ``folder`` (the rules of ``walk_images``)."""
    return sorted(path for _, path in walk_images(folder))


def _match_parts(pattern: Sequence[str], parts: Sequence[str]) -> bool:
    """Whether path components ``parts`` match glob components ``pattern`` (``**``: any number of
    folders, other components as ``fnmatch``)."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_match_parts(pattern[1:], parts[k:]) for k in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatch(parts[0], pattern[0]) and _match_parts(pattern[1:], parts[1:])


def glob_images(pattern: str) -> list[str]:
    """Image files a glob pattern names: matched files, and every image under a matched folder.
    A pattern with a ``**`` component walks its fixed leading folder once with ``walk_images``
    (``glob``'s own ``**`` follows link loops until the OS refuses the path)."""
    comps = pattern.split(os.sep)
    while len(comps) > 1 and comps[-1] == "":
        comps.pop()
    if "**" not in comps:  # a bounded depth: glob's own listing cannot loop
        files: list[str] = []
        for m in sorted(glob.glob(pattern)):
            if os.path.isdir(m):
                files.extend(list_images_recursive(m))
            elif is_image_file(m):
                files.append(os.path.abspath(m))
        return files
    i = next(k for k, c in enumerate(comps) if glob.has_magic(c))
    root = os.sep.join(comps[:i]) or (os.sep if pattern.startswith(os.sep) else os.curdir)
    if not os.path.isdir(root):
        return []
    rest = comps[i:]
    return sorted(
        path
        for parts, path in walk_images(root)
        if any(_match_parts(rest, parts[:k]) for k in range(len(parts) + 1))
    )


def collect_images(inputs: Iterable[str | os.PathLike]) -> list[str]:
    """Expand image files, folders (recursively) and glob patterns into a sorted-per-input, de-duplicated
    list of paths as the user gave them (a file as named, a folder's images under the folder as
    named, so ``photos/`` gives ``photos/a/1.jpg``; each real file once, whatever links name it).
    An input that matches nothing raises ``DataError`` naming it."""
    seen: set[tuple[int, int] | str] = set()
    out: list[str] = []
    for item in inputs:
        s = os.path.expanduser(str(item))
        if os.path.isdir(s):
            found = sorted(os.path.join(s, *parts) for parts, _ in walk_images(s))
            if not found:
                raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under folder {s}")
        elif os.path.isfile(s):
            found = [s]
        elif glob.has_magic(s):
            found = glob_images(s)
            if not found:
                raise DataError(f"pattern {s!r} matches no image files")
        else:
            raise DataError(f"no such image file or folder: {s}")
        for p in found:
            if (key := _identity(p)) not in seen:
                seen.add(key)
                out.append(p)
    return out


def read_names_file(path: str) -> list[str]:
    """Class names from a ``classes.tsv`` or a one-name-a-line file; duplicates are refused."""
    if not os.path.isfile(path):
        raise DataError(f"class-names file not found: {path}")
    names = read_class_file(path)[0]
    # Counter: linear, 100,000 names are checked in well under a second
    if dup := sorted(n for n, c in Counter(names).items() if c > 1):
        raise DataError(f"class-names file {path} lists {dup[:5]} more than once")
    return names


def load_unlabelled_folder(
    root: str,
    *,
    classes_file: str | None = None,
    templates: Sequence[str] = (DEFAULT_TEMPLATE,),
) -> DatasetSplits:
    """All images under ``root`` as the unlabelled ``train`` split, with the class names of
    ``classes_file`` (see the module docstring)."""
    if root is None:
        raise DataError("dataset 'unlabelled' needs root= (a folder of images)")
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise DataError(f"image folder not found: {root}")
    if classes_file is None:
        classes_file = find_class_file(root, names=("classnames.txt", "classes.tsv"))
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
    return DatasetSplits("unlabelled", names, train=items, val=[], test=[], templates=list(templates))

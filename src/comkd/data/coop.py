"""Readers for the CoOp dataset layout and its ``split_zhou_*.json`` split files.

Layout: ``root/<dataset_dir>/<image_dir>`` plus the split file, per ``COOP_SPECS`` (CoOp's
DATASETS.md); ``root`` may also *be* the dataset folder (e.g. one holding ``images/`` and a split
file passed as ``split_file=``). ImageNet reads ``images/{train,val}/<wnid>/`` and
``classnames.txt``; FGVC-Aircraft ``variants.txt`` and ``images_variant_{split}.txt``; the DG
targets class folders (``<wnid>``, or ``0..999`` for ImageNet-V2) and ``classnames.txt``.

Conventions:

* Class names come from the split file (they already hold CoOp's renames, e.g. EuroSAT's
  "Annual Crop Land", Caltech101 without BACKGROUND_Google/Faces_easy). Underscores become spaces
  (CoOp does this when it builds prompts). Flowers-102 names are taken from ``cat_to_name.json``
  (keyed by 1-based label) when that file is in the dataset folder. When the dataset folder holds
  a ``classes.tsv`` (subset copies), it gives the class list and label range.
* ImageNet: ``classnames.txt`` lines ``<wnid> <name>``; label = line index. CoOp has no separate
  val split for ImageNet; as in CoOp, ``val`` is the test (``images/val``) split.
* DG targets (ImageNet-V2/-Sketch/-A/-R) are test-only datasets: ``train``, ``val`` and ``test``
  all hold every image (the distillation protocol is transductive on them). ``classnames.txt`` is
  looked for in the target's folder (where CoOp copies it), then in ``root/imagenet``.
  ImageNet-A/-R use the 200 class folders present, labelled 0..199 in sorted-wnid order as in
  CoOp; ``class_indices`` gives each class's ImageNet-1k label. With
  ``imagenet_label_space=True`` labels stay ImageNet-1k labels and the class list has all 1000.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace

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
from .records import DEFAULT_TEMPLATE, DatasetSplits, Datum

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CoopSpec:
    """Where a CoOp dataset lives (relative to ``root``) and its prompt template."""

    name: str
    dataset_dir: str
    image_dir: str
    split_file: str | None
    template: str = DEFAULT_TEMPLATE


COOP_SPECS: dict[str, CoopSpec] = {
    s.name: s
    for s in [
        CoopSpec("imagenet", "imagenet", "images", None),
        CoopSpec("caltech101", "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
        CoopSpec(
            "oxford_pets",
            "oxford_pets",
            "images",
            "split_zhou_OxfordPets.json",
            "a photo of a {}, a type of pet.",
        ),
        CoopSpec("stanford_cars", "stanford_cars", "", "split_zhou_StanfordCars.json"),
        CoopSpec(
            "oxford_flowers",
            "oxford_flowers",
            "jpg",
            "split_zhou_OxfordFlowers.json",
            "a photo of a {}, a type of flower.",
        ),
        CoopSpec(
            "food101", "food-101", "images", "split_zhou_Food101.json", "a photo of {}, a type of food."
        ),
        CoopSpec("fgvc_aircraft", "fgvc_aircraft", "images", None, "a photo of a {}, a type of aircraft."),
        CoopSpec("sun397", "sun397", "SUN397", "split_zhou_SUN397.json"),
        CoopSpec("dtd", "dtd", "images", "split_zhou_DescribableTextures.json", "{} texture."),
        CoopSpec(
            "eurosat", "eurosat", "2750", "split_zhou_EuroSAT.json", "a centered satellite photo of {}."
        ),
        CoopSpec(
            "ucf101", "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", "a photo of a person doing {}."
        ),
        CoopSpec("imagenet_v2", "imagenetv2", "imagenetv2-matched-frequency-format-val", None),
        CoopSpec("imagenet_sketch", "imagenet-sketch", "images", None),
        CoopSpec("imagenet_a", "imagenet-adversarial", "imagenet-a", None),
        CoopSpec("imagenet_r", "imagenet-rendition", "imagenet-r", None),
    ]
}


# -- dataset folders -----------------------------------------------------------------------------
def resolve_dataset_dir(spec: CoopSpec, root: str) -> str:
    """``root/<dataset folder>`` if it exists, else ``root`` itself when it holds the image folder."""
    if root is None:
        raise DataError(f"dataset {spec.name!r} needs root= (the folder that holds {spec.dataset_dir}/)")
    root = os.path.abspath(os.path.expanduser(root))
    cand = os.path.join(root, spec.dataset_dir)
    if os.path.isdir(cand):
        return cand
    if os.path.isdir(os.path.join(root, spec.image_dir)):  # root itself when image_dir is ""
        return root
    raise DataError(
        f"dataset {spec.name!r} not found: neither {cand} nor {os.path.join(root, spec.image_dir)} exists "
        f"(expected CoOp layout root/{spec.dataset_dir}/{spec.image_dir})"
    )


def _find_split_file(spec: CoopSpec, ddir: str, split_file: str | None) -> str:
    # os.path.join keeps an absolute split_file as it is
    p = os.path.join(ddir, (spec.split_file or "") if split_file is None else split_file)
    if os.path.isfile(p):
        return p
    if split_file is not None:
        raise DataError(f"split file not found: {p} (given as split_file={split_file!r})")
    raise DataError(
        f"split file not found: {p} (dataset {spec.name!r} expects {spec.split_file} in its folder; "
        "pass split_file= to use another)"
    )


def load_coop_json(
    spec: CoopSpec, root: str, *, split_file: str | None = None, skip_bad: bool = False
) -> DatasetSplits:
    """Load a dataset described by a CoOp split file (all CoOp datasets except ImageNet/Aircraft/DG);
    ``skip_bad`` is unused (missing files are ``ImageDataset``'s to drop)."""
    ddir = resolve_dataset_dir(spec, root)
    sfile = _find_split_file(spec, ddir, split_file)
    image_dir = os.path.join(ddir, spec.image_dir) if spec.image_dir else ddir
    splits = read_split_file(sfile, image_dir)
    tsv = os.path.join(ddir, "classes.tsv")
    classnames = read_classes_tsv(tsv)[0] if os.path.isfile(tsv) else classnames_from_items(splits, sfile)
    check_labels(splits, classnames, f"split file {sfile}")
    c2n = os.path.join(ddir, "cat_to_name.json")
    if spec.name == "oxford_flowers" and os.path.isfile(c2n):
        with open(c2n, encoding="utf-8") as f:
            cat = json.load(f)
        try:
            classnames = [clean_classname(cat[str(i + 1)]) for i in range(len(classnames))]
        except KeyError as exc:
            raise DataError(f"{c2n}: no name for 1-based label {exc}") from None
    splits = {k: [replace(d, classname=classnames[d.label]) for d in v] for k, v in splits.items()}
    return DatasetSplits(spec.name, classnames, **splits, templates=[spec.template])


def read_imagenet_classnames(path: str) -> tuple[list[str], list[str]]:
    """Read ImageNet's ``classnames.txt`` (``<wnid> <class name>`` per line) -> (wnids, names)."""
    if not os.path.isfile(path):
        raise DataError(f"ImageNet class-name file not found: {path}")
    wnids, names = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.strip().split(" ", 1)
            if len(parts) != 2:
                raise DataError(f"{path}: line {n} is not '<wnid> <class name>': {line.strip()!r}")
            wnids.append(parts[0])
            names.append(clean_classname(parts[1]))
    if len(set(wnids)) != len(wnids):
        raise DataError(f"{path}: duplicate wnids")
    return wnids, names


def load_imagenet(root: str, *, skip_bad: bool = False, classes_file: str | None = None) -> DatasetSplits:
    """ImageNet-1k from ``imagenet/images/{train,val}/<wnid>/`` and ``imagenet/classnames.txt``."""
    spec = COOP_SPECS["imagenet"]
    ddir = resolve_dataset_dir(spec, root)
    wnids, names = read_imagenet_classnames(classes_file or os.path.join(ddir, "classnames.txt"))
    f2l = {w: i for i, w in enumerate(wnids)}
    skipped: list[tuple[str, str]] = []
    img = os.path.join(ddir, spec.image_dir)
    train = class_folder_items(os.path.join(img, "train"), f2l, names, "imagenet train", skipped, skip_bad)
    test = class_folder_items(os.path.join(img, "val"), f2l, names, "imagenet val", skipped, skip_bad)
    return DatasetSplits(
        "imagenet", names, train, list(test), test, templates=[spec.template], skipped=skipped
    )


def load_fgvc_aircraft(root: str) -> DatasetSplits:
    """FGVC-Aircraft from ``variants.txt`` and ``images_variant_{train,val,test}.txt``."""
    spec = COOP_SPECS["fgvc_aircraft"]
    ddir = resolve_dataset_dir(spec, root)
    vfile = os.path.join(ddir, "variants.txt")
    if not os.path.isfile(vfile):
        raise DataError(f"class list not found: {vfile}")
    with open(vfile, encoding="utf-8") as f:
        classnames = [line.strip() for line in f if line.strip()]
    c2l = {c: i for i, c in enumerate(classnames)}
    splits: dict[str, list[Datum]] = {}
    for key in ("train", "val", "test"):
        sfile = os.path.join(ddir, f"images_variant_{key}.txt")
        if not os.path.isfile(sfile):
            raise DataError(f"split file not found: {sfile}")
        items = []
        with open(sfile, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                parts = line.strip().split(" ", 1)
                if not line.strip():
                    continue
                if len(parts) != 2 or parts[1] not in c2l:
                    raise DataError(f"{sfile}: line {n} {line.strip()!r} names no variant listed in {vfile}")
                y = c2l[parts[1]]
                items.append(Datum(os.path.join(ddir, spec.image_dir, parts[0] + ".jpg"), y, classnames[y]))
        splits[key] = items
    return DatasetSplits("fgvc_aircraft", classnames, **splits, templates=[spec.template])


def load_imagenet_variant(
    name: str,
    root: str,
    *,
    skip_bad: bool = False,
    classes_file: str | None = None,
    imagenet_label_space: bool = False,
) -> DatasetSplits:
    """A domain-generalisation target (imagenet_v2, imagenet_sketch, imagenet_a, imagenet_r); test-only."""
    spec = COOP_SPECS[name]
    ddir = resolve_dataset_dir(spec, root)
    cands = [
        os.path.join(d, "classnames.txt") for d in (ddir, os.path.join(os.path.abspath(root), "imagenet"))
    ]
    cfile = classes_file or next((c for c in cands if os.path.isfile(c)), cands[0])
    wnids, names = read_imagenet_classnames(cfile)
    img = os.path.join(ddir, spec.image_dir)
    skipped: list[tuple[str, str]] = []
    class_indices: list[int] | None = None
    classnames = names
    w2i = {w: i for i, w in enumerate(wnids)}
    if name == "imagenet_v2":
        f2l = {str(i): i for i in range(len(wnids))}
    elif name == "imagenet_sketch" or imagenet_label_space:
        f2l = w2i
    else:
        present = list_class_dirs(img)
        unknown = [w for w in present if w not in w2i]
        if unknown:
            raise DataError(
                f"{name}: class folder(s) {unknown[:5]} under {img} are not ImageNet wnids in classnames.txt"
            )
        if len(present) != 200:
            log.warning("%s: expected 200 class folders under %s, found %d", name, img, len(present))
        class_indices = [w2i[w] for w in present]
        f2l = {w: i for i, w in enumerate(present)}
        classnames = [names[w2i[w]] for w in present]
    items = class_folder_items(img, f2l, classnames, name, skipped, skip_bad)
    return DatasetSplits(
        name,
        classnames,
        items,
        list(items),
        list(items),
        templates=[spec.template],
        class_indices=class_indices,
        skipped=skipped,
    )

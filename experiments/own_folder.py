"""A user's own-data folder made of real CIFAR-10 images (../shared/data), laid out as the README's
own-data section expects, for the test that runs the README's commands and for tuning ``own_tiny``.

    ROOT/my_images/       unlabelled images in one flat folder, no class in any name
    ROOT/names.txt        the class names, one a line
    ROOT/labelled_few/    ``shots`` labelled images per class (CIFAR-10 train images)
    ROOT/labelled_test/   ``test`` labelled images per class (CIFAR-10 test images)
    ROOT/photos/          a few unlabelled images to predict
    ROOT/new_names.txt    two of the class names, for ``comkd classes``

Images are symbolic links into the shared folder (nothing is copied)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("COMKD_SHARED_DATA", REPO.parent / "shared" / "data"))
CIFAR = SHARED / "cifar10"
#: the five classes of the README check (the first five of CIFAR-10's label order)
CHECK_CLASSES = ["airplane", "automobile", "bird", "cat", "deer"]
#: the five other classes, on which the ``own_tiny`` preset's settings were chosen
TUNE_CLASSES = ["dog", "frog", "horse", "ship", "truck"]


def make_own_folder(
    root: Path, classes: list[str] = CHECK_CLASSES, *, pool: int = 100, shots: int = 16, test: int = 40
) -> Path:
    """Lay out ``root`` (see the module docstring): ``pool`` unlabelled test images per class
    (ids 100..), ``shots`` labelled train images per class, ``test`` labelled test images per class
    (ids 0..); the three sets are disjoint."""
    root = Path(root)
    if pool > 900 or test > 100 or shots > 100:
        raise ValueError("at most 900 pool, 100 test and 100 shot images per class")
    (root / "my_images").mkdir(parents=True, exist_ok=True)
    (root / "photos").mkdir(exist_ok=True)
    k = 0
    for c in classes:
        for i in range(100, 100 + pool):
            os.symlink(CIFAR / "test" / c / f"{i:04d}.jpg", root / "my_images" / f"img{k:05d}.jpg")
            k += 1
        for part, sub, ids in (
            ("labelled_few", "train_subset", range(shots)),
            ("labelled_test", "test", range(test)),
        ):
            d = root / part / c
            d.mkdir(parents=True, exist_ok=True)
            for i in ids:
                os.symlink(CIFAR / sub / c / f"{i:04d}.jpg", d / f"{i:04d}.jpg")
        os.symlink(CIFAR / "test" / c / "0999.jpg", root / "photos" / f"{c}_0999.jpg")
    (root / "names.txt").write_text("\n".join(classes) + "\n")
    (root / "new_names.txt").write_text("\n".join(classes[:2]) + "\n")
    return root


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--classes", default="check", choices=["check", "tune"])
    a = ap.parse_args()
    make_own_folder(a.root, CHECK_CLASSES if a.classes == "check" else TUNE_CLASSES)
    print(a.root)

"""Teacher self-training on an unlabelled pool (stage 0 of ``--protocol full`` without weights).

A teacher pre-trained here on the user's few labelled images knows little; the unlabelled pool
that stage 2 distils on is many times larger. Each round labels the pool with the teacher's
zero-shot prediction, keeps the most confident share per class (class-balanced, so one class the
teacher favours cannot take the pool over) and trains the teacher further on the labelled images
plus those pseudo-labelled ones. Only the teacher self-trains: the student is meant to know less.

Chosen on five CIFAR-10 classes the README check does not use (``experiments/own_folder.py``
TUNE_CLASSES; 16 shots, 500 pool images, 40 test images per class): see ``own_tiny.yaml``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..config import ConfigError, RunConfig
from ..data.dataset import ImageDataset
from ..data.records import Datum
from .builders import eval_loader, make_dataset
from .evaluation import clip_class_weights
from .utils import gather_loader_rows

log = logging.getLogger(__name__)


def select_confident(probs: torch.Tensor, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-balanced confident pseudo-labels.

    Args:
        probs: ``[N, C]`` class probabilities of ``N`` pool images.
        per_class: at most this many images kept per predicted class.

    Returns:
        ``(indices [M], labels [M])``: for each class ``c`` in order, the images whose arg-max is
        ``c``, most confident first (ties by index), at most ``per_class`` of them; ``M <= C * per_class``.
    """
    if probs.ndim != 2:
        raise ValueError(f"probs must be [N, C], got shape {tuple(probs.shape)}")
    conf, lab = probs.max(-1)
    kept = []  # per class c, its images' indices
    for c in range(probs.shape[1]):
        idx = (lab == c).nonzero().flatten()
        order = torch.sort(-conf[idx], stable=True).indices  # stable: equal confidence keeps index order
        kept.append(idx[order][: max(int(per_class), 0)])
    return torch.cat(kept), torch.cat([torch.full_like(keep, c) for c, keep in enumerate(kept)])


@torch.no_grad()
def pool_probabilities(loaded, classnames: list[str], templates: list[str], loader, device) -> torch.Tensor:
    """``[N, C]`` zero-shot class probabilities of an open_clip model on the pool images, in order
    (under torchrun each rank scores its share of ``eval_loader``'s and the ranks exchange them)."""
    model = loaded.model.eval()
    w = clip_class_weights(model, loaded.tokenizer, classnames, templates, device)
    scale = model.logit_scale.exp().float() if hasattr(model, "logit_scale") else torch.tensor(100.0)
    out = []
    for images, _, _ in loader:
        f = torch.nn.functional.normalize(model.encode_image(images.to(device)).float(), dim=-1)
        out.append((scale * f @ w.t()).softmax(-1).cpu())
    return gather_loader_rows(torch.cat(out), loader)


def self_train(
    cfg: RunConfig,
    pool_cfg: RunConfig,
    loaded,
    shots: ImageDataset,
    train_round: Callable[[ImageDataset, int, int], None],
    device: torch.device,
) -> list[dict[str, Any]]:
    """``cfg.pretrain.self_train_rounds`` rounds of self-training of ``loaded`` (the teacher after
    stage 0): label the ``train`` split of ``pool_cfg`` (eval transform), keep
    ``round(self_train_keep * pool / classes)`` per class (``select_confident``), and call
    ``train_round(dataset, round, epochs)`` on ``shots`` plus those. Returns one record per round."""
    p = cfg.pretrain
    pool = make_dataset(pool_cfg, "train", loaded.preprocess, train=False, unlabelled=True)
    if not isinstance(pool, ImageDataset):
        raise ConfigError(
            "pretrain.self_train_rounds: self-training reads the pool by index; a WebDataset pool "
            "streams, so set pretrain.self_train_rounds=0 or give a folder of images"
        )
    if pool.full_classnames != shots.classnames:
        raise ConfigError(
            f"pretrain.self_train_rounds: the pool's {len(pool.full_classnames)} classes differ from "
            f"the labelled images' {len(shots.classnames)}"
        )
    names = list(shots.classnames)
    per_class = max(1, round(p.self_train_keep * len(pool) / len(names)))
    records = []
    for r in range(1, p.self_train_rounds + 1):
        probs = pool_probabilities(loaded, names, shots.templates, eval_loader(cfg, pool, device), device)
        idx, labels = select_confident(probs, per_class)
        data: Sequence[Datum] = list(shots.data) + [
            Datum(pool.item_ids[i], int(c), names[int(c)])
            for i, c in zip(idx.tolist(), labels.tolist(), strict=True)
        ]
        ds = ImageDataset(
            data,
            names,
            None,
            train_transform=shots.train_transform,
            view_seed=shots.view_seed,
            templates=shots.templates,
            name=shots.name,
            source=f"labelled images + {len(idx)} pseudo-labelled pool images",
        )
        counts = torch.bincount(labels, minlength=len(names)).tolist()
        log.info(
            "pretrain teacher self-training round %d/%d: %d of %d pool images pseudo-labelled (per class %s)",
            r,
            p.self_train_rounds,
            len(idx),
            len(pool),
            counts,
        )
        train_round(ds, r, p.self_train_epochs)
        records.append(
            {"round": r, "pseudo_labelled": len(idx), "per_class": counts, "pool_images": len(pool)}
        )
    return records

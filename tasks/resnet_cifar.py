"""``resnet_cifar``: a BatchNorm ResNet in CIFAR form on CIFAR-10/100.

CIFAR form: a 3 × 3 stem convolution (stride 1, no max-pool), then stages of
post-activation BasicBlocks (He et al. 2016: conv1-bn1-relu-conv2-bn2, plus the shortcut,
then ReLU). Stage ``i`` has ``blocks[i]`` blocks of ``width * 2**i`` channels; every stage
after the first halves the resolution. ``blocks=[2, 2, 2, 2], width=64`` is the usual CIFAR
ResNet-18, ``blocks=[3, 3, 3], width=16`` is He et al.'s ResNet-20. Global average
pooling, then ``self.readout``. Data and metrics come from :class:`tasks.cifar.CifarTask`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tasks.cifar import DATA_DEFAULTS, METRICS, CifarTask  # noqa: F401 - METRICS: task convention

DEFAULTS: dict[str, Any] = {
    "model": {"blocks": None, "width": None},
    "data": dict(DATA_DEFAULTS),
    "target": {"metric": "val_acc", "value": None, "mode": "max"},
}

PRESETS: dict[str, dict[str, Any]] = {
    # one block per stage, 8 channels: ~20k parameters (tests).
    "tiny": {"batch_size": 16, "steps": 200,
             "model": {"blocks": [1, 1, 1], "width": 8},
             "data": {"eval_examples": 256}},
    # ResNet-20 (He et al.), ~0.27M parameters, ~0.75 s a step on one CPU core: one
    # epoch in ~5 minutes.
    "small": {"batch_size": 128, "steps": 400,
              "model": {"blocks": [3, 3, 3], "width": 16},
              "data": {"eval_examples": 1000}},
    # CIFAR ResNet-18, ~11M parameters, ~100 epochs at batch 512.
    "paper": {"batch_size": 512, "steps": 9800,
              "model": {"blocks": [2, 2, 2, 2], "width": 64},
              "data": {"eval_examples": None}},
}


class BasicBlock(nn.Module):
    """Post-activation basic block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    The shortcut is the identity, or a strided 1 × 1 convolution + BatchNorm when the
    shape changes.
    """

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet (see the module docstring)."""

    def __init__(self, *, num_classes: int, blocks: list[int], width: int) -> None:
        super().__init__()
        if not blocks or any(int(n) < 1 for n in blocks):
            raise ValueError(f"task.model.blocks must be a non-empty list of positive ints, got {blocks}")
        self.stem_conv = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        stages, in_channels = [], width
        for i, n in enumerate(blocks):
            channels = width * 2 ** i
            stage = [BasicBlock(in_channels, channels, stride=1 if i == 0 else 2)]
            stage += [BasicBlock(channels, channels, stride=1) for _ in range(int(n) - 1)]
            stages.append(nn.Sequential(*stage))
            in_channels = channels
        self.stages = nn.ModuleList(stages)
        self.readout = nn.Linear(in_channels, num_classes)
        for module in self.modules():  # torchvision's ResNet initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, classes) for normalised images (B, 3, 32, 32)."""
        x = F.relu(self.stem_bn(self.stem_conv(images)))
        for stage in self.stages:
            x = stage(x)
        return self.readout(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def gauges(self) -> list:
        """``NormGain(bn1, [conv2])`` per block (only a ReLU, positively homogeneous,
        separates them) and ``LogitShift`` of the readout. ``bn2``, the shortcut BN and the
        stem BN feed the residual sum, so they have no exact gauge."""
        from ddc.gauges import LogitShift, NormGain

        gauges = [NormGain(block.bn1, [block.conv2])
                  for stage in self.stages for block in stage]
        return gauges + [LogitShift(self.readout)]


class ResNetCifarTask(CifarTask):
    """CIFAR-10/100 classification with :class:`ResNet`."""

    name = "resnet_cifar"
    defaults = DEFAULTS
    presets = PRESETS

    def check_model_config(self, model_cfg: dict[str, Any]) -> None:
        blocks = model_cfg["blocks"]
        if not isinstance(blocks, (list, tuple)) or not blocks or any(
                not isinstance(n, int) or n < 1 for n in blocks):
            raise ValueError(f"task.model.blocks must be a non-empty list of positive ints, got {blocks!r}")

    def build_model(self) -> ResNet:
        m = self.config["model"]
        return ResNet(num_classes=self.num_classes, blocks=list(m["blocks"]), width=m["width"])

    def describe(self) -> dict[str, Any]:
        m = self.config["model"]
        return {**super().describe(), "blocks": list(m["blocks"]), "width": m["width"]}


def build(cfg: dict[str, Any], *, num_workers: int = 0) -> ResNetCifarTask:
    """Registry builder for ``resnet_cifar``."""
    return ResNetCifarTask(cfg, num_workers=num_workers)

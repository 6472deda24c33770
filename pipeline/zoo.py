"""Built-in architectures: the CIFAR ResNets and the demo CNN.

CIFAR ResNets follow He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016),
Sec. 4.2: 6n+2 layers in three stages of 16/32/64 channels, with the parameter-free
"option A" shortcut (subsample by 2, zero-pad the new channels). Module names match the
widely used checkpoints of that family (conv1, bn1, layer1.0.conv1, ..., linear), so such
a checkpoint loads as it is.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class _PadShortcut(nn.Module):
    """Option-A shortcut: take every second pixel and zero-pad the channels."""

    def __init__(self, pad_channels: int):
        super().__init__()
        self.pad_channels = pad_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pad_channels
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = _PadShortcut(planes // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Functional ReLUs on purpose: this is how the reference checkpoints' code is written,
        # and attribution methods must cope with it.
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs; ``depth`` 20, 32, 44, 56 or 110."""

    def __init__(self, depth: int = 20, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, n, 1)
        self.layer2 = self._stage(32, n, 2)
        self.layer3 = self._stage(64, n, 2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def _stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


class DemoCNN(nn.Module):
    """The demo's small classifier: four conv-BN-ReLU blocks, global average pooling, one linear.

    Ending in GAP + linear makes it a CAM-able model (Zhou et al. 2016); ReLUs are modules.
    """

    def __init__(self, num_classes: int = 4, width: int = 16):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        for i in range(1, 5):
            setattr(self, f"conv{i}", nn.Conv2d(chans[i - 1], chans[i], 3, padding=1))
            setattr(self, f"bn{i}", nn.BatchNorm2d(chans[i]))
            setattr(self, f"relu{i}", nn.ReLU())
            if i < 4:
                setattr(self, f"pool{i}", nn.MaxPool2d(2))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, 5):
            x = getattr(self, f"relu{i}")(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
            if i < 4:
                x = getattr(self, f"pool{i}")(x)
        return self.fc(self.gap(x).flatten(1))


BUILTINS: dict[str, Callable[..., nn.Module]] = {
    "cifar_resnet20": lambda num_classes=10: CifarResNet(20, num_classes),
    "cifar_resnet32": lambda num_classes=10: CifarResNet(32, num_classes),
    "cifar_resnet44": lambda num_classes=10: CifarResNet(44, num_classes),
    "cifar_resnet56": lambda num_classes=10: CifarResNet(56, num_classes),
    "cifar_resnet110": lambda num_classes=10: CifarResNet(110, num_classes),
    "demo_cnn": lambda num_classes=4: DemoCNN(num_classes),
}

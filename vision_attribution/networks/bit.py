"""BiT (Big Transfer) ResNetV2 classifier in the google-research/big_transfer ``bit_pytorch`` layout.

Pre-activation bottleneck ResNet with weight-standardised convolutions and GroupNorm(32).
State-dict keys match ``bit_pytorch.models.ResNetV2``: ``root.conv.weight``,
``body.block{1..4}.unit{NN}.{gn1,conv1,gn2,conv2,gn3,conv3,downsample}.*``, ``head.gn.*``,
``head.conv.{weight,bias}``.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import load_strictly, read_state_dict

GROUP_NORM_GROUPS = 32
STAGE_COUNT = 4
# Keys under which known training scripts nest the weights (bit_pytorch/train.py saves {"model": ...}).
CHECKPOINT_CONTAINER_KEYS = ("model", "model_state_dict", "state_dict")
_UNIT_KEY = re.compile(r"^body\.block(\d+)\.unit(\d+)\.")


class StdConv2d(nn.Conv2d):
    """Conv2d whose kernel is standardised per output channel (zero mean, unit variance) at each call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance, mean = torch.var_mean(self.weight, dim=(1, 2, 3), keepdim=True, correction=0)
        weight = (self.weight - mean) / torch.sqrt(variance + 1e-10)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck unit, stride on the 3x3 conv: (B,C_in,H,W) -> (B,C_out,H/s,W/s)."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int, stride: int = 1):
        super().__init__()
        self.gn1 = nn.GroupNorm(GROUP_NORM_GROUPS, in_channels)
        self.conv1 = StdConv2d(in_channels, mid_channels, kernel_size=1, bias=False)
        self.gn2 = nn.GroupNorm(GROUP_NORM_GROUPS, mid_channels)
        self.conv2 = StdConv2d(mid_channels, mid_channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.gn3 = nn.GroupNorm(GROUP_NORM_GROUPS, mid_channels)
        self.conv3 = StdConv2d(mid_channels, out_channels, kernel_size=1, bias=False)
        if stride != 1 or in_channels != out_channels:
            self.downsample = StdConv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.gn1(x))
        shortcut = self.downsample(activated) if hasattr(self, "downsample") else x
        out = self.conv1(activated)
        out = self.conv2(F.relu(self.gn2(out)))
        out = self.conv3(F.relu(self.gn3(out)))
        return out + shortcut


class ResNetV2(nn.Module):
    """BiT ResNetV2: images (B,3,H,W) -> logits (B,num_classes); any H,W >= 32 (32x32 reaches 1x1 in block4)."""

    def __init__(self, block_units: Sequence[int], width_factor: int, num_classes: int):
        super().__init__()
        if len(block_units) != STAGE_COUNT or min(block_units) < 1:
            raise ValueError(f"block_units must be {STAGE_COUNT} positive unit counts, got {list(block_units)}")
        self.block_units = tuple(block_units)
        self.width_factor = width_factor
        self.num_classes = num_classes
        root_channels = 64 * width_factor
        self.root = nn.Sequential(OrderedDict([
            ("conv", StdConv2d(3, root_channels, kernel_size=7, stride=2, padding=3, bias=False)),
            ("pad", nn.ConstantPad2d(1, 0.0)),
            ("pool", nn.MaxPool2d(kernel_size=3, stride=2, padding=0)),
        ]))
        stages = OrderedDict()
        in_channels = root_channels
        for stage_index, unit_count in enumerate(block_units):
            mid_channels = root_channels * 2 ** stage_index
            out_channels = 4 * mid_channels
            units = OrderedDict()
            for unit_index in range(1, unit_count + 1):
                first_unit = unit_index == 1
                units[f"unit{unit_index:02d}"] = PreActBottleneck(
                    in_channels if first_unit else out_channels, out_channels, mid_channels,
                    stride=2 if first_unit and stage_index > 0 else 1)
            stages[f"block{stage_index + 1}"] = nn.Sequential(units)
            in_channels = out_channels
        self.body = nn.Sequential(stages)
        self.head = nn.Sequential(OrderedDict([
            ("gn", nn.GroupNorm(GROUP_NORM_GROUPS, in_channels)),
            ("relu", nn.ReLU()),
            ("avg", nn.AdaptiveAvgPool2d(1)),
            ("conv", nn.Conv2d(in_channels, num_classes, kernel_size=1, bias=True)),
        ]))

    @property
    def variant_name(self) -> str:
        """BiT name such as ``R101x3`` (depth = 3 convs per unit + root conv + head)."""
        return f"R{3 * sum(self.block_units) + 2}x{self.width_factor}"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) float -> (B,num_classes) logits."""
        return self.head(self.body(self.root(images)))[:, :, 0, 0]


def read_bit_state_dict(source: str | os.PathLike | Mapping[str, torch.Tensor], trust: bool = False) -> dict[str, torch.Tensor]:
    """Checkpoint path or mapping -> flat state dict without the DataParallel ``module.`` prefix."""
    return read_state_dict(source, CHECKPOINT_CONTAINER_KEYS, "BiT", trust)


def infer_bit_architecture(state_dict: Mapping[str, torch.Tensor]) -> tuple[tuple[int, ...], int, int]:
    """State dict -> (units per block, width factor, number of classes)."""
    for required_key in ("root.conv.weight", "head.conv.weight"):
        if required_key not in state_dict:
            raise ValueError(f"BiT checkpoint lacks {required_key!r}; cannot infer the architecture")
    root_channels = state_dict["root.conv.weight"].shape[0]
    if root_channels % 64:
        raise ValueError(f"root.conv.weight has {root_channels} output channels, not a multiple of 64")
    unit_indices: dict[int, set[int]] = {stage: set() for stage in range(1, STAGE_COUNT + 1)}
    for key in state_dict:
        match = _UNIT_KEY.match(key)
        if match and int(match.group(1)) in unit_indices:
            unit_indices[int(match.group(1))].add(int(match.group(2)))
    block_units = tuple(max(indices, default=0) for indices in unit_indices.values())
    if min(block_units) < 1:
        raise ValueError(f"BiT checkpoint has no units in some block (units per block: {block_units})")
    return block_units, root_channels // 64, state_dict["head.conv.weight"].shape[0]


def load_bit(source: str | os.PathLike | Mapping[str, torch.Tensor]) -> ResNetV2:
    """Build the BiT variant the checkpoint describes and load it strictly.

    ``source``: path to a ``torch.save`` file, or a mapping; either a bare state dict or one nested
    under ``"model"`` (bit_pytorch train.py), ``"model_state_dict"`` or ``"state_dict"``; keys may carry
    a ``module.`` prefix. Weights are cast to float32. Returns the model in eval mode with frozen parameters.
    Raises ValueError naming every missing, unexpected or mis-shaped key.
    """
    state_dict = read_bit_state_dict(source)
    block_units, width_factor, num_classes = infer_bit_architecture(state_dict)
    with torch.device("meta"):
        model = ResNetV2(block_units, width_factor, num_classes)
    return load_strictly(model, state_dict, f"BiT {model.variant_name}")

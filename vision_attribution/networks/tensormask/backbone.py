"""ResNet + FPN backbone with detectron2's parameter names (build_retinanet_resnet_fpn_backbone).

Names: ``bottom_up.stem.conv1.{weight,norm.*}``, ``bottom_up.res{2..5}.{i}.conv{1,2,3}``,
``...shortcut`` (first block of each stage), ``fpn_lateral{2..5}``, ``fpn_output{2..5}``,
``top_block.p6``, ``top_block.p7`` (P6 is computed from C5 = res5, as in RetinaNet).
"""
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FrozenBatchNorm2d", "ResNet", "FPN", "build_resnet_fpn_backbone"]

BLOCKS_PER_STAGE = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters, all stored as buffers."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


class NormedConv2d(nn.Conv2d):
    """Bias-free conv followed by a FrozenBatchNorm2d child named ``norm``."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, groups=1):
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False
        )
        self.norm = FrozenBatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(x))


class BasicStem(nn.Module):
    """7x7/2 conv + norm + relu + 3x3/2 max pool (stride 4)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = NormedConv2d(in_channels, out_channels, 7, stride=2, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu(self.conv1(x)), kernel_size=3, stride=2, padding=1)


class BottleneckBlock(nn.Module):
    """1x1 -> 3x3 -> 1x1 residual block; MSRA weights put the stride in the first 1x1."""

    def __init__(self, in_channels, out_channels, bottleneck_channels, stride, stride_in_1x1, groups):
        super().__init__()
        if in_channels != out_channels:
            self.shortcut = NormedConv2d(in_channels, out_channels, 1, stride=stride)
        else:
            self.shortcut = None
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = NormedConv2d(in_channels, bottleneck_channels, 1, stride=stride_1x1)
        self.conv2 = NormedConv2d(
            bottleneck_channels, bottleneck_channels, 3, stride=stride_3x3, padding=1, groups=groups
        )
        self.conv3 = NormedConv2d(bottleneck_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv1(x))
        out = F.relu(self.conv2(out))
        out = self.conv3(out)
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + shortcut)


class ResNet(nn.Module):
    """Stem + stages res2..res5; forward returns {"res2": (B,256,H/4,W/4), ..., "res5": (B,2048,H/32,W/32)}."""

    def __init__(self, depth=50, num_groups=1, width_per_group=64, stem_out_channels=64,
                 res2_out_channels=256, stride_in_1x1=True):
        super().__init__()
        self.stem = BasicStem(3, stem_out_channels)
        in_channels = stem_out_channels
        out_channels = res2_out_channels
        bottleneck_channels = num_groups * width_per_group
        self.stage_names = []
        self.out_channels = {}
        for stage_index, num_blocks in enumerate(BLOCKS_PER_STAGE[depth]):
            blocks = []
            for block_index in range(num_blocks):
                stride = 2 if (block_index == 0 and stage_index > 0) else 1
                blocks.append(
                    BottleneckBlock(in_channels, out_channels, bottleneck_channels, stride,
                                    stride_in_1x1, num_groups)
                )
                in_channels = out_channels
            name = f"res{stage_index + 2}"
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
            self.out_channels[name] = out_channels
            out_channels *= 2
            bottleneck_channels *= 2

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = self.stem(x)
        outputs = {}
        for name in self.stage_names:
            x = getattr(self, name)(x)
            outputs[name] = x
        return outputs


class LastLevelP6P7(nn.Module):
    """P6 = conv3x3/2(C5), P7 = conv3x3/2(relu(P6))."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, 2, 1)

    def forward(self, c5: torch.Tensor) -> List[torch.Tensor]:
        p6 = self.p6(c5)
        return [p6, self.p7(F.relu(p6))]


class FPN(nn.Module):
    """Feature pyramid over res2..res5 plus P6/P7 from res5.

    forward(images (B,3,H,W), H and W multiples of 32) -> {"p2": ..., "p7": ...}, each
    (B, C, H/s, W/s) with strides s = 4, 8, ..., 128 (``self.strides``).
    """

    size_divisibility = 32

    def __init__(self, bottom_up: ResNet, in_features: List[str], out_channels: int,
                 fuse_type: str):
        super().__init__()
        if fuse_type not in ("sum", "avg"):
            raise ValueError(f"unknown FPN fuse type {fuse_type!r}")
        self.bottom_up = bottom_up
        self.in_features = list(in_features)
        self.fuse_type = fuse_type
        self.stages = []
        for name in self.in_features:
            stage = int(name[len("res"):])
            self.add_module(f"fpn_lateral{stage}",
                            nn.Conv2d(bottom_up.out_channels[name], out_channels, 1))
            self.add_module(f"fpn_output{stage}",
                            nn.Conv2d(out_channels, out_channels, 3, 1, 1))
            self.stages.append(stage)
        self.top_block = LastLevelP6P7(bottom_up.out_channels["res5"], out_channels)
        last = self.stages[-1]
        self.strides = {f"p{s}": 2 ** s for s in self.stages + [last + 1, last + 2]}

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        bottom_up = self.bottom_up(x)
        results = []
        prev = None
        for name, stage in zip(reversed(self.in_features), reversed(self.stages)):
            lateral = getattr(self, f"fpn_lateral{stage}")(bottom_up[name])
            if prev is None:
                prev = lateral
            else:
                prev = lateral + F.interpolate(prev, scale_factor=2.0, mode="nearest")
                if self.fuse_type == "avg":
                    prev = prev / 2
            results.insert(0, getattr(self, f"fpn_output{stage}")(prev))
        results += self.top_block(bottom_up["res5"])
        return dict(zip(self.strides, results))


def build_resnet_fpn_backbone(cfg) -> FPN:
    """Backbone from the config dict (see config.py), as build_retinanet_resnet_fpn_backbone."""
    resnets = cfg["MODEL"]["RESNETS"]
    fpn = cfg["MODEL"]["FPN"]
    bottom_up = ResNet(
        depth=resnets["DEPTH"],
        num_groups=resnets["NUM_GROUPS"],
        width_per_group=resnets["WIDTH_PER_GROUP"],
        stem_out_channels=resnets["STEM_OUT_CHANNELS"],
        res2_out_channels=resnets["RES2_OUT_CHANNELS"],
        stride_in_1x1=resnets["STRIDE_IN_1X1"],
    )
    return FPN(bottom_up, fpn["IN_FEATURES"], fpn["OUT_CHANNELS"], fpn["FUSE_TYPE"])

"""LaNet CIFAR-10 classifier: the DARTS-style ``NetworkCIFAR`` of facebookresearch/LaMCTS (LaNAS/LaNet/CIFAR10).

State-dict keys match that code (``stem.0.weight``, ``cells.{i}.preprocess0.op.1.weight``,
``cells.{i}._ops.{j}.op.{k}.*``, ``auxiliary_head.features.{k}.*``, ``classifier.*``), so its
``{'model_state_dict': ...}`` checkpoints load unchanged. As in LaNet, the 1x1 convolutions inside
ReLUConvBN/SepConv standardise their weights at every call; the depthwise, FactorizedReduce, stem and
auxiliary convolutions do not.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import load_strictly, read_state_dict

# The best CIFAR-10 network of the LaNAS search (LaMCTS README, `--arch`), trained with C=128, 24 layers.
LANET_NET_ENCODING = (2, 2, 0, 2, 1, 2, 0, 2, 2, 3, 2, 1, 2, 0, 0, 1, 1, 1, 2, 1, 1, 0, 3, 4, 3, 0, 3, 1)
# Operation index -> name, the `operations` list of LaNet's nasnet_set.py.
LANET_OPERATIONS = ("sep_conv_3x3", "max_pool_3x3", "skip_connect", "sep_conv_5x5")
CHECKPOINT_CONTAINER_KEY = "model_state_dict"
_CELL_KEY = re.compile(r"^cells\.(\d+)\.")


class Genotype(NamedTuple):
    """Cell description: (operation name, input state index) pairs, two per node, and the concatenated states."""

    normal: list[tuple[str, int]]
    normal_concat: list[int]
    reduce: list[tuple[str, int]]
    reduce_concat: list[int]


def decode_lanet_encoding(net: Sequence[int]) -> Genotype:
    """LaNet ``net=[...]`` list -> Genotype (rule of nasnet_set.gen_code_from_list + translator).

    With n = len(net)/4 nodes, ``net[:2n]`` holds the two operation indices of each node and ``net[2n:]``
    the two input state indices of each node (0, 1 = cell inputs, 2 + k = node k). Normal and reduction
    cells share the code. Concatenated: every state no node reads; the reduction cell also drops 0 and 1.
    """
    node_count, remainder = divmod(len(net), 4)
    if remainder or node_count == 0:
        raise ValueError(f"LaNet encoding length must be a positive multiple of 4, got {len(net)}")
    operation_codes, input_codes = net[:2 * node_count], net[2 * node_count:]
    edges = []
    for edge_index, (operation_code, input_state) in enumerate(zip(operation_codes, input_codes)):
        node_index = edge_index // 2
        if not 0 <= operation_code < len(LANET_OPERATIONS):
            raise ValueError(f"node {node_index}: operation index {operation_code} not in 0..{len(LANET_OPERATIONS) - 1}")
        if not 0 <= input_state <= node_index + 1:
            raise ValueError(f"node {node_index}: input state {input_state} not in 0..{node_index + 1}")
        edges.append((LANET_OPERATIONS[operation_code], input_state))
    unused_states = [state for state in range(node_count + 2) if state not in set(input_codes)]
    return Genotype(normal=edges, normal_concat=unused_states,
                    reduce=list(edges), reduce_concat=[state for state in unused_states if state > 1])


class WeightStandardizedConv2d(nn.Conv2d):
    """LaNet's ``Conv2d``: kernel centred per output channel and divided by (unbiased std + 1e-5) at each call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        std = centred.flatten(1).std(dim=1).view(-1, 1, 1, 1) + 1e-5
        return F.conv2d(x, centred / std, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ReLUConvBN(nn.Module):
    """ReLU -> weight-standardised conv -> BatchNorm: (B,C_in,H,W) -> (B,C_out,H',W')."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(),
            WeightStandardizedConv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class SepConv(nn.Module):
    """Two (ReLU, depthwise kxk, pointwise WS 1x1, BN) stacks, stride on the first: (B,C,H,W) -> (B,C,H/s,W/s)."""

    def __init__(self, channels: int, kernel_size: int, stride: int, padding: int):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, channels, kernel_size, stride=stride, padding=padding, groups=channels, bias=False),
            WeightStandardizedConv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, kernel_size, stride=1, padding=padding, groups=channels, bias=False),
            WeightStandardizedConv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class FactorizedReduce(nn.Module):
    """ReLU, two offset stride-2 1x1 convs concatenated, BN: (B,C_in,H,W) -> (B,C_out,H/2,W/2), H and W even."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        if out_channels % 2:
            raise ValueError(f"FactorizedReduce needs an even channel count, got {out_channels}")
        self.conv_1 = nn.Conv2d(in_channels, out_channels // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(in_channels, out_channels // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1))


def build_operation(name: str, channels: int, stride: int) -> nn.Module:
    """Cell edge operation (LaNet operations.OPS for the four searched names): (B,C,H,W) -> (B,C,H/s,W/s)."""
    if name == "sep_conv_3x3":
        return SepConv(channels, 3, stride, 1)
    if name == "sep_conv_5x5":
        return SepConv(channels, 5, stride, 2)
    if name == "max_pool_3x3":
        return nn.MaxPool2d(3, stride=stride, padding=1)
    if name == "skip_connect":
        return nn.Identity() if stride == 1 else FactorizedReduce(channels, channels)
    raise ValueError(f"unknown LaNet operation {name!r}")


def drop_path(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """Zero whole samples with probability drop_prob and rescale the rest (training only): (B,...) -> (B,...)."""
    keep_prob = 1.0 - drop_prob
    keep_mask = torch.bernoulli(torch.full((x.shape[0], 1, 1, 1), keep_prob, dtype=x.dtype, device=x.device))
    return x / keep_prob * keep_mask


class Cell(nn.Module):
    """Normal or reduction cell: states (B,C_pp,H0,W0), (B,C_p,H,W) -> (B,len(concat)*C,H',W')."""

    def __init__(self, genotype: Genotype, prev_prev_channels: int, prev_channels: int, channels: int,
                 reduction: bool, reduction_prev: bool):
        super().__init__()
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(prev_prev_channels, channels)
        else:
            self.preprocess0 = ReLUConvBN(prev_prev_channels, channels, 1, 1, 0)
        self.preprocess1 = ReLUConvBN(prev_channels, channels, 1, 1, 0)
        edges, self._concat = (genotype.reduce, genotype.reduce_concat) if reduction else (genotype.normal, genotype.normal_concat)
        self._indices = [input_state for _, input_state in edges]
        self._ops = nn.ModuleList(
            build_operation(name, channels, 2 if reduction and input_state < 2 else 1) for name, input_state in edges)
        self.multiplier = len(self._concat)

    def forward(self, state0: torch.Tensor, state1: torch.Tensor, drop_prob: float) -> torch.Tensor:
        states = [self.preprocess0(state0), self.preprocess1(state1)]
        for first_edge in range(0, len(self._ops), 2):
            node_inputs = []
            for edge in (first_edge, first_edge + 1):
                operation = self._ops[edge]
                h = operation(states[self._indices[edge]])
                if self.training and drop_prob > 0.0 and not isinstance(operation, nn.Identity):
                    h = drop_path(h, drop_prob)
                node_inputs.append(h)
            states.append(node_inputs[0] + node_inputs[1])
        return torch.cat([states[index] for index in self._concat], dim=1)


class AuxiliaryHeadCIFAR(nn.Module):
    """Auxiliary classifier on the 8x8 features after the second reduction: (B,C,8,8) -> (B,num_classes)."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(),
            nn.AvgPool2d(5, stride=3, padding=0, count_include_pad=False),
            nn.Conv2d(channels, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(),
            nn.Conv2d(128, 768, 2, bias=False),
            nn.BatchNorm2d(768),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class NetworkCIFAR(nn.Module):
    """LaNet/DARTS CIFAR network: images (B,3,32,32) -> (logits (B,num_classes), aux logits or None).

    Reduction cells sit at indices layers//3 and 2*layers//3; the auxiliary head reads the output of the
    second one and runs only in training mode, so eval mode returns ``(logits, None)`` like the original.
    ``drop_path_prob`` (set by the trainer in the original, 0 here) applies in training mode only.
    """

    def __init__(self, C: int, num_classes: int, layers: int, auxiliary: bool, genotype: Genotype):
        super().__init__()
        self._layers = layers
        self._auxiliary = auxiliary
        self.drop_path_prob = 0.0
        stem_channels = 3 * C
        self.stem = nn.Sequential(nn.Conv2d(3, stem_channels, 3, padding=1, bias=False), nn.BatchNorm2d(stem_channels))
        prev_prev_channels, prev_channels, channels = stem_channels, stem_channels, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        for cell_index in range(layers):
            reduction = cell_index in (layers // 3, 2 * layers // 3)
            if reduction:
                channels *= 2
            cell = Cell(genotype, prev_prev_channels, prev_channels, channels, reduction, reduction_prev)
            self.cells.append(cell)
            reduction_prev = reduction
            prev_prev_channels, prev_channels = prev_channels, cell.multiplier * channels
            if cell_index == 2 * layers // 3:
                auxiliary_channels = prev_channels
        if auxiliary:
            self.auxiliary_head = AuxiliaryHeadCIFAR(auxiliary_channels, num_classes)
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(prev_channels, num_classes)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B,3,H,W) float -> ((B,num_classes) logits, (B,num_classes) aux logits in training else None)."""
        aux_logits = None
        drop_prob = self.drop_path_prob if self.training else 0.0
        state0 = state1 = self.stem(images)
        for cell_index, cell in enumerate(self.cells):
            state0, state1 = state1, cell(state0, state1, drop_prob)
            if cell_index == 2 * self._layers // 3 and self._auxiliary and self.training:
                aux_logits = self.auxiliary_head(state1)
        logits = self.classifier(self.global_pooling(state1).flatten(1))
        return logits, aux_logits


def read_lanet_state_dict(source: str | os.PathLike | Mapping[str, torch.Tensor], trust: bool = False) -> dict[str, torch.Tensor]:
    """Checkpoint path or mapping -> flat state dict (from ``['model_state_dict']`` if present), ``module.`` stripped."""
    return read_state_dict(source, (CHECKPOINT_CONTAINER_KEY,), "LaNet", trust)


def infer_lanet_architecture(state_dict: Mapping[str, torch.Tensor]) -> tuple[int, int, int, bool]:
    """State dict -> (C, num_classes, layers, auxiliary)."""
    for required_key in ("stem.0.weight", "classifier.weight"):
        if required_key not in state_dict:
            raise ValueError(f"LaNet checkpoint lacks {required_key!r}; cannot infer the architecture")
    stem_channels = state_dict["stem.0.weight"].shape[0]
    if stem_channels % 3:
        raise ValueError(f"stem.0.weight has {stem_channels} output channels, not 3*C")
    cell_indices = {int(match.group(1)) for match in map(_CELL_KEY.match, state_dict) if match}
    if not cell_indices:
        raise ValueError("LaNet checkpoint has no cells.* keys")
    auxiliary = any(key.startswith("auxiliary_head.") for key in state_dict)
    return stem_channels // 3, state_dict["classifier.weight"].shape[0], max(cell_indices) + 1, auxiliary


def load_lanet(source: str | os.PathLike | Mapping[str, torch.Tensor],
               net_encoding: Sequence[int] = LANET_NET_ENCODING) -> NetworkCIFAR:
    """Build the LaNet the checkpoint describes (C, layers, auxiliary, classes inferred) and load it strictly.

    ``source``: path to a ``torch.save`` file or a mapping: ``{'model_state_dict': ...}`` or a bare state
    dict, keys optionally prefixed ``module.``. Weights are cast to float32. Returns the model in eval mode
    with frozen parameters. Raises ValueError naming every missing, unexpected or mis-shaped key.
    """
    state_dict = read_lanet_state_dict(source)
    C, num_classes, layers, auxiliary = infer_lanet_architecture(state_dict)
    with torch.device("meta"):
        model = NetworkCIFAR(C, num_classes, layers, auxiliary, decode_lanet_encoding(net_encoding))
    return load_strictly(model, state_dict, f"LaNet C={C} layers={layers} auxiliary={auxiliary}")

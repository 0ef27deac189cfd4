"""MediaPipe selfie segmentation (Apache-2.0, The MediaPipe Authors) as a PyTorch module.

The network mirrors the graph of MediaPipe's ``selfie_segmentation.tflite`` layer for layer:
a MobileNetV3-style encoder, a Lite R-ASPP head and a three-stage decoder with skip
connections. The real weights come from ``vision_attribution.archives.selfie_tflite``.

The module returns person LOGITS (pre-sigmoid); ``torch.sigmoid`` of them, as returned by
:meth:`SelfieSegmenter.probabilities`, is MediaPipe's own output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INPUT_SIZE = 256  # the model is trained on 256x256 RGB images scaled to [0, 1]


def tflite_same_padding(
    input_hw: tuple[int, int], kernel_hw: tuple[int, int], stride_hw: tuple[int, int]
) -> tuple[int, int, int, int]:
    """TFLite/TensorFlow SAME padding as ``F.pad`` argument (left, right, top, bottom).

    The output size is ceil(input / stride); when the total padding is odd, the extra
    row/column goes to the bottom/right, unlike PyTorch's symmetric ``padding=``.
    """
    pads = []
    for size, kernel, stride in zip(input_hw, kernel_hw, stride_hw):
        output = -(-size // stride)
        total = max((output - 1) * stride + kernel - size, 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    return left, right, top, bottom


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with TFLite SAME padding (asymmetric for even totals); NCHW in and out."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = tflite_same_padding(tuple(x.shape[-2:]), self.kernel_size, self.stride)
        return super().forward(F.pad(x, padding))


def upsample_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TFLite RESIZE_BILINEAR with half_pixel_centers=True, align_corners=False: (B,C,h,w) → (B,C,*size)."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def pointwise_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    """1x1 convolution (SAME and VALID padding coincide for a 1x1 kernel)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=1)


class ChannelGate(nn.Module):
    """Squeeze-and-excitation gate: (B,C,H,W) → (B,C,1,1) weights in (0, 1)."""

    def __init__(self, channels: int, squeezed_channels: int) -> None:
        super().__init__()
        self.squeeze = pointwise_conv(channels, squeezed_channels)
        self.excite = pointwise_conv(squeezed_channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3), keepdim=True)
        return torch.sigmoid(self.excite(F.relu(self.squeeze(pooled))))


class InvertedResidual(nn.Module):
    """MobileNetV3 block: 1x1 expand → depthwise k×k → optional SE gate → 1x1 project (+ input).

    (B, in_channels, H, W) → (B, out_channels, H/stride, W/stride).
    """

    def __init__(
        self,
        in_channels: int,
        expanded_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        activation: type[nn.Module],
        gate_channels: int | None,
    ) -> None:
        super().__init__()
        self.expand = pointwise_conv(in_channels, expanded_channels)
        self.expand_activation = activation()
        self.depthwise = Conv2dSame(
            expanded_channels, expanded_channels, kernel_size, stride=stride, groups=expanded_channels
        )
        self.depthwise_activation = activation()
        self.gate = ChannelGate(expanded_channels, gate_channels) if gate_channels else None
        self.project = pointwise_conv(expanded_channels, out_channels)
        self.has_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.depthwise_activation(self.depthwise(self.expand_activation(self.expand(x))))
        if self.gate is not None:
            y = y * self.gate(y)
        y = self.project(y)
        return y + x if self.has_residual else y


class LiteRASPPHead(nn.Module):
    """Lite R-ASPP head: ReLU(1x1 conv(x)) scaled by a global sigmoid gate; (B,C,H,W) → (B,out,H,W)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.features = pointwise_conv(in_channels, out_channels)
        self.global_gate = pointwise_conv(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.global_gate(x.mean(dim=(2, 3), keepdim=True)))
        return F.relu(self.features(x)) * gate


class DecoderStage(nn.Module):
    """Upsample ×2, fuse with an encoder skip through an SE gate, refine with a residual depthwise conv.

    x: (B, in_channels, h, w), skip: (B, out_channels, 2h, 2w) → (B, out_channels, 2h, 2w).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.project = pointwise_conv(in_channels, out_channels)
        self.skip_gate = ChannelGate(out_channels, out_channels)
        self.refine = pointwise_conv(out_channels, out_channels)
        self.depthwise = Conv2dSame(out_channels, out_channels, 3, groups=out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        upsampled = self.project(upsample_bilinear(x, tuple(skip.shape[-2:])))
        fused = skip * self.skip_gate(skip + upsampled) + upsampled
        refined = F.relu(self.refine(fused))
        return refined + F.relu(self.depthwise(refined))


class SelfieSegmenter(nn.Module):
    """MediaPipe selfie segmentation: (B,3,256,256) RGB in [0,1] → (B,1,256,256) person logits.

    Layers are registered in the order their weights appear in the TFLite graph; the
    converter in ``selfie_weights`` relies on that order.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = Conv2dSame(3, 16, 3, stride=2)
        relu, hard_swish = nn.ReLU, nn.Hardswish
        self.encoder = nn.ModuleList(
            [
                InvertedResidual(16, 16, 16, 3, 2, relu, gate_channels=8),  # → 64x64, skip
                InvertedResidual(16, 72, 24, 3, 2, relu, gate_channels=None),
                InvertedResidual(24, 88, 24, 3, 1, relu, gate_channels=None),  # → 32x32, skip
                InvertedResidual(24, 96, 32, 5, 2, hard_swish, gate_channels=24),
                InvertedResidual(32, 128, 32, 5, 1, hard_swish, gate_channels=32),
                InvertedResidual(32, 128, 32, 5, 1, hard_swish, gate_channels=32),
                InvertedResidual(32, 96, 32, 5, 1, hard_swish, gate_channels=24),
                InvertedResidual(32, 96, 32, 5, 1, hard_swish, gate_channels=24),  # → 16x16
            ]
        )
        self.head = LiteRASPPHead(32, 128)
        self.decoder = nn.ModuleList(
            [DecoderStage(128, 24), DecoderStage(24, 16), DecoderStage(16, 16)]
        )
        self.to_logits = nn.ConvTranspose2d(16, 1, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B,3,256,256) RGB in [0,1] → (B,1,256,256) person logits."""
        skip_128 = F.hardswish(self.stem(x))
        skip_64 = self.encoder[0](skip_128)
        skip_32 = self.encoder[2](self.encoder[1](skip_64))
        y = skip_32
        for block in self.encoder[3:]:
            y = block(y)
        y = self.head(y)
        for stage, skip in zip(self.decoder, (skip_32, skip_64, skip_128)):
            y = stage(y, skip)
        return self.to_logits(y)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B,3,256,256) RGB in [0,1] → (B,1,256,256) person probability (MediaPipe's output)."""
        return torch.sigmoid(self(x))

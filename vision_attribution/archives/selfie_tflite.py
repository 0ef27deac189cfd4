"""Real weights for :class:`~vision_attribution.networks.selfie.SelfieSegmenter`, converted from TFLite.

MediaPipe's selfie segmentation model (Apache-2.0, Copyright The MediaPipe Authors) ships as
``selfie_segmentation.tflite`` (fp16 weights) inside the PyPI wheel ``mediapipe==0.10.21``.
This module downloads that wheel with ``pip download`` (at archive/build time, never while
serving), reads the ``.tflite`` straight out of the zip without installing mediapipe, parses
the flatbuffer with the ``tflite`` package's schema classes, dequantizes the fp16 constants and
maps every op of the graph onto the PyTorch layers.

CLI: ``python -m vision_attribution.archives.selfie_tflite OUT.pt [--cache-dir DIR]`` writes the
state dict to OUT.pt and the Apache-2.0 notice to OUT.NOTICE.txt.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tflite
import torch
from torch import nn

from vision_attribution.networks.selfie import Conv2dSame, SelfieSegmenter

MEDIAPIPE_VERSION = "0.10.21"
# The .tflite is identical in every platform's wheel; pinning one wheel makes the download
# independent of the host (mediapipe 0.10.21 publishes no wheels for Python > 3.12).
MEDIAPIPE_WHEEL_TARGET = ("manylinux_2_28_x86_64", "311", "cp", "cp311")  # platform, python, impl, abi
SELFIE_TFLITE_MEMBER = "mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite"
SELFIE_TFLITE_SHA256 = "9ee168ec7c8f2a16c56fe8e1cfbc514974cbbb7e434051b455635f1bd1462f5c"
CACHE_DIR_ENV_VAR = "VISION_ATTRIBUTION_CACHE"

SELFIE_NOTICE = """\
MediaPipe Selfie Segmentation model weights
Copyright The MediaPipe Authors.

Licensed under the Apache License, Version 2.0 (the "License");
you may not use this file except in compliance with the License.
You may obtain a copy of the License at

    http://www.apache.org/licenses/LICENSE-2.0

Unless required by applicable law or agreed to in writing, software
distributed under the License is distributed on an "AS IS" BASIS,
WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
See the License for the specific language governing permissions and
limitations under the License.

Source: mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite from the PyPI
wheel mediapipe=={version} (sha256 of the .tflite: {sha256}).

Modifications: the fp16 TFLite weights were dequantized to float32 and rearranged from
TFLite's NHWC kernel layouts into a PyTorch state dict (NCHW) by
vision_attribution.archives.selfie_tflite. The values are otherwise unchanged.
"""


class WheelDownloadError(RuntimeError):
    """``pip download`` of the mediapipe wheel failed (e.g. PyPI unreachable)."""


def default_cache_dir() -> Path:
    """``$VISION_ATTRIBUTION_CACHE`` or ``~/.cache/vision_attribution``."""
    return Path(os.environ.get(CACHE_DIR_ENV_VAR, "~/.cache/vision_attribution")).expanduser()


def fetch_mediapipe_wheel(cache_dir: str | Path | None = None) -> Path:
    """Path of the cached ``mediapipe==0.10.21`` wheel, downloaded with ``pip download`` if absent."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    platform, python_version, implementation, abi = MEDIAPIPE_WHEEL_TARGET
    wheel_name = f"mediapipe-{MEDIAPIPE_VERSION}-{abi}-{abi}-{platform}.whl"
    wheel_path = cache_dir / wheel_name
    if wheel_path.is_file():
        return wheel_path
    cache_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--platform", platform, "--python-version", python_version,
        "--implementation", implementation, "--abi", abi,
        f"mediapipe=={MEDIAPIPE_VERSION}", "-d", str(cache_dir),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not wheel_path.is_file():
        raise WheelDownloadError(
            f"{' '.join(command)} failed (exit {result.returncode}):\n{result.stderr[-2000:]}"
        )
    return wheel_path


def read_selfie_tflite(cache_dir: str | Path | None = None) -> bytes:
    """Bytes of ``selfie_segmentation.tflite`` read out of the (cached) mediapipe wheel."""
    with zipfile.ZipFile(fetch_mediapipe_wheel(cache_dir)) as wheel:
        model_bytes = wheel.read(SELFIE_TFLITE_MEMBER)
    digest = hashlib.sha256(model_bytes).hexdigest()
    if digest != SELFIE_TFLITE_SHA256:
        raise ValueError(f"{SELFIE_TFLITE_MEMBER}: sha256 {digest}, expected {SELFIE_TFLITE_SHA256}")
    return model_bytes


# ----------------------------------------------------------------------------------------------
# TFLite flatbuffer reader


@dataclass(frozen=True)
class TFLiteTensor:
    """A tensor of the graph; ``buffer`` indexes the model's buffers (0 = no data)."""

    index: int
    name: str
    shape: tuple[int, ...]
    dtype: str  # TFLite TensorType name, e.g. "FLOAT16", "FLOAT32", "INT32"
    buffer: int


@dataclass(frozen=True)
class TFLiteOp:
    """An operator: ``kind`` is the builtin name (``"CONV_2D"``) or the custom op code."""

    index: int
    kind: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    options: dict = field(default_factory=dict)


_TENSOR_TYPE_NAMES = {v: k for k, v in vars(tflite.TensorType).items() if not k.startswith("_")}
_BUILTIN_OP_NAMES = {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}
_ACTIVATION_NAMES = {
    v: k for k, v in vars(tflite.ActivationFunctionType).items() if not k.startswith("_")
}
_PADDING_NAMES = {tflite.Padding.SAME: "SAME", tflite.Padding.VALID: "VALID"}
_NUMPY_DTYPES = {"FLOAT16": "<f2", "FLOAT32": "<f4", "INT32": "<i4", "INT64": "<i8", "UINT8": "u1"}

# builtin op → (options table class, {option name: accessor}) for the options the converter checks
_BUILTIN_OPTIONS = {
    "CONV_2D": (tflite.Conv2DOptions, {
        "padding": "Padding", "stride_h": "StrideH", "stride_w": "StrideW",
        "dilation_h": "DilationHFactor", "dilation_w": "DilationWFactor",
        "activation": "FusedActivationFunction",
    }),
    "DEPTHWISE_CONV_2D": (tflite.DepthwiseConv2DOptions, {
        "padding": "Padding", "stride_h": "StrideH", "stride_w": "StrideW",
        "dilation_h": "DilationHFactor", "dilation_w": "DilationWFactor",
        "depth_multiplier": "DepthMultiplier", "activation": "FusedActivationFunction",
    }),
    "AVERAGE_POOL_2D": (tflite.Pool2DOptions, {
        "padding": "Padding", "stride_h": "StrideH", "stride_w": "StrideW",
        "filter_h": "FilterHeight", "filter_w": "FilterWidth",
        "activation": "FusedActivationFunction",
    }),
    "RESIZE_BILINEAR": (tflite.ResizeBilinearOptions, {
        "align_corners": "AlignCorners", "half_pixel_centers": "HalfPixelCenters",
    }),
    "ADD": (tflite.AddOptions, {"activation": "FusedActivationFunction"}),
    "MUL": (tflite.MulOptions, {"activation": "FusedActivationFunction"}),
}  # fmt: skip

# MediaPipe's custom op stores a TfLiteTransposeConvParams struct: {padding, stride_w, stride_h}
# as int32, where TfLitePadding is 1 = SAME, 2 = VALID.
TRANSPOSE_CONV_BIAS = "Convolution2DTransposeBias"
_TFLITE_C_PADDING_NAMES = {1: "SAME", 2: "VALID"}


def _read_builtin_options(kind: str, operator: tflite.Operator) -> dict:
    if kind not in _BUILTIN_OPTIONS:
        return {}
    options_class, accessors = _BUILTIN_OPTIONS[kind]
    table = operator.BuiltinOptions()
    options = options_class()
    options.Init(table.Bytes, table.Pos)
    values = {name: getattr(options, accessor)() for name, accessor in accessors.items()}
    if "padding" in values:
        values["padding"] = _PADDING_NAMES[values["padding"]]
    if "activation" in values:
        values["activation"] = _ACTIVATION_NAMES[values["activation"]]
    return values


def _read_transpose_conv_bias_options(operator: tflite.Operator) -> dict:
    padding, stride_w, stride_h = np.frombuffer(operator.CustomOptionsAsNumpy().tobytes()[:12], "<i4")
    return {
        "padding": _TFLITE_C_PADDING_NAMES[int(padding)],
        "stride_h": int(stride_h),
        "stride_w": int(stride_w),
    }


class TFLiteGraph:
    """The single subgraph of a TFLite flatbuffer: tensors, ops in execution order, constants."""

    def __init__(self, model_bytes: bytes) -> None:
        model = tflite.Model.GetRootAsModel(model_bytes, 0)
        if model.SubgraphsLength() != 1:
            raise ValueError(f"expected one subgraph, found {model.SubgraphsLength()}")
        graph = model.Subgraphs(0)
        self._buffers = [model.Buffers(i) for i in range(model.BuffersLength())]
        self.tensors = []
        for i in range(graph.TensorsLength()):
            tensor = graph.Tensors(i)
            self.tensors.append(
                TFLiteTensor(
                    index=i,
                    name=tensor.Name().decode(),
                    shape=tuple(int(d) for d in tensor.ShapeAsNumpy()) if tensor.ShapeLength() else (),
                    dtype=_TENSOR_TYPE_NAMES[tensor.Type()],
                    buffer=tensor.Buffer(),
                )
            )
        op_kinds = []
        for i in range(model.OperatorCodesLength()):
            code = model.OperatorCodes(i)
            builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            is_custom = builtin == tflite.BuiltinOperator.CUSTOM
            op_kinds.append(code.CustomCode().decode() if is_custom else _BUILTIN_OP_NAMES[builtin])
        self.ops = []
        for i in range(graph.OperatorsLength()):
            operator = graph.Operators(i)
            kind = op_kinds[operator.OpcodeIndex()]
            options = (
                _read_transpose_conv_bias_options(operator)
                if kind == TRANSPOSE_CONV_BIAS
                else _read_builtin_options(kind, operator)
            )
            self.ops.append(
                TFLiteOp(
                    index=i,
                    kind=kind,
                    inputs=tuple(int(t) for t in operator.InputsAsNumpy()),
                    outputs=tuple(int(t) for t in operator.OutputsAsNumpy()),
                    options=options,
                )
            )
        self.inputs = tuple(int(t) for t in graph.InputsAsNumpy())
        self.outputs = tuple(int(t) for t in graph.OutputsAsNumpy())

    def buffer_bytes(self, buffer_index: int) -> bytes:
        """Raw bytes of a buffer (empty for activations)."""
        buffer = self._buffers[buffer_index]
        return buffer.DataAsNumpy().tobytes() if buffer.DataLength() else b""

    def constant_buffers(self) -> set[int]:
        """Indices of the non-empty buffers that graph tensors hold (weights and other constants)."""
        return {t.buffer for t in self.tensors if self.buffer_bytes(t.buffer)}

    def constant(self, tensor_index: int) -> np.ndarray:
        """Values of a constant tensor in its stored dtype and shape."""
        tensor = self.tensors[tensor_index]
        data = self.buffer_bytes(tensor.buffer)
        if not data:
            raise ValueError(f"tensor {tensor.name!r} has no constant data")
        return np.frombuffer(data, _NUMPY_DTYPES[tensor.dtype]).reshape(tensor.shape)


# ----------------------------------------------------------------------------------------------
# Converter: TFLite graph → SelfieSegmenter state dict

WEIGHTED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", TRANSPOSE_CONV_BIAS)
PARAMETER_FREE_OPS = (
    "ADD", "MUL", "RELU", "HARD_SWISH", "LOGISTIC", "AVERAGE_POOL_2D", "RESIZE_BILINEAR",
)  # fmt: skip


@dataclass
class SelfieConversion:
    """The converted state dict and a record of which graph parts the conversion consumed."""

    state_dict: dict[str, torch.Tensor]
    layer_of_op: dict[int, str]  # op index of a weighted op → name of the torch layer it fills
    used_buffers: set[int]  # buffer indices of every constant read
    handled_ops: list[int]  # indices of every op that was converted or checked


def _check(condition: bool, op: TFLiteOp, message: str) -> None:
    if not condition:
        raise ValueError(f"op {op.index} ({op.kind}): {message}; options {op.options}")


def _torch_layer_parameters(
    op: TFLiteOp, weight: np.ndarray, bias: np.ndarray, layer: nn.Module, graph: TFLiteGraph
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check a weighted op against its torch layer; return (weight, bias) in torch layout."""
    options = op.options
    stride = (options["stride_h"], options["stride_w"])
    _check(stride == tuple(layer.stride), op, f"stride differs from torch layer {layer}")
    if op.kind == TRANSPOSE_CONV_BIAS:
        # TFLite (out, kh, kw, in) → ConvTranspose2d (in, out, kh, kw); no padding, no activation.
        height, width = graph.tensors[op.inputs[0]].shape[1:3]
        out_height, out_width = graph.tensors[op.outputs[0]].shape[1:3]
        kernel_h, kernel_w = weight.shape[1:3]
        unpadded_size = ((height - 1) * stride[0] + kernel_h, (width - 1) * stride[1] + kernel_w)
        _check((out_height, out_width) == unpadded_size, op, "transpose conv with padding")
        _check(layer.padding == (0, 0), op, f"padding differs from torch layer {layer}")
        torch_weight = weight.transpose(3, 0, 1, 2)
    else:
        _check(options["activation"] == "NONE", op, "fused activation")
        _check((options["dilation_h"], options["dilation_w"]) == (1, 1), op, "dilation")
        is_pointwise = weight.shape[1:3] == (1, 1) and stride == (1, 1)
        needs_same_padding = options["padding"] == "SAME" and not is_pointwise
        _check(
            isinstance(layer, Conv2dSame) == needs_same_padding and layer.padding == (0, 0),
            op, f"padding differs from torch layer {layer}",
        )  # fmt: skip
        if op.kind == "DEPTHWISE_CONV_2D":
            # TFLite (1, kh, kw, channels) → grouped Conv2d (channels, 1, kh, kw)
            _check(options["depth_multiplier"] == 1, op, "depth multiplier")
            _check(layer.groups == weight.shape[3], op, "torch layer is not depthwise")
            torch_weight = weight.transpose(3, 0, 1, 2)
        else:
            # TFLite (out, kh, kw, in) → Conv2d (out, in, kh, kw)
            _check(layer.groups == 1, op, "torch layer is grouped")
            torch_weight = weight.transpose(0, 3, 1, 2)
    _check(torch_weight.shape == tuple(layer.weight.shape), op, f"weight shape vs {layer}")
    _check(bias.shape == tuple(layer.bias.shape), op, f"bias shape vs {layer}")
    return torch.from_numpy(np.ascontiguousarray(torch_weight)), torch.from_numpy(bias.copy())


def _check_parameter_free_op(op: TFLiteOp, graph: TFLiteGraph, read_constant) -> None:
    """Check that a parameter-free op has the semantics SelfieSegmenter implements."""
    if op.kind in ("ADD", "MUL"):
        _check(op.options["activation"] == "NONE", op, "fused activation")
    elif op.kind == "AVERAGE_POOL_2D":
        input_hw = graph.tensors[op.inputs[0]].shape[1:3]
        _check(op.options["activation"] == "NONE", op, "fused activation")
        _check((op.options["filter_h"], op.options["filter_w"]) == input_hw, op, "not a global mean")
    elif op.kind == "RESIZE_BILINEAR":
        _check(not op.options["align_corners"] and op.options["half_pixel_centers"], op, "flags")
        input_hw = graph.tensors[op.inputs[0]].shape[1:3]
        size = tuple(int(s) for s in read_constant(op.inputs[1]))
        _check(size == tuple(2 * s for s in input_hw), op, f"resize to {size}, not x2")


def convert_selfie_graph(graph: TFLiteGraph) -> SelfieConversion:
    """Map every op of the selfie segmentation graph onto SelfieSegmenter; raise on anything else.

    Weighted ops are matched, in graph order, to the model's conv layers in registration order;
    each pairing is checked (kind, kernel shape, stride, padding, fused activation).
    """
    model = SelfieSegmenter()
    torch_layers = iter(
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d))
    )
    used_buffers: set[int] = set()

    def read_constant(tensor_index: int) -> np.ndarray:
        used_buffers.add(graph.tensors[tensor_index].buffer)
        return graph.constant(tensor_index)

    dequantized: dict[int, np.ndarray] = {}  # DEQUANTIZE output tensor → float32 values

    def read_float(tensor_index: int) -> np.ndarray:
        if tensor_index in dequantized:
            return dequantized[tensor_index]
        return read_constant(tensor_index).astype(np.float32)

    state_dict: dict[str, torch.Tensor] = {}
    layer_of_op: dict[int, str] = {}
    handled_ops: list[int] = []
    for op in graph.ops:
        if op.kind == "DEQUANTIZE":
            dequantized[op.outputs[0]] = read_constant(op.inputs[0]).astype(np.float32)
        elif op.kind in WEIGHTED_OPS:
            name, layer = next(torch_layers, (None, None))
            _check(layer is not None, op, "more weighted ops than torch layers")
            weight, bias = read_float(op.inputs[1]), read_float(op.inputs[2])
            state_dict[f"{name}.weight"], state_dict[f"{name}.bias"] = _torch_layer_parameters(
                op, weight, bias, layer, graph
            )
            layer_of_op[op.index] = name
        elif op.kind in PARAMETER_FREE_OPS:
            _check_parameter_free_op(op, graph, read_constant)
        else:
            raise ValueError(f"op {op.index}: unsupported op {op.kind}")
        handled_ops.append(op.index)
    leftover = [name for name, _ in torch_layers]
    if leftover:
        raise ValueError(f"torch layers without TFLite weights: {leftover}")
    model.load_state_dict(state_dict, strict=True)
    return SelfieConversion(state_dict, layer_of_op, used_buffers, handled_ops)


def load_selfie_state_dict(cache_dir: str | Path | None = None) -> dict[str, torch.Tensor]:
    """SelfieSegmenter state dict converted from the mediapipe wheel's .tflite (float32)."""
    return convert_selfie_graph(TFLiteGraph(read_selfie_tflite(cache_dir))).state_dict


def load_pretrained_selfie_segmenter(cache_dir: str | Path | None = None) -> SelfieSegmenter:
    """SelfieSegmenter in eval mode with MediaPipe's real weights (build/test time: may run pip)."""
    model = SelfieSegmenter()
    model.load_state_dict(load_selfie_state_dict(cache_dir))
    return model.eval()


def notice_path_for(checkpoint_path: str | Path) -> Path:
    """Where the Apache-2.0 notice for a checkpoint goes: OUT.pt → OUT.NOTICE.txt."""
    return Path(checkpoint_path).with_suffix(".NOTICE.txt")


def write_selfie_checkpoint(
    out_path: str | Path, cache_dir: str | Path | None = None
) -> tuple[Path, Path]:
    """Write the converted state dict to out_path and its notice next to it; return both paths."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(load_selfie_state_dict(cache_dir), out_path)
    notice_path = notice_path_for(out_path)
    notice_path.write_text(SELFIE_NOTICE.format(version=MEDIAPIPE_VERSION, sha256=SELFIE_TFLITE_SHA256))
    return out_path, notice_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m vision_attribution.archives.selfie_tflite",
        description="Convert MediaPipe's selfie segmentation .tflite (from the mediapipe==0.10.21 wheel) "
        "to a SelfieSegmenter state dict, with its Apache-2.0 notice next to it.",
    )
    parser.add_argument("out", type=Path, help="path of the state dict to write (e.g. selfie.pt)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where the wheel is cached")
    args = parser.parse_args(argv)
    for path in write_selfie_checkpoint(args.out, args.cache_dir):
        print(path)


if __name__ == "__main__":
    main()

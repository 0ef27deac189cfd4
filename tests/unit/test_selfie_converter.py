"""MediaPipe selfie segmentation: TFLite reader, converter, PyTorch module, real-photo answers.

The mediapipe wheel is fetched from PyPI into the cache on first use (skipped when PyPI is
unreachable). The parity test against MediaPipe's own interpreter runs only when
MEDIAPIPE_PYTHON names a Python with ``mediapipe==0.10.21`` installed, e.g.
``python3 -m venv /tmp/mpvenv && /tmp/mpvenv/bin/pip install mediapipe==0.10.21``.
"""

from __future__ import annotations

import os
import subprocess
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data

from vision_attribution.networks.selfie import (
    SelfieSegmenter,
    tflite_same_padding,
    upsample_bilinear,
)
from vision_attribution.archives.selfie_tflite import (
    SELFIE_TFLITE_MEMBER,
    TRANSPOSE_CONV_BIAS,
    WEIGHTED_OPS,
    TFLiteGraph,
    WheelDownloadError,
    convert_selfie_graph,
    main,
    notice_path_for,
    read_selfie_tflite,
)

GRAPH_OP_KINDS = {
    "DEQUANTIZE", "CONV_2D", "DEPTHWISE_CONV_2D", "RELU", "HARD_SWISH", "LOGISTIC", "ADD", "MUL",
    "AVERAGE_POOL_2D", "RESIZE_BILINEAR", TRANSPOSE_CONV_BIAS,
}  # fmt: skip


@pytest.fixture(scope="module")
def tflite_bytes() -> bytes:
    try:
        return read_selfie_tflite()
    except WheelDownloadError as error:
        pytest.skip(f"cannot download the mediapipe wheel from PyPI: {error}")


@pytest.fixture(scope="module")
def graph(tflite_bytes) -> TFLiteGraph:
    return TFLiteGraph(tflite_bytes)


@pytest.fixture(scope="module")
def conversion(graph):
    return convert_selfie_graph(graph)


@pytest.fixture(scope="module")
def model(conversion) -> SelfieSegmenter:
    segmenter = SelfieSegmenter()
    segmenter.load_state_dict(conversion.state_dict)
    return segmenter.eval()


def photo_256(name: str) -> np.ndarray:
    """skimage.data photo resized to (256, 256, 3) uint8 RGB."""
    return np.asarray(Image.fromarray(getattr(data, name)()).resize((256, 256), Image.BILINEAR))


def to_input(images: np.ndarray) -> torch.Tensor:
    """(B,256,256,3) uint8 → (B,3,256,256) float in [0,1]."""
    return torch.from_numpy(images.copy()).permute(0, 3, 1, 2).float() / 255


# ----------------------------------------------------------------------------------------------
# (1) the converter consumes the whole graph


def test_every_constant_buffer_is_consumed(graph, conversion):
    assert conversion.used_buffers == graph.constant_buffers()
    assert len(conversion.used_buffers) == 113  # 110 fp16 weights/biases + 3 resize sizes


def test_every_op_is_handled(graph, conversion):
    assert conversion.handled_ops == [op.index for op in graph.ops]
    assert {op.kind for op in graph.ops} == GRAPH_OP_KINDS
    weighted = [op.index for op in graph.ops if op.kind in WEIGHTED_OPS]
    assert sorted(conversion.layer_of_op) == weighted
    assert len(set(conversion.layer_of_op.values())) == len(weighted) == 55


def test_converted_model_matches_graph_interface(graph, conversion):
    (input_index,), (output_index,) = graph.inputs, graph.outputs
    input_tensor, output_tensor = graph.tensors[input_index], graph.tensors[output_index]
    assert input_tensor.shape == (1, 256, 256, 3) and output_tensor.shape == (1, 256, 256, 1)
    assert graph.ops[-1].kind == "LOGISTIC"  # SelfieSegmenter returns the logits before it
    assert sum(v.numel() for v in conversion.state_dict.values()) == 106_401


# ----------------------------------------------------------------------------------------------
# (2) op by op against numpy references of the TFLite semantics (NHWC)


def reference_same_pad(x: np.ndarray, kernel_hw: tuple[int, int], stride: int) -> np.ndarray:
    """TFLite SAME: out = ceil(in/stride), the odd padding row/column at the bottom/right."""
    pads = []
    for size, kernel in zip(x.shape[1:3], kernel_hw):
        total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
        pads.append((total // 2, total - total // 2))
    return np.pad(x, [(0, 0), *pads, (0, 0)])


def reference_conv2d_same(x, weight, bias, stride):
    """CONV_2D: x (1,H,W,I), weight (O,kh,kw,I), bias (O,) → (1,H',W',O)."""
    _, kernel_h, kernel_w, _ = weight.shape
    padded = reference_same_pad(x, (kernel_h, kernel_w), stride)
    out_h, out_w = -(-x.shape[1] // stride), -(-x.shape[2] // stride)
    out = np.zeros((1, out_h, out_w, weight.shape[0]), np.float64) + bias
    for ky in range(kernel_h):
        for kx in range(kernel_w):
            window = padded[:, ky : ky + stride * out_h : stride, kx : kx + stride * out_w : stride]
            out += window @ weight[:, ky, kx, :].T.astype(np.float64)
    return out


def reference_depthwise_conv2d_same(x, weight, bias, stride):
    """DEPTHWISE_CONV_2D (multiplier 1): x (1,H,W,C), weight (1,kh,kw,C) → (1,H',W',C)."""
    _, kernel_h, kernel_w, _ = weight.shape
    padded = reference_same_pad(x, (kernel_h, kernel_w), stride)
    out_h, out_w = -(-x.shape[1] // stride), -(-x.shape[2] // stride)
    out = np.zeros((1, out_h, out_w, x.shape[3]), np.float64) + bias
    for ky in range(kernel_h):
        for kx in range(kernel_w):
            window = padded[:, ky : ky + stride * out_h : stride, kx : kx + stride * out_w : stride]
            out += window * weight[0, ky, kx, :]
    return out


def reference_transpose_conv_bias(x, weight, bias, stride):
    """Convolution2DTransposeBias, no padding: x (1,H,W,I), weight (O,kh,kw,I) → (1,H*s,W*s,O) for k = s."""
    _, kernel_h, kernel_w, _ = weight.shape
    height, width = x.shape[1:3]
    out = np.zeros((1, (height - 1) * stride + kernel_h, (width - 1) * stride + kernel_w, weight.shape[0]))
    for ky in range(kernel_h):
        for kx in range(kernel_w):
            contribution = x.astype(np.float64) @ weight[:, ky, kx, :].T
            out[:, ky : ky + stride * height : stride, kx : kx + stride * width : stride] += contribution
    return out + bias


def reference_resize_bilinear_half_pixel(x, out_hw):
    """RESIZE_BILINEAR, half_pixel_centers: x (1,H,W,C) → (1,*out_hw,C), as TFLite's reference kernel."""

    def sample_points(in_size, out_size):
        scaled = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
        lower = np.maximum(np.floor(scaled), 0).astype(int)
        upper = np.minimum(np.ceil(scaled), in_size - 1).astype(int)
        return scaled, lower, upper

    y, y0, y1 = sample_points(x.shape[1], out_hw[0])
    x_pos, x0, x1 = sample_points(x.shape[2], out_hw[1])
    wy, wx = (y - y0)[:, None, None], (x_pos - x0)[None, :, None]
    top = x[0][y0][:, x0] * (1 - wx) + x[0][y0][:, x1] * wx
    bottom = x[0][y1][:, x0] * (1 - wx) + x[0][y1][:, x1] * wx
    return (top * (1 - wy) + bottom * wy)[None]


def first_op(graph, kind, kernel_hw=None, stride=None):
    """First op of a kind, optionally with a given kernel size and stride."""
    for op in graph.ops:
        if op.kind != kind:
            continue
        weight_shape = graph.tensors[op.inputs[1]].shape if kernel_hw else None
        if kernel_hw and weight_shape[1:3] != kernel_hw:
            continue
        if stride and op.options["stride_h"] != stride:
            continue
        return op
    raise LookupError(kind)


def weights_of(graph, op):
    """fp32 (weight, bias) of a weighted op, read through its DEQUANTIZE producers."""
    producers = {out: candidate for candidate in graph.ops for out in candidate.outputs}
    return [graph.constant(producers[t].inputs[0]).astype(np.float64) for t in op.inputs[1:3]]


@pytest.mark.parametrize(
    "kind, kernel_hw, stride, reference",
    [
        ("CONV_2D", (3, 3), 2, reference_conv2d_same),  # the stem: padding (0, 1)
        ("DEPTHWISE_CONV_2D", (5, 5), 2, reference_depthwise_conv2d_same),  # padding (1, 2)
        ("DEPTHWISE_CONV_2D", (3, 3), 1, reference_depthwise_conv2d_same),
        ("CONV_2D", (1, 1), 1, reference_conv2d_same),
        (TRANSPOSE_CONV_BIAS, None, None, reference_transpose_conv_bias),
    ],
)
def test_weighted_op_matches_numpy_reference(graph, conversion, model, kind, kernel_hw, stride, reference):
    op = first_op(graph, kind, kernel_hw, stride)
    layer = model.get_submodule(conversion.layer_of_op[op.index])
    x = np.random.default_rng(op.index).standard_normal(graph.tensors[op.inputs[0]].shape).astype(np.float32)
    weight, bias = weights_of(graph, op)
    expected = reference(x, weight, bias, op.options["stride_h"])
    assert expected.shape == graph.tensors[op.outputs[0]].shape
    with torch.no_grad():
        actual = layer(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    # float32 rounding only; a wrong padding, layout or stride shows up as an O(scale) error
    np.testing.assert_allclose(actual, expected, atol=1e-5 * np.abs(expected).max(), rtol=0)


def test_tflite_same_padding_is_asymmetric():
    assert tflite_same_padding((256, 256), (3, 3), (2, 2)) == (0, 1, 0, 1)
    assert tflite_same_padding((32, 32), (5, 5), (2, 2)) == (1, 2, 1, 2)
    assert tflite_same_padding((16, 16), (5, 5), (1, 1)) == (2, 2, 2, 2)


def test_resize_bilinear_matches_numpy_reference(graph):
    op = first_op(graph, "RESIZE_BILINEAR")
    assert (op.options["align_corners"], op.options["half_pixel_centers"]) == (False, True)
    x = np.random.default_rng(0).standard_normal((1, 32, 32, 24)).astype(np.float32)
    expected = reference_resize_bilinear_half_pixel(x, (64, 64))
    actual = upsample_bilinear(torch.from_numpy(x).permute(0, 3, 1, 2), (64, 64)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(actual, expected, atol=1e-6)


def test_hard_swish_matches_tflite_formula():
    x = torch.linspace(-5, 5, 101)
    torch.testing.assert_close(F.hardswish(x), x * torch.clamp(x + 3, 0, 6) / 6)


# ----------------------------------------------------------------------------------------------
# (3) known answers on real photos


def test_astronaut_mask_covers_the_person(model):
    with torch.no_grad():
        probability = model.probabilities(to_input(photo_256("astronaut")[None]))[0, 0].numpy()
    assert probability[40:80, 96:128].min() > 0.5  # face
    assert probability[144:216, 48:144].min() > 0.5  # torso
    assert probability[:32, :32].max() < 0.5 and probability[:32, -32:].max() < 0.5  # flag, wall
    assert 0.25 < (probability > 0.5).mean() < 0.8


def test_rocket_photo_has_no_person(model):
    with torch.no_grad():
        probability = model.probabilities(to_input(photo_256("rocket")[None]))[0, 0]
    assert (probability > 0.5).float().mean() < 0.02


def test_logits_are_differentiable_end_to_end(model):
    x = to_input(photo_256("astronaut")[None]).requires_grad_(True)
    logits = model(x)
    assert logits.shape == (1, 1, 256, 256)
    logits[:, :, 40:80, 96:128].sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(model):
    x = to_input(photo_256("astronaut")[None])
    with torch.no_grad():
        cpu = model.probabilities(x)
        gpu = model.cuda().probabilities(x.cuda()).cpu()
    model.cpu()
    assert (gpu - cpu).abs().max() < 1e-4


def test_cli_writes_state_dict_and_notice(tflite_bytes, tmp_path):
    out = tmp_path / "selfie_segmenter.pt"
    main([str(out)])
    SelfieSegmenter().load_state_dict(torch.load(out, weights_only=True))
    notice = notice_path_for(out).read_text()
    assert "Copyright The MediaPipe Authors" in notice and "Apache License, Version 2.0" in notice


# ----------------------------------------------------------------------------------------------
# (4) parity with MediaPipe's own TFLite runtime (XNNPACK) in a separate environment

MEDIAPIPE_SEGMENT_SCRIPT = textwrap.dedent(
    """
    import sys
    import mediapipe as mp
    import numpy as np
    from mediapipe.tasks.python import BaseOptions, vision

    model_path, images_path, masks_path = sys.argv[1:4]
    options = vision.ImageSegmenterOptions(
        base_options=BaseOptions(model_asset_path=model_path),
        output_confidence_masks=True, output_category_mask=False)
    with vision.ImageSegmenter.create_from_options(options) as segmenter:
        masks = [segmenter.segment(mp.Image(image_format=mp.ImageFormat.SRGB, data=image))
                 .confidence_masks[0].numpy_view().copy() for image in np.load(images_path)]
    np.save(masks_path, np.stack(masks))
    """
)


@pytest.mark.skipif(
    not os.environ.get("MEDIAPIPE_PYTHON"),
    reason="set MEDIAPIPE_PYTHON to a python with mediapipe==0.10.21 to compare with MediaPipe",
)
def test_probabilities_match_mediapipe_runtime(model, tflite_bytes, tmp_path):
    images = np.stack([photo_256(name) for name in ("astronaut", "coffee", "chelsea")])
    model_path = tmp_path / os.path.basename(SELFIE_TFLITE_MEMBER)
    model_path.write_bytes(tflite_bytes)
    np.save(tmp_path / "images.npy", images)
    subprocess.run(
        [os.environ["MEDIAPIPE_PYTHON"], "-c", MEDIAPIPE_SEGMENT_SCRIPT,
         str(model_path), str(tmp_path / "images.npy"), str(tmp_path / "masks.npy")],
        check=True, capture_output=True,
    )  # fmt: skip
    mediapipe_masks = np.load(tmp_path / "masks.npy")
    with torch.no_grad():
        torch_masks = model.probabilities(to_input(images))[:, 0].numpy()
    assert mediapipe_masks.shape == torch_masks.shape == (3, 256, 256)
    assert np.abs(torch_masks - mediapipe_masks).max() < 1e-4

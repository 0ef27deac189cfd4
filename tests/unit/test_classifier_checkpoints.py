"""Checkpoint compatibility of the BiT and LaNet classifiers.

The key names and shapes of the published checkpoints are enumerated here from the original code
(google-research/big_transfer bit_pytorch/models.py; facebookresearch/LaMCTS LaNAS/LaNet/CIFAR10
model.py, operations.py, nasnet_set.py), independently of the project's modules, and filled with
random values: no real weights exist offline.
"""

import math
import re

import pytest
import torch

from vision_attribution.networks.bit import load_bit
from vision_attribution.networks.lanet import LANET_NET_ENCODING, decode_lanet_encoding, load_lanet

CIFAR_CLASSES = 10
BIT_R50_UNITS = (3, 4, 6, 3)
BIT_R101_UNITS = (3, 4, 23, 3)
BIT_S_R101X3_PARAMETERS = 381_851_338
LANET_C128_L24_PARAMETERS = 45_256_340

# LaNet's net=[...] decoded by hand with nasnet_set.gen_code_from_list + translator (7 nodes: ops in
# net[:14], inputs in net[14:], operations = [sep_conv_3x3, max_pool_3x3, skip_connect, sep_conv_5x5]).
LANET_CELL_EDGES = [
    ("skip_connect", 0), ("skip_connect", 1),
    ("sep_conv_3x3", 1), ("skip_connect", 1),
    ("max_pool_3x3", 2), ("skip_connect", 1),
    ("sep_conv_3x3", 1), ("skip_connect", 0),
    ("skip_connect", 3), ("sep_conv_5x5", 4),
    ("skip_connect", 3), ("max_pool_3x3", 0),
    ("skip_connect", 3), ("sep_conv_3x3", 1),
]
LANET_CELL_CONCAT = [5, 6, 7, 8]


def bit_checkpoint_shapes(block_units, width_factor, num_classes):
    """Key -> shape of a bit_pytorch ResNetV2 state dict."""
    shapes = {"root.conv.weight": (64 * width_factor, 3, 7, 7)}
    in_channels = 64 * width_factor
    for block, unit_count in enumerate(block_units, start=1):
        mid = 64 * width_factor * 2 ** (block - 1)
        out = 4 * mid
        for unit in range(1, unit_count + 1):
            prefix = f"body.block{block}.unit{unit:02d}."
            unit_in = in_channels if unit == 1 else out
            shapes.update({
                prefix + "gn1.weight": (unit_in,), prefix + "gn1.bias": (unit_in,),
                prefix + "conv1.weight": (mid, unit_in, 1, 1),
                prefix + "gn2.weight": (mid,), prefix + "gn2.bias": (mid,),
                prefix + "conv2.weight": (mid, mid, 3, 3),
                prefix + "gn3.weight": (mid,), prefix + "gn3.bias": (mid,),
                prefix + "conv3.weight": (out, mid, 1, 1),
            })
            if unit == 1:
                shapes[prefix + "downsample.weight"] = (out, unit_in, 1, 1)
        in_channels = out
    shapes.update({
        "head.gn.weight": (in_channels,), "head.gn.bias": (in_channels,),
        "head.conv.weight": (num_classes, in_channels, 1, 1), "head.conv.bias": (num_classes,),
    })
    return shapes


def _batch_norm_shapes(prefix, channels):
    return {prefix + "weight": (channels,), prefix + "bias": (channels,), prefix + "running_mean": (channels,),
            prefix + "running_var": (channels,), prefix + "num_batches_tracked": ()}


def _factorized_reduce_shapes(prefix, in_channels, out_channels):
    return {prefix + "conv_1.weight": (out_channels // 2, in_channels, 1, 1),
            prefix + "conv_2.weight": (out_channels // 2, in_channels, 1, 1),
            **_batch_norm_shapes(prefix + "bn.", out_channels)}


def _relu_conv_bn_shapes(prefix, in_channels, out_channels):
    return {prefix + "op.1.weight": (out_channels, in_channels, 1, 1), **_batch_norm_shapes(prefix + "op.2.", out_channels)}


def _sep_conv_shapes(prefix, channels, kernel):
    return {prefix + "op.1.weight": (channels, 1, kernel, kernel), prefix + "op.2.weight": (channels, channels, 1, 1),
            **_batch_norm_shapes(prefix + "op.3.", channels),
            prefix + "op.5.weight": (channels, 1, kernel, kernel), prefix + "op.6.weight": (channels, channels, 1, 1),
            **_batch_norm_shapes(prefix + "op.7.", channels)}


def lanet_checkpoint_shapes(C, layers, auxiliary, num_classes):
    """Key -> shape of LaNet's NetworkCIFAR state dict with the searched LaNet cell."""
    shapes = {"stem.0.weight": (3 * C, 3, 3, 3), **_batch_norm_shapes("stem.1.", 3 * C)}
    prev_prev, prev, channels = 3 * C, 3 * C, C
    reduction_prev = False
    for index in range(layers):
        reduction = index in (layers // 3, 2 * layers // 3)
        channels *= 2 if reduction else 1
        prefix = f"cells.{index}."
        if reduction_prev:
            shapes.update(_factorized_reduce_shapes(prefix + "preprocess0.", prev_prev, channels))
        else:
            shapes.update(_relu_conv_bn_shapes(prefix + "preprocess0.", prev_prev, channels))
        shapes.update(_relu_conv_bn_shapes(prefix + "preprocess1.", prev, channels))
        for edge, (name, input_state) in enumerate(LANET_CELL_EDGES):
            edge_prefix = f"{prefix}_ops.{edge}."
            if name.startswith("sep_conv"):
                shapes.update(_sep_conv_shapes(edge_prefix, channels, int(name[-1])))
            elif name == "skip_connect" and reduction and input_state < 2:
                shapes.update(_factorized_reduce_shapes(edge_prefix, channels, channels))
        prev_prev, prev = prev, len(LANET_CELL_CONCAT) * channels
        reduction_prev = reduction
        if index == 2 * layers // 3:
            auxiliary_channels = prev
    if auxiliary:
        shapes.update({"auxiliary_head.features.2.weight": (128, auxiliary_channels, 1, 1),
                       **_batch_norm_shapes("auxiliary_head.features.3.", 128),
                       "auxiliary_head.features.5.weight": (768, 128, 2, 2),
                       **_batch_norm_shapes("auxiliary_head.features.6.", 768),
                       "auxiliary_head.classifier.weight": (num_classes, 768),
                       "auxiliary_head.classifier.bias": (num_classes,)})
    shapes.update({"classifier.weight": (num_classes, prev), "classifier.bias": (num_classes,)})
    return shapes


def standardised_conv_gain(shapes, running_var_key):
    """Variance gain of the LaNet weight-standardised 1x1 conv feeding a BatchNorm (``op.{k-1}`` before ``op.{k}``).

    Unit-variance kernels multiply the variance of ReLU'd unit inputs by fan_in / 2; plain convs (He-scaled
    random kernels here) and BatchNorms fed by no conv have gain 1.
    """
    match = re.fullmatch(r"(.*\.op\.)(\d+)\.running_var", running_var_key)
    conv_shape = shapes.get(f"{match.group(1)}{int(match.group(2)) - 1}.weight") if match else None
    return conv_shape[1] / 2 if conv_shape is not None and conv_shape[2:] == (1, 1) else 1.0


def random_state_dict(shapes, seed, dtype=torch.float32):
    """Random values: He-scaled kernels, norm scales near 1, running variances scaled by the gain of the
    weight-standardised conv feeding each BatchNorm (without it the 24-cell LaNet overflows float32).
    """
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state_dict[key] = torch.tensor(1000, dtype=torch.long)
        elif key.endswith("running_var"):
            gain = standardised_conv_gain(shapes, key)
            state_dict[key] = (gain * (torch.rand(shape, generator=generator) + 0.5)).to(dtype)
        elif len(shape) == 1:
            centre = 1.0 if key.endswith("weight") else 0.0
            state_dict[key] = (centre + 0.1 * torch.randn(shape, generator=generator)).to(dtype)
        else:
            fan_in = math.prod(shape[1:])
            state_dict[key] = (torch.randn(shape, generator=generator) * math.sqrt(2.0 / fan_in)).to(dtype)
    return state_dict


def with_data_parallel_prefix(state_dict):
    return {"module." + key: value for key, value in state_dict.items()}


def assert_loaded_exactly(model, expected_shapes):
    loaded = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert loaded == expected_shapes
    assert not model.training
    assert all(not parameter.requires_grad and parameter.dtype == torch.float32 for parameter in model.parameters())


def classify(model, images):
    """Logits of either model: LaNet returns (logits, aux)."""
    output = model(images)
    return output[0] if isinstance(output, tuple) else output


def assert_finite_deterministic_logits(model, images):
    """Two eval forwards agree bit for bit; returns the (B,10) logits."""
    with torch.no_grad():
        first, second = classify(model, images), classify(model, images)
    assert first.shape == (images.shape[0], CIFAR_CLASSES)
    assert torch.isfinite(first).all()
    assert torch.equal(first, second)
    return first


def assert_input_gradient_flows(model, images):
    images = images.clone().requires_grad_(True)
    classify(model, images)[:, 3].sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


@pytest.fixture
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))


@pytest.mark.slow
def test_bit_s_r101x3_full_size_with_and_without_module_prefix(tmp_path, images):
    """Full-size key layout; float16 values (cast to float32 on load) halve the 1.5 GB checkpoint I/O."""
    shapes = bit_checkpoint_shapes(BIT_R101_UNITS, 3, CIFAR_CLASSES)
    assert sum(math.prod(shape) for shape in shapes.values()) == BIT_S_R101X3_PARAMETERS
    state_dict = random_state_dict(shapes, seed=0, dtype=torch.float16)
    path = tmp_path / "bit.pth.tar"
    torch.save({"step": 500, "model": with_data_parallel_prefix(state_dict)}, path)  # bit_pytorch train.py layout

    model = load_bit(path)
    assert model.variant_name == "R101x3"
    assert_loaded_exactly(model, shapes)
    prefixed_logits = assert_finite_deterministic_logits(model, images)
    del model

    unprefixed = load_bit(state_dict)
    assert_loaded_exactly(unprefixed, shapes)
    with torch.no_grad():
        assert torch.equal(unprefixed(images), prefixed_logits)


@pytest.mark.parametrize("prefixed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bit_r50x1_from_file(tmp_path, images, prefixed, dtype):
    shapes = bit_checkpoint_shapes(BIT_R50_UNITS, 1, CIFAR_CLASSES)
    state_dict = random_state_dict(shapes, seed=1, dtype=dtype)
    path = tmp_path / "bit_r50x1.pth"
    torch.save(with_data_parallel_prefix(state_dict) if prefixed else state_dict, path)

    model = load_bit(path)
    assert model.variant_name == "R50x1"
    assert_loaded_exactly(model, shapes)
    assert_finite_deterministic_logits(model, images)
    assert_input_gradient_flows(model, images)


def test_bit_refuses_renamed_and_misshaped_keys():
    state_dict = random_state_dict(bit_checkpoint_shapes(BIT_R50_UNITS, 1, CIFAR_CLASSES), seed=2)
    renamed = dict(state_dict)
    renamed["body.block2.unit01.downsample.conv.weight"] = renamed.pop("body.block2.unit01.downsample.weight")
    with pytest.raises(ValueError, match=r"missing keys \['body\.block2\.unit01\.downsample\.weight'\]") as error:
        load_bit(renamed)
    assert "body.block2.unit01.downsample.conv.weight" in str(error.value)

    misshaped = dict(state_dict, **{"head.conv.bias": torch.zeros(CIFAR_CLASSES + 1)})
    with pytest.raises(ValueError, match=r"head\.conv\.bias"):
        load_bit(misshaped)


def test_lanet_encoding_decodes_to_the_searched_cell():
    genotype = decode_lanet_encoding(LANET_NET_ENCODING)
    assert genotype.normal == LANET_CELL_EDGES and genotype.reduce == LANET_CELL_EDGES
    assert genotype.normal_concat == LANET_CELL_CONCAT and genotype.reduce_concat == LANET_CELL_CONCAT


@pytest.mark.slow
def test_lanet_c128_layers24_full_size(tmp_path, images):
    shapes = lanet_checkpoint_shapes(128, 24, auxiliary=True, num_classes=CIFAR_CLASSES)
    parameter_count = sum(math.prod(shape) for key, shape in shapes.items()
                          if not key.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert parameter_count == LANET_C128_L24_PARAMETERS
    path = tmp_path / "top1.pt"
    torch.save({"epoch": 1499, "model_state_dict": with_data_parallel_prefix(random_state_dict(shapes, seed=3))}, path)

    model = load_lanet(path)
    assert_loaded_exactly(model, shapes)
    assert_finite_deterministic_logits(model, images)
    with torch.no_grad():
        assert model(images)[1] is None  # eval mode: the auxiliary head does not run


@pytest.mark.parametrize("auxiliary", [True, False])
def test_lanet_small_variant_from_bare_state_dict(tmp_path, images, auxiliary):
    shapes = lanet_checkpoint_shapes(16, 8, auxiliary=auxiliary, num_classes=CIFAR_CLASSES)
    path = tmp_path / "lanet_small.pt"
    torch.save(random_state_dict(shapes, seed=4), path)

    model = load_lanet(path)
    assert_loaded_exactly(model, shapes)
    assert_finite_deterministic_logits(model, images)
    assert_input_gradient_flows(model, images)


def test_lanet_refuses_missing_key():
    state_dict = random_state_dict(lanet_checkpoint_shapes(16, 8, auxiliary=True, num_classes=CIFAR_CLASSES), seed=5)
    del state_dict["cells.3._ops.2.op.6.weight"]
    with pytest.raises(ValueError, match=r"missing keys \['cells\.3\._ops\.2\.op\.6\.weight'\]"):
        load_lanet({"model_state_dict": state_dict})

"""TensorMask checkpoints in detectron2's exact key layout load with no missing/unexpected keys.

The key names and shapes below are enumerated from detectron2's model definition
(build_retinanet_resnet_fpn_backbone with ResNet-50, FrozenBN, STRIDE_IN_1X1; FPN over
res2..res5 with LastLevelP6P7 on res5; TensorMaskHead with 4 convs per tower, anchors
[[44, 60], ...] -> mask sizes 11 and 15, ALIGNED_ON and BIPYRAMID_ON), independently of the
project's model code.
"""
import os
import pickle
import pickletools

import numpy as np
import pytest
import torch

from vision_attribution.networks.tensormask import (
    CheckpointError,
    TensorMask,
    UnsafePickleError,
    load_tensormask,
    load_tensormask_weights,
)


def _frozen_bn(prefix, channels):
    return {f"{prefix}.norm.{buf}": (channels,)
            for buf in ("weight", "bias", "running_mean", "running_var")}


def detectron2_tensormask_r50_keys():
    """{name: shape} of detectron2's TensorMask R50-FPN state dict."""
    keys = {"backbone.bottom_up.stem.conv1.weight": (64, 3, 7, 7)}
    keys.update(_frozen_bn("backbone.bottom_up.stem.conv1", 64))
    in_channels = 64
    for stage, (num_blocks, bottleneck, out_channels) in enumerate(
            [(3, 64, 256), (4, 128, 512), (6, 256, 1024), (3, 512, 2048)], start=2):
        for block in range(num_blocks):
            prefix = f"backbone.bottom_up.res{stage}.{block}"
            if block == 0:
                keys[f"{prefix}.shortcut.weight"] = (out_channels, in_channels, 1, 1)
                keys.update(_frozen_bn(f"{prefix}.shortcut", out_channels))
            keys[f"{prefix}.conv1.weight"] = (bottleneck, in_channels, 1, 1)
            keys.update(_frozen_bn(f"{prefix}.conv1", bottleneck))
            keys[f"{prefix}.conv2.weight"] = (bottleneck, bottleneck, 3, 3)
            keys.update(_frozen_bn(f"{prefix}.conv2", bottleneck))
            keys[f"{prefix}.conv3.weight"] = (out_channels, bottleneck, 1, 1)
            keys.update(_frozen_bn(f"{prefix}.conv3", out_channels))
            in_channels = out_channels
    for stage, channels in zip(range(2, 6), (256, 512, 1024, 2048)):
        keys[f"backbone.fpn_lateral{stage}.weight"] = (256, channels, 1, 1)
        keys[f"backbone.fpn_lateral{stage}.bias"] = (256,)
        keys[f"backbone.fpn_output{stage}.weight"] = (256, 256, 3, 3)
        keys[f"backbone.fpn_output{stage}.bias"] = (256,)
    keys["backbone.top_block.p6.weight"] = (256, 2048, 3, 3)
    keys["backbone.top_block.p6.bias"] = (256,)
    keys["backbone.top_block.p7.weight"] = (256, 256, 3, 3)
    keys["backbone.top_block.p7.bias"] = (256,)
    for tower, channels in (("cls_subnet", 256), ("bbox_subnet", 128), ("mask_subnet", 128)):
        in_channels = 256
        for index in (0, 2, 4, 6):
            keys[f"head.{tower}.{index}.weight"] = (channels, in_channels, 3, 3)
            keys[f"head.{tower}.{index}.bias"] = (channels,)
            in_channels = channels
    keys["head.cls_score.weight"] = (2 * 80, 256, 3, 3)
    keys["head.cls_score.bias"] = (2 * 80,)
    keys["head.bbox_pred.weight"] = (2 * 4, 128, 3, 3)
    keys["head.bbox_pred.bias"] = (2 * 4,)
    for size in (11, 15):
        keys[f"head.mask_pred_{size}.weight"] = (size * size, 128, 1, 1)
        keys[f"head.mask_pred_{size}.bias"] = (size * size,)
    keys["head.mask_fuse.0.weight"] = (128, 128, 3, 3)
    keys["head.mask_fuse.0.bias"] = (128,)
    return keys


@pytest.fixture(scope="module")
def random_weights():
    rng = np.random.default_rng(0)
    return {name: rng.standard_normal(shape, dtype=np.float32)
            for name, shape in detectron2_tensormask_r50_keys().items()}


@pytest.fixture(scope="module")
def model():
    return TensorMask()


def _write_model_zoo_pkl(path, weights):
    with open(path, "wb") as f:
        pickle.dump({"model": weights, "__author__": "Detectron2 Model Zoo"}, f)


def _assert_loaded(model, weights):
    state = model.state_dict()
    for name in ("backbone.bottom_up.res4.5.conv2.norm.running_var", "head.mask_pred_15.weight",
                 "backbone.top_block.p6.weight", "head.cls_score.bias"):
        np.testing.assert_array_equal(state[name].numpy(), weights[name])


def test_key_layout_matches_detectron2(model):
    expected = detectron2_tensormask_r50_keys()
    state = model.state_dict()
    assert sorted(state) == sorted(expected)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected


def test_model_zoo_pkl_loads(tmp_path, random_weights, model):
    path = tmp_path / "model_final.pkl"
    _write_model_zoo_pkl(path, random_weights)
    report = load_tensormask_weights(model, str(path))
    assert report.missing == [] and report.unexpected == [] and report.ignored == []
    _assert_loaded(model, random_weights)


def test_pkl_with_old_cell_anchor_buffers_loads(tmp_path, random_weights, model):
    weights = dict(random_weights)
    for level in range(6):
        weights[f"anchor_generator.cell_anchors.{level}"] = np.zeros((2, 4), np.float32)
    path = tmp_path / "old.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": weights, "__author__": "Detectron2 Model Zoo"}, f, protocol=2)
    report = load_tensormask_weights(model, str(path))
    assert report.unexpected == [] and len(report.ignored) == 6


def as_written_by_numpy_1(data: bytes) -> bytes:
    """A pickle written by numpy 2 rewritten with numpy 1's module names (numpy.core.*), as numpy 1 writes
    them; frames are dropped (they are optional) so that the renamed strings need no frame lengths."""
    ops = list(pickletools.genops(data))
    out = bytearray()
    for index, (op, argument, position) in enumerate(ops):
        end = ops[index + 1][2] if index + 1 < len(ops) else len(data)
        if op.name == "FRAME":
            continue
        if op.name == "SHORT_BINUNICODE" and argument.startswith("numpy._core"):
            renamed = argument.replace("numpy._core", "numpy.core").encode()
            out += b"\x8c" + bytes([len(renamed)]) + renamed
        elif op.name == "GLOBAL" and argument.startswith("numpy._core"):
            module, name = argument.split(" ")
            out += b"c" + module.replace("numpy._core", "numpy.core").encode() + b"\n" + name.encode() + b"\n"
        else:
            out += data[position:end]
    return bytes(out)


@pytest.mark.parametrize("numpy_names", ["numpy 2", "numpy 1"])
@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_pickles_of_numpy_1_and_2_at_every_protocol_load(tmp_path, random_weights, model, protocol, numpy_names):
    data = pickle.dumps({"model": random_weights, "__author__": "Detectron2 Model Zoo"}, protocol=protocol)
    if numpy_names == "numpy 1":
        data = as_written_by_numpy_1(data)
        assert b"numpy._core" not in data and b"numpy.core" in data
    path = tmp_path / "model_final.pkl"
    path.write_bytes(data)
    report = load_tensormask_weights(model, str(path))
    assert report.missing == [] and report.unexpected == []
    _assert_loaded(model, random_weights)


@pytest.mark.parametrize("wrapped", [True, False])
def test_pth_loads(tmp_path, random_weights, wrapped):
    tensors = {name: torch.from_numpy(array) for name, array in random_weights.items()}
    path = tmp_path / "model_final.pth"
    torch.save({"model": tensors, "iteration": 5} if wrapped else tensors, path)
    model = load_tensormask(str(path))
    assert not model.training
    _assert_loaded(model, random_weights)


def test_missing_key_is_a_clear_error(tmp_path, random_weights, model):
    weights = dict(random_weights)
    del weights["head.mask_fuse.0.weight"]
    path = tmp_path / "partial.pkl"
    _write_model_zoo_pkl(path, weights)
    with pytest.raises(CheckpointError, match="head.mask_fuse.0.weight"):
        load_tensormask_weights(model, str(path))


def test_wrong_shape_is_a_clear_error(tmp_path, random_weights, model):
    weights = dict(random_weights)
    weights["head.cls_score.bias"] = np.zeros(81, np.float32)
    path = tmp_path / "wrong.pkl"
    _write_model_zoo_pkl(path, weights)
    with pytest.raises(CheckpointError, match="head.cls_score.bias"):
        load_tensormask_weights(model, str(path))


class _RunsShellCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path, model):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"x": _RunsShellCommand(marker)}, "__author__": "x"}, f)
    with pytest.raises(UnsafePickleError):
        load_tensormask_weights(model, str(path))
    assert not marker.exists()
    with pytest.raises(UnsafePickleError):
        load_tensormask(str(path))
    assert not marker.exists()


def test_malicious_pth_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": _RunsShellCommand(marker)}}, path)
    with pytest.raises(ValueError, match="not unpickled"):
        load_tensormask(str(path))
    assert not marker.exists()

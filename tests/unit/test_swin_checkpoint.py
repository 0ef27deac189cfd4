"""The swin archive's checkpoints: the seed fork's (mmdet 2.11) layout, written by the tests with the fork's own key
names, converts to mmdet 3 and loads strictly; damaged or unsafe checkpoints are refused when the archive is built."""
import subprocess

import pytest
import torch

from checkpoint_files import SWIN_T, random_swin_fork_state_dict, swin_fork_key_shapes, write_swin_fork_checkpoint
from torchserve_harness import REPO
from vision_attribution.archives.build import BuildError, stage_archive
from vision_attribution.formats.class_names import COCO_CLASSES
from vision_attribution.networks.swin import DEFAULT_CONFIG, fork_to_mmdet3, merging_columns_to_mmdet3, read_swin_checkpoint

SEED_FILE_NAME = "cascade_mask_rcnn_swin_tiny_patch4_window7.pth"  # the fork's released Swin-T weights


@pytest.fixture(scope="module")
def fork_state():
    return random_swin_fork_state_dict()


@pytest.fixture(scope="module")
def fork_checkpoint(tmp_path_factory, fork_state):
    return write_swin_fork_checkpoint(tmp_path_factory.mktemp("swin-checkpoint") / SEED_FILE_NAME, fork_state)


def test_fork_checkpoint_converts_to_every_mmdet3_key(fork_checkpoint):
    from vision_attribution.networks.swin.detector import build_model, load_cascade, read_config

    assert len(swin_fork_key_shapes()) == 337 and sum(key.startswith("backbone.") for key in swin_fork_key_shapes()) == 189
    state, class_names = read_swin_checkpoint(fork_checkpoint)
    cfg = read_config(DEFAULT_CONFIG)
    untrained = build_model(cfg).state_dict()
    assert sorted(set(untrained) - set(state)) == [] and sorted(set(state) - set(untrained)) == []  # missing, unexpected
    assert [key for key in state if state[key].shape != untrained[key].shape] == []
    assert class_names == list(COCO_CLASSES)
    # the fork's relative-position buffers hold the same index mmdet 3 computes for its windows
    index_key = "backbone.stages.2.blocks.5.attn.w_msa.relative_position_index"
    assert torch.equal(state[index_key], untrained[index_key])
    detector = load_cascade(cfg, state, torch.device("cpu"))  # strict: raises on any missing, unexpected or mis-shaped key
    loaded = detector.model.state_dict()
    assert torch.equal(loaded["backbone.stages.0.blocks.1.ffn.layers.1.weight"], state["backbone.stages.0.blocks.1.ffn.layers.1.weight"])


def test_mmdet3_checkpoint_loads_as_it_is_with_its_class_names(fork_state, tmp_path):
    """What mmengine's runner saves: {'meta': {'dataset_meta': {'classes': ...}}, 'state_dict': mmdet 3 names}."""
    converted = fork_to_mmdet3(fork_state)
    names = [f"part {index}" for index in range(80)]
    checkpoint = tmp_path / "epoch_12.pth"
    torch.save({"meta": {"dataset_meta": {"classes": tuple(names)}, "epoch": 12}, "state_dict": converted}, checkpoint)
    state, class_names = read_swin_checkpoint(checkpoint)
    assert class_names == names and state.keys() == converted.keys()
    assert all(torch.equal(state[key], converted[key]) for key in converted)


def test_patch_merging_channels_are_reordered_as_the_fork_merges_them(fork_state):
    """The fork's PatchMerging (2x2 pixels concatenated in the order (0,0), (1,0), (0,1), (1,1), LayerNorm, Linear) and
    mmdet 3's (unfolded) give the same output once the converter has reordered the weights."""
    from mmdet.models.layers import PatchMerging

    dim = SWIN_T["embed_dim"]
    reduction, norm_weight, norm_bias = (fork_state[f"backbone.layers.0.downsample.{name}"] for name in ("reduction.weight", "norm.weight", "norm.bias"))
    features = torch.randn(2, 10, 14, dim)
    pixels = [features[:, 0::2, 0::2], features[:, 1::2, 0::2], features[:, 0::2, 1::2], features[:, 1::2, 1::2]]
    merged = torch.cat(pixels, dim=-1)
    fork_output = torch.nn.functional.layer_norm(merged, (4 * dim,), norm_weight, norm_bias) @ reduction.T
    merging = PatchMerging(in_channels=dim, out_channels=2 * dim, norm_cfg=dict(type="LN"), init_cfg=None)
    converted = {"reduction.weight": merging_columns_to_mmdet3(reduction), "norm.weight": merging_columns_to_mmdet3(norm_weight),
                 "norm.bias": merging_columns_to_mmdet3(norm_bias)}  # fmt: skip
    merging.load_state_dict(converted)
    output, size = merging(features.reshape(2, 10 * 14, dim), (10, 14))
    assert size == (5, 7)
    torch.testing.assert_close(output.reshape(2, 5, 7, 2 * dim), fork_output, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_truncated_checkpoint_is_refused_by_archive_sh(fork_checkpoint, tmp_path):
    truncated = tmp_path / SEED_FILE_NAME
    with open(fork_checkpoint, "rb") as source:
        truncated.write_bytes(source.read(1 << 20))
    done = subprocess.run([str(REPO / "archive.sh"), "swin", "--checkpoint", str(truncated), "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert "cannot be served by the swin archive" in done.stderr and "not a readable PyTorch checkpoint" in done.stderr
    assert not (tmp_path / "swin.mar").exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda state: state.pop("roi_head.bbox_head.2.fc_cls.weight"), "missing keys ['roi_head.bbox_head.2.fc_cls.weight']"),
        (lambda state: state.update({"roi_head.mask_head.1.conv_logits.bias": torch.zeros(90)}), "size mismatch for roi_head.mask_head.1.conv_logits.bias"),
    ],
)
def test_damaged_checkpoint_is_refused_at_archive_time(fork_state, tmp_path, damage, message):
    state = dict(fork_state)
    damage(state)
    checkpoint = write_swin_fork_checkpoint(tmp_path / SEED_FILE_NAME, state)
    with pytest.raises(BuildError, match="cannot be served by the swin archive") as refused:
        stage_archive("swin", tmp_path, {}, checkpoint, None, trust=False)
    assert message in str(refused.value)


def test_checkpoint_with_pickled_objects_needs_trust(fork_state, tmp_path):
    """mmcv 1.x runners may store numpy values in meta (hook_msgs); such a file is not unpickled unless trusted."""
    import numpy as np

    checkpoint = tmp_path / SEED_FILE_NAME
    torch.save({"meta": {"hook_msgs": {"best_score": np.float64(0.5)}}, "state_dict": fork_state}, checkpoint)
    with pytest.raises(BuildError, match="--trust-checkpoint"):
        stage_archive("swin", tmp_path, {}, checkpoint, None, trust=False)
    files = stage_archive("swin", tmp_path, {}, checkpoint, None, trust=True)
    assert {path.name for path in files} == {"archive.json", "swin_config.py", "class_names.json"}

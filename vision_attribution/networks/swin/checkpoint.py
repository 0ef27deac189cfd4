"""Swin Cascade Mask R-CNN checkpoints: the seed fork's (mmdet 2.11) key layout converted to mmdet 3's.

The seed's weights come from Swin-Transformer-Object-Detection, a fork of mmdet 2.11, whose Swin backbone names
and orders some parameters differently from mmdet 3's SwinTransformer (the rules mmdet documents in its
tools/model_converters/swinv1_to_mmdet.py):

  backbone.layers.S.blocks.B.attn.*              -> backbone.stages.S.blocks.B.attn.w_msa.*
  backbone.layers.S.blocks.B.mlp.fc1.*           -> backbone.stages.S.blocks.B.ffn.layers.0.0.*
  backbone.layers.S.blocks.B.mlp.fc2.*           -> backbone.stages.S.blocks.B.ffn.layers.1.*
  backbone.layers.S.downsample.{reduction,norm}  -> backbone.stages.S.downsample.*, channels reordered (below)
  backbone.patch_embed.proj.*                    -> backbone.patch_embed.projection.*

The fork's patch merging concatenates the four pixels of each 2x2 patch as channel blocks in the order
(row, col) = (0,0), (1,0), (0,1), (1,1); mmdet 3 unfolds them channel by channel with the pixel innermost in the
order (0,0), (0,1), (1,0), (1,1). The reduction's input columns and the norm's channels are permuted to match.
Everything else (neck, RPN, RoI heads) has the same names in both. No mmdet import is needed here.
"""
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from ..checkpoints import load_torch_file, read_state_dict

FORK_BACKBONE_PREFIX = "backbone.layers."
MMDET3_BACKBONE_PREFIX = "backbone.stages."
_BLOCK_RENAMES = (("attn.", "attn.w_msa."), ("mlp.fc1.", "ffn.layers.0.0."), ("mlp.fc2.", "ffn.layers.1."))
_FORK_BLOCK_OF_UNFOLD_POSITION = [0, 2, 1, 3]
"""For mmdet 3's unfold position p = 2 * row + col of a 2x2 patch, the fork's channel block holding that pixel."""


def merging_columns_to_mmdet3(weight: torch.Tensor) -> torch.Tensor:
    """Patch-merging tensor (..., 4C) from the fork's block order [pixel][channel] to mmdet 3's [channel][pixel]."""
    blocks = weight.reshape(*weight.shape[:-1], 4, weight.shape[-1] // 4)[..., _FORK_BLOCK_OF_UNFOLD_POSITION, :]
    return blocks.transpose(-1, -2).reshape(weight.shape).contiguous()


def is_fork_layout(state_dict: Mapping[str, Any]) -> bool:
    return any(key.startswith(FORK_BACKBONE_PREFIX) for key in state_dict)


def fork_to_mmdet3(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fork's (mmdet 2.11) Cascade Mask R-CNN Swin state dict under mmdet 3's names and channel orders."""
    converted = {}
    for key, value in state_dict.items():
        if key.startswith(FORK_BACKBONE_PREFIX):
            key = MMDET3_BACKBONE_PREFIX + key[len(FORK_BACKBONE_PREFIX):]
            if ".blocks." in key:
                for old, new in _BLOCK_RENAMES:
                    key = key.replace(f".{old}", f".{new}", 1)
            elif ".downsample.reduction." in key or ".downsample.norm." in key:
                value = merging_columns_to_mmdet3(value)
        elif key.startswith("backbone.patch_embed.proj."):
            key = key.replace("backbone.patch_embed.proj.", "backbone.patch_embed.projection.", 1)
        converted[key] = value
    return converted


def class_names_from_meta(checkpoint: Mapping[str, Any]) -> Optional[list[str]]:
    """The class names a checkpoint records: mmdet 2's meta.CLASSES or mmdet 3's meta.dataset_meta.classes."""
    meta = checkpoint.get("meta")
    if not isinstance(meta, Mapping):
        return None
    names = meta.get("CLASSES")
    if names is None and isinstance(meta.get("dataset_meta"), Mapping):
        names = meta["dataset_meta"].get("classes")
    if names is None:
        return None
    if isinstance(names, str) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"the checkpoint's meta class names are not a list of strings: {names!r:.200}")
    return list(names)


def read_swin_checkpoint(path: str | Path, trust: bool = False) -> tuple[dict[str, torch.Tensor], Optional[list[str]]]:
    """A fork (mmdet 2.11) or mmdet 3 checkpoint file -> (state dict under mmdet 3's names, class names from its meta).

    Accepts {'meta', 'state_dict', ...} as mmcv/mmengine runners save it, or a bare state dict; read with
    torch.load(weights_only=True) unless `trust`.
    """
    checkpoint = load_torch_file(path, trust)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{Path(path).name}: an mmdet checkpoint is a dict, this file holds a {type(checkpoint).__name__}")
    state_dict = read_state_dict(checkpoint, ("state_dict",), "Swin Cascade Mask R-CNN")
    if is_fork_layout(state_dict):
        state_dict = fork_to_mmdet3(state_dict)
    return state_dict, class_names_from_meta(checkpoint)

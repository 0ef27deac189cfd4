"""Reading checkpoints whatever their file name, and loading state dicts strictly; shared by the networks.

The format is told from the file's first bytes, never from its suffix: a torch.save zip ("PK"), a legacy
torch.save pickle (its magic number first), or a plain pickle (detectron2's .pkl). torch files load with
weights_only=True unless the caller trusts the file.
"""
import os
import pickle
from pathlib import Path
from typing import Mapping, Sequence

import torch

DATA_PARALLEL_PREFIX = "module."
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."  # pickle protocol 2 of torch's magic number


def checkpoint_format(path: str | os.PathLike) -> str:
    """"torch" (torch.save, zip or legacy) or "pickle" (any other pickle); ValueError for anything else."""
    with open(path, "rb") as stream:
        head = stream.read(len(_LEGACY_TORCH_MAGIC))
    if head.startswith(_ZIP_MAGIC) or head.startswith(_LEGACY_TORCH_MAGIC):
        return "torch"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # PROTO opcode, protocols 2-5
        return "pickle"
    raise ValueError(f"{Path(path).name} is neither a PyTorch checkpoint (torch.save) nor a pickle: it starts with {head[:8]!r}")


def load_torch_file(path: str | os.PathLike, trust: bool = False):
    """torch.load on the CPU; weights_only unless `trust`. Errors become ValueErrors that name the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as error:
        if trust:
            raise ValueError(f"{Path(path).name} could not be unpickled: {error}") from error
        reason = next((line.strip() for line in str(error).splitlines() if "Unsupported global" in line), "it holds other objects")
        raise ValueError(
            f"{Path(path).name} holds more than tensors and plain containers, so it was not unpickled (weights_only=True; "
            f"{reason}); archive.sh --trust-checkpoint unpickles it fully: only for a file you trust"
        ) from error
    except (RuntimeError, EOFError, OSError) as error:
        raise ValueError(f"{Path(path).name} is not a readable PyTorch checkpoint: {error}") from error


def read_state_dict(source: str | os.PathLike | Mapping[str, torch.Tensor], container_keys: Sequence[str], model_name: str, trust: bool = False) -> dict[str, torch.Tensor]:
    """Checkpoint path or mapping -> flat state dict: taken from the first of `container_keys` present,
    with the DataParallel `module.` prefix stripped."""
    if isinstance(source, (str, os.PathLike)):
        if checkpoint_format(source) != "torch":
            raise ValueError(f"{Path(source).name} is a plain pickle, not a torch.save checkpoint of {model_name}")
        checkpoint = load_torch_file(source, trust)
    else:
        checkpoint = source
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{model_name} checkpoint must be a state dict or a dict holding one, got {type(checkpoint).__name__}")
    for container_key in container_keys:
        if isinstance(checkpoint.get(container_key), Mapping):
            checkpoint = checkpoint[container_key]
            break
    not_tensors = sorted(key for key, value in checkpoint.items() if not isinstance(value, torch.Tensor))
    if not_tensors:
        raise ValueError(
            f"{model_name} checkpoint is not a state dict: {not_tensors[:5]} {'and more ' if len(not_tensors) > 5 else ''}are not tensors"
            + (f" (expected the weights under one of {list(container_keys)})" if container_keys else "")
        )
    return {key.removeprefix(DATA_PARALLEL_PREFIX): value for key, value in checkpoint.items()}


def load_strictly(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], description: str) -> torch.nn.Module:
    """Assign float32 copies of the weights to a (meta-device) model; every missing, unexpected or
    mis-shaped key is a ValueError naming it. Returns the model in eval mode with frozen parameters."""
    float_state_dict = {key: value.float() if torch.is_tensor(value) and value.is_floating_point() else value for key, value in state_dict.items()}
    try:
        incompatible = model.load_state_dict(float_state_dict, strict=False, assign=True)
    except RuntimeError as error:
        raise ValueError(f"{description} checkpoint does not fit: {error}") from error
    if incompatible.missing_keys or incompatible.unexpected_keys:
        raise ValueError(f"{description} checkpoint does not fit: missing keys {incompatible.missing_keys}, unexpected keys {incompatible.unexpected_keys}")
    return model.eval().requires_grad_(False)

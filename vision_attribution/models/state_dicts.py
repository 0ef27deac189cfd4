"""Reading state-dict checkpoints and loading them strictly, shared by the checkpoint loaders."""
import os
from typing import Mapping, Sequence

import torch

DATA_PARALLEL_PREFIX = "module."


def read_state_dict(source: str | os.PathLike | Mapping[str, torch.Tensor], container_keys: Sequence[str], model_name: str) -> dict[str, torch.Tensor]:
    """Checkpoint path or mapping -> flat state dict: taken from the first of `container_keys` present,
    with the DataParallel `module.` prefix stripped. Files load with torch.load(weights_only=True)."""
    checkpoint = torch.load(source, map_location="cpu", weights_only=True) if isinstance(source, (str, os.PathLike)) else source
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{model_name} checkpoint must be a state dict or a dict holding one, got {type(checkpoint).__name__}")
    for container_key in container_keys:
        if isinstance(checkpoint.get(container_key), Mapping):
            checkpoint = checkpoint[container_key]
            break
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

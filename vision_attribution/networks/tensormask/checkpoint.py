"""Load detectron2 TensorMask checkpoints: model-zoo pickles (``.pkl``) and torch.save files (``.pth``).

The format is told from the file's content, not its name. A pickle is read with an unpickler that can
only rebuild numpy arrays (written by numpy 1 or 2, pickle protocols 2 to 5) and the dicts holding
them: any other global in the pickle, such as ``os.system``, is refused, unless the caller passes
``allow_unsafe_pickle=True``. A torch file is read with ``torch.load(weights_only=True)``.
"""
import importlib
import logging
import pickle
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch

from ..checkpoints import checkpoint_format, load_torch_file
from .config import DEFAULT_CONFIG
from .model import TensorMask

__all__ = ["CheckpointReport", "CheckpointError", "UnsafePickleError", "read_checkpoint",
           "load_tensormask_weights", "load_tensormask"]

logger = logging.getLogger(__name__)

# Buffers older detectron2 versions saved and the current model recomputes from the config.
_IGNORED_PREFIXES = ("anchor_generator.cell_anchors.",)
_IGNORED_KEYS = ("pixel_mean", "pixel_std")


class CheckpointError(ValueError):
    """The checkpoint does not fit the model (missing keys, wrong shapes, wrong format)."""


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asks for something other than numpy arrays."""


def _numpy_core(module: str):
    """numpy's private core module `module` (multiarray, numeric) under numpy 2's name or numpy 1's."""
    try:
        return importlib.import_module(f"numpy._core.{module}")  # numpy >= 2
    except ImportError:
        return importlib.import_module(f"numpy.core.{module}")


# The globals numpy 1 and numpy 2 pickles of arrays use: _reconstruct (protocols 2-4), _frombuffer
# (protocol 5), scalar (numpy scalars), each under numpy 1's module name and numpy 2's.
_ALLOWED_GLOBALS = {
    **{
        (f"{package}.{module}", name): (lambda module=module, name=name: getattr(_numpy_core(module), name))
        for package in ("numpy.core", "numpy._core")
        for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))
    },
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("collections", "OrderedDict"): lambda: __import__("collections").OrderedDict,
    # protocol-2 pickles written by Python 3 store bytes as _codecs.encode(text, "latin1")
    ("_codecs", "encode"): lambda: __import__("_codecs").encode,
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        factory = _ALLOWED_GLOBALS.get((module, name))
        if factory is None:
            raise UnsafePickleError(
                f"refusing to load {module}.{name} from a checkpoint pickle: only numpy arrays "
                "are allowed (archive.sh --trust-checkpoint unpickles fully: only for files you trust)"
            )
        return factory()


@dataclass
class CheckpointReport:
    """Key comparison of a checkpoint with the model's state dict."""

    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    ignored: List[str] = field(default_factory=list)


def read_checkpoint(path: str, allow_unsafe_pickle: bool = False) -> Dict[str, object]:
    """{parameter name: array or tensor} from a detectron2 pickle or torch file, ``model`` wrapper removed."""
    is_pickle = checkpoint_format(path) == "pickle"
    if is_pickle:
        with open(path, "rb") as f:
            if allow_unsafe_pickle:
                data = pickle.load(f, encoding="latin1")
            else:
                data = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    else:
        data = load_torch_file(path, trust=allow_unsafe_pickle)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a dict, got {type(data).__name__}")
    if "model" in data and isinstance(data["model"], dict):
        data = data["model"]
    elif "blobs" in data or is_pickle:
        raise CheckpointError(
            f"{path}: not a detectron2 checkpoint (no 'model' dict); Caffe2/Detectron1 "
            "checkpoints need detectron2's name-matching heuristics, which are not supported"
        )
    return data


def _to_tensor(name: str, value, like: torch.Tensor) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "fiub":
            raise CheckpointError(f"{name}: non-numeric array of dtype {value.dtype}")
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"{name}: expected an array, got {type(value).__name__}")
    if tuple(value.shape) != tuple(like.shape):
        raise CheckpointError(
            f"{name}: checkpoint shape {tuple(value.shape)} != model shape {tuple(like.shape)}")
    return value.to(like.dtype)


def load_tensormask_weights(model: TensorMask, path: str, allow_unsafe_pickle: bool = False
                            ) -> CheckpointReport:
    """Copy a checkpoint into ``model``; raises CheckpointError if any parameter is missing or
    has the wrong shape. Unexpected keys are reported (and logged), not loaded."""
    checkpoint = read_checkpoint(path, allow_unsafe_pickle)
    own = model.state_dict()
    report = CheckpointReport()
    for name in sorted(checkpoint):
        if name in own:
            continue
        if name in _IGNORED_KEYS or name.startswith(_IGNORED_PREFIXES):
            report.ignored.append(name)
        else:
            report.unexpected.append(name)
    report.missing = sorted(set(own) - set(checkpoint))
    if report.missing:
        shown = ", ".join(report.missing[:10])
        more = f" and {len(report.missing) - 10} more" if len(report.missing) > 10 else ""
        raise CheckpointError(
            f"{path}: {len(report.missing)} model parameters missing from the checkpoint: "
            f"{shown}{more}")
    model.load_state_dict(
        {name: _to_tensor(name, checkpoint[name], like) for name, like in own.items()})
    if report.unexpected:
        logger.warning("%s: %d unexpected keys not loaded: %s", path, len(report.unexpected),
                       ", ".join(report.unexpected))
    return report


def load_tensormask(checkpoint_path: str, cfg: Optional[dict] = None,
                    allow_unsafe_pickle: bool = False) -> TensorMask:
    """TensorMask built from ``cfg`` (default: the published R50-FPN 6x config) with the
    checkpoint's weights, in eval mode on the CPU, parameters frozen (requires_grad False:
    gradients w.r.t. input images still flow, no weight gradients are computed)."""
    model = TensorMask(DEFAULT_CONFIG if cfg is None else cfg)
    load_tensormask_weights(model, checkpoint_path, allow_unsafe_pickle)
    return model.eval().requires_grad_(False)

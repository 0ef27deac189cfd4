"""The TorchServe archives this project builds, one module each, named like its config (vision_attribution/archives/configs/NAME.yaml).

An archive module provides:
  SUMMARY          one line: the model and where its weights come from.
  CHECKPOINT       "required" (the user supplies the weights) or "optional" (embedded default weights).
  FRAMEWORK_CONFIG what --config takes (the framework's own model config), or None where it takes none.
  MODEL_SETTINGS   {key: Setting}: its `model:` section of model-config.yaml.
  REQUIRES         (optional) modules it needs beyond the serving core that ./setup.sh installs.
  stage(inputs)    archive time: read the user's checkpoint (any file name, any supported format), load it
                   strictly, and write WEIGHTS_FILE (a plain state dict) plus any extra files into
                   inputs.workdir; returns the extra files. Raises ValueError with the loader's message.
  load_adapter(model_dir, model_settings, device) -> ModelAdapter
                   worker time: build the model from WEIGHTS_FILE (torch.load with weights_only=True).
build.py runs stage() and then load_adapter() itself, so an archive that builds is an archive whose workers load.
"""
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

import torch

from ..serving.service import AttributionService
from ..serving.settings import read_model_config

ARCHIVES = ("effnet", "selfie", "bit", "lanet", "tensormask", "swin", "dextr", "deeplab")
EMBEDDED_DEFAULTS = ("effnet", "selfie")
"""Archives with real weights that need no user checkpoint: `archive.sh all` builds these."""
WEIGHTS_FILE = "weights.pt"
MANIFEST_FILE = "archive.json"
"""{"archive": NAME}: which archive module serves a .mar, whatever name it is registered under."""


@dataclass(frozen=True)
class StageInputs:
    """What `stage` gets: the user's files, the validated `model:` settings, and where to write."""

    checkpoint: Optional[Path]
    framework_config: Optional[Path]  # the framework's own config (detectron2 YAML, mmdet .py), if the archive takes one
    model_settings: dict[str, Any]
    trust_checkpoint: bool  # unpickle the checkpoint fully (arbitrary code): only for files the user trusts
    workdir: Path

    @property
    def weights_path(self) -> Path:
        return self.workdir / WEIGHTS_FILE


def archive_module(name: str) -> ModuleType:
    """The module serving archive `name`; ValueError naming the known archives otherwise."""
    if name not in ARCHIVES:
        raise ValueError(f"unknown archive {name!r}; the archives are {', '.join(ARCHIVES)}")
    return importlib.import_module(f"{__name__}.{name}")


def read_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """The state dict an archive's stage() wrote; loaded without unpickling anything but tensors."""
    return torch.load(Path(model_dir) / WEIGHTS_FILE, map_location="cpu", weights_only=True)


def load_service(model_dir: Path, model_config: Optional[dict], device: torch.device) -> AttributionService:
    """Worker start-up: validate the archive's model-config and build its service on `device`."""
    manifest = json.loads((Path(model_dir) / MANIFEST_FILE).read_text())
    module = archive_module(manifest["archive"])
    attribution, model_settings = read_model_config(model_config, module.MODEL_SETTINGS)
    return AttributionService(module.load_adapter(Path(model_dir), model_settings, device), attribution)

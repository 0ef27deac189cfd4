"""selfie: MediaPipe selfie segmentation, person vs background (embedded default, Apache-2.0)."""
import shutil
from pathlib import Path

import torch

from ..adapters.semantic import SemanticSegmenterAdapter
from ..networks.checkpoints import load_strictly, read_state_dict
from ..networks.selfie import INPUT_SIZE, SelfieSegmenter
from .selfie_tflite import notice_path_for, write_selfie_checkpoint
from . import WEIGHTS_FILE, StageInputs

SUMMARY = "MediaPipe selfie segmentation (person / background); real weights converted from the mediapipe==0.10.21 wheel"
CHECKPOINT = "optional"
FRAMEWORK_CONFIG = None
MODEL_SETTINGS: dict = {}
NOTICE_FILE = "NOTICE.txt"
CLASS_NAMES = ("background", "person")


def load_segmenter(source) -> SelfieSegmenter:
    """SelfieSegmenter loaded strictly from a state dict (path or mapping), eval mode, frozen."""
    with torch.device("meta"):
        model = SelfieSegmenter()
    return load_strictly(model, read_state_dict(source, (), "selfie segmentation"), "selfie segmentation")


def stage(inputs: StageInputs) -> list[Path]:
    """Weights: converted from MediaPipe's .tflite (fetched from PyPI at build time), or a converted state dict
    given as --checkpoint with its Apache-2.0 notice next to it (X.NOTICE.txt, as selfie_tflite writes it)."""
    checkpoint = inputs.checkpoint or write_selfie_checkpoint(inputs.workdir / "converted" / "selfie.pt")[0]
    given_notice = notice_path_for(checkpoint)
    if not given_notice.exists():
        raise ValueError(f"the Apache-2.0 notice {given_notice} must accompany the selfie weights")
    notice = shutil.copy(given_notice, inputs.workdir / NOTICE_FILE)
    state_dict = read_state_dict(checkpoint, (), "selfie segmentation", inputs.trust_checkpoint)
    model = load_segmenter(state_dict)
    torch.save(model.state_dict(), inputs.weights_path)
    return [Path(notice)]


def load_adapter(model_dir: Path, model_settings: dict, device: torch.device) -> SemanticSegmenterAdapter:
    model = load_segmenter(Path(model_dir) / WEIGHTS_FILE).to(device)

    def two_class_logits(images: torch.Tensor) -> torch.Tensor:
        """(B, 3, 256, 256) -> (B, 2, 256, 256) logits -l/2 and l/2 for the person logit l: softmax = sigmoid(l)."""
        half = model(images) / 2
        return torch.cat([-half, half], dim=1)

    return SemanticSegmenterAdapter(two_class_logits, CLASS_NAMES, (INPUT_SIZE, INPUT_SIZE), (0, 0, 0), (1, 1, 1), device, binary=True)

"""Fixtures several unit modules share."""
import pytest
import torch

from vision_attribution.adapters.semantic import SemanticSegmenterAdapter
from vision_attribution.serving.service import AttributionService
from vision_attribution.serving.settings import read_model_config


@pytest.fixture(scope="module")
def segmenter() -> AttributionService:
    """The service of a small random semantic segmenter (3 classes, 48 x 48 input, 6 Gauss-Legendre steps)."""
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5, padding=2), torch.nn.Tanh(), torch.nn.Conv2d(8, 3, 5, padding=2)).eval().requires_grad_(False)
    adapter = SemanticSegmenterAdapter(network, ["background", "sky", "thing"], (48, 48), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), torch.device("cpu"))
    settings, _ = read_model_config({"attribution": {"n_steps": 6}}, {})
    return AttributionService(adapter, settings)

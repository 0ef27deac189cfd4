"""TorchServe handler of the effnet archive (EfficientNet-lite0, ImageNet)."""
from attribution_handler import AttributionHandler

from vision_attribution.models.effnet import load_adapter


class EffnetHandler(AttributionHandler):
    load_adapter = staticmethod(load_adapter)

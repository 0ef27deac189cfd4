"""TorchServe handler of the selfie archive (MediaPipe selfie segmentation, person vs background)."""
from attribution_handler import AttributionHandler

from vision_attribution.models.selfie import load_adapter


class SelfieHandler(AttributionHandler):
    load_adapter = staticmethod(load_adapter)

"""TorchServe handler of the tensormask archive (detectron2 TensorMask R50-FPN, in plain PyTorch)."""
from attribution_handler import AttributionHandler

from vision_attribution.models.tensormask.adapter import load_adapter


class TensormaskHandler(AttributionHandler):
    load_adapter = staticmethod(load_adapter)

"""TorchServe handler of the lanet archive (LaNet NetworkCIFAR on CIFAR-10, seed-compatible)."""
from attribution_handler import AttributionHandler

from vision_attribution.models.cifar import load_lanet_adapter


class LanetHandler(AttributionHandler):
    load_adapter = staticmethod(load_lanet_adapter)

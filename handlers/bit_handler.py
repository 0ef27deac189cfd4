"""TorchServe handler of the bit archive (BiT-S-R101x3 on CIFAR-10, seed-compatible)."""
from attribution_handler import AttributionHandler

from vision_attribution.models.cifar import load_bit_adapter


class BitHandler(AttributionHandler):
    load_adapter = staticmethod(load_bit_adapter)

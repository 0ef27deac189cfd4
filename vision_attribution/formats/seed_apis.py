"""The seeds' own HTTP APIs, which the gateway (vision_attribution.clients.gateway) serves in front of TorchServe.

MAX Image Segmenter (seed 004): GET /model/metadata, GET /model/labels, POST /model/predict (multipart field
`image`) -> {"status": "ok", "image_size": [w, h], "seg_map": [[class, ...w], ...h]}, Swagger 2.0 at
/swagger.json. Its strings are kept exactly (including "VOCO 2012" and the TensorFlow model it described).
The Flask seeds (000-002): POST /model/ with their JSON bodies; the reply is the archive's seed reply.
Nothing here imports torch: the gateway stays a light process.
"""
from typing import Any

from .class_names import VOC_CLASSES

MAX_PREDICTION_TYPE = "application/vnd.max-image-segmenter+json"
"""The Accept type that asks deeplab for MAX's reply to POST /model/predict (what the gateway sends)."""

MAX_API_INFO = {
    "title": "MAX Image Segmenter",
    "description": "Identify objects in an image, additionally assigning each pixel of the image to a particular object",
    "version": "1.2.0",
}
MAX_METADATA = {
    "id": "max-image-segmenter",
    "name": "MAX Image Segmenter",
    "description": "DeepLab TensorFlow model for semantic image segmentation, trained on VOCO 2012",
    "type": "Object Detection",
    "license": "Apache v2",
    "source": "https://developer.ibm.com/exchanges/models/all/max-image-segmenter",
}
MAX_INVALID_IMAGE = {"message": "The provided input is not a valid image."}
"""MAX's 400 reply to an upload that is not an image."""
MAX_MISSING_IMAGE = {
    "errors": {"image": "An image file (encoded as PNG or JPG/JPEG) Missing required parameter in an uploaded file"},
    "message": "Input payload validation failed",
}
"""MAX's 400 reply (flask-restx's request parser) to a request without an `image` file."""


def max_labels() -> list[dict[str, Any]]:
    """GET /model/labels: the 21 PASCAL VOC classes as [{"id": 0, "name": "background"}, ...]."""
    return [{"id": index, "name": name} for index, name in enumerate(VOC_CLASSES)]


def max_prediction(prediction: dict[str, Any]) -> dict[str, Any]:
    """MAX's reply to POST /model/predict from a deeplab prediction: {"status": "ok", "image_size": [w, h],
    "seg_map": h lists of w class indices}, both of the resized image the model saw."""
    return {"status": "ok", "image_size": list(prediction["image_size"]), "seg_map": prediction["seg_map"].tolist()}


FLASK_SEEDS = {
    "bit": ("int-gradients-image-server (-bp, BiT)", "explanations"),
    "lanet": ("int-gradients-image-server (-lb, LaNet)", "explanations"),
    "tensormask": ("tensormask-segmentation-server", "predictions"),
    "swin": ("swin-segmentation-server", "predictions"),
}
"""Flask seed -> (its server, the TorchServe API its POST /model/ answered like): the classifier seeds replied
with attributions, the segmentation seeds with masks."""

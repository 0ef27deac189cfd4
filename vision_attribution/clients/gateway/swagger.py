"""The gateway's API descriptions (Swagger 2.0, as MAX's flask-restx served at /swagger.json) and the Swagger UI
page at /, whose JavaScript and CSS come from the installed swagger-ui-bundle package: nothing loads from outside."""
from pathlib import Path

import swagger_ui_bundle

from ...formats.class_names import CIFAR10_CLASSES
from ...formats.seed_apis import FLASK_SEEDS, MAX_API_INFO

UI_ASSETS_DIR = Path(swagger_ui_bundle.swagger_ui_path)
UI_ASSETS = ("swagger-ui.css", "swagger-ui-bundle.js", "favicon-32x32.png")
"""The Swagger UI files the page loads, served under /swagger-ui/."""

_ERROR = {
    "type": "object",
    "description": "MAX's errors carry `message` (and `errors` per field); the archives' and the gateway's carry `error`",
    "properties": {"message": {"type": "string"}, "errors": {"type": "object"}, "error": {"type": "string"}, "request_id": {"type": "string"}},
}
_PASSED_ERRORS = {
    "description": "An error with its status: TorchServe's and the archive's passed through (400 bad request, 404 no such model, "
    "413 image too large, 500, 503 no worker, 507 out of memory), or the gateway's own: 413 upload over the limit, "
    "503 TorchServe not reachable (with the reason), 504 TorchServe did not answer in time",
    "schema": {"$ref": "#/definitions/Error"},
}


def max_spec() -> dict:
    """MAX Image Segmenter's API: metadata, labels and predict, with MAX's titles, fields and descriptions."""
    return {
        "swagger": "2.0",
        "basePath": "/",
        "info": dict(MAX_API_INFO),
        "produces": ["application/json"],
        "consumes": ["application/json"],
        "tags": [{"name": "model", "description": "Model information and inference operations"}],
        "paths": {
            "/model/metadata": {
                "get": {
                    "tags": ["model"],
                    "operationId": "get_model_metadata_api",
                    "summary": "Return the metadata associated with the model",
                    "responses": {"200": {"description": "Success", "schema": {"$ref": "#/definitions/ModelMetadata"}}},
                }
            },
            "/model/labels": {
                "get": {
                    "tags": ["model"],
                    "operationId": "labels",
                    "summary": "Return the list of labels that can be predicted by the model",
                    "responses": {"200": {"description": "Success", "schema": {"type": "array", "items": {"$ref": "#/definitions/ModelLabel"}}}},
                }
            },
            "/model/predict": {
                "post": {
                    "tags": ["model"],
                    "operationId": "predict",
                    "summary": "Make a prediction given input data",
                    "consumes": ["multipart/form-data"],
                    "parameters": [
                        {"name": "image", "in": "formData", "type": "file", "required": True, "description": "An image file (encoded as PNG or JPG/JPEG)"}
                    ],
                    "responses": {
                        "200": {"description": "Success", "schema": {"$ref": "#/definitions/ModelPredictResponse"}},
                        "400": {"description": "Not a valid image, or no `image` file", "schema": {"$ref": "#/definitions/Error"}},
                        "default": _PASSED_ERRORS,
                    },
                }
            },
        },
        "definitions": {
            "ModelMetadata": {
                "type": "object",
                "required": ["id", "name", "description", "type", "source"],
                "properties": {
                    "id": {"type": "string", "description": "Model identifier"},
                    "name": {"type": "string", "description": "Model name"},
                    "description": {"type": "string", "description": "Model description"},
                    "type": {"type": "string", "description": "Model type"},
                    "source": {"type": "string", "description": "Model source"},
                    "license": {"type": "string", "description": "Model license"},
                },
            },
            "ModelLabel": {
                "type": "object",
                "required": ["id", "name"],
                "properties": {"id": {"type": "integer"}, "name": {"type": "string"}},
            },
            "ModelPredictResponse": {
                "type": "object",
                "required": ["status"],
                "properties": {
                    "status": {"type": "string", "description": "Response status message"},
                    "image_size": {
                        "type": "array",
                        "items": {"type": "integer"},
                        "description": "The size of the output image segmentation map (may differ from input image)",
                    },
                    "seg_map": {
                        "type": "array",
                        "items": {"type": "array", "items": {"type": "integer", "description": "Segmentation map containing a predicted class for each pixel"}},
                    },
                },
            },
            "Error": _ERROR,
        },
    }


def _pixel_lists(layout: str) -> dict:
    return {"type": "array", "description": f"the image as nested lists of integers 0..255, {layout}", "items": {"type": "array", "items": {}}}


def seed_spec(seed: str, model: str, version: str) -> dict:
    """A Flask seed's one route, POST /model/, as the gateway serves it for TorchServe model `model`."""
    server, api = FLASK_SEEDS[seed]
    if api == "explanations":
        request = {
            "type": "object",
            "required": ["img_data"],
            "properties": {
                "img_data": _pixel_lists("H x W x 3 RGB"),
                "target_class": {"type": "string", "enum": list(CIFAR10_CLASSES), "description": "the class to explain (default: the predicted one)"},
            },
        }
        reply = "gzip(torch.save(dict)): integrated_grads, integrated_directional_grads, step_sizes, intermediates, output, target_class"
    else:
        layout = "3 x H x W BGR" if seed == "tensormask" else "H x W x 3 BGR"
        request = {"type": "object", "required": ["img_data"], "properties": {"img_data": _pixel_lists(layout)}}
        reply = "gzip(torch.save(dict)): pred_masks Bool (N, H, W) at the original size, with labels, scores, ..."
    return {
        "swagger": "2.0",
        "basePath": "/",
        "info": {"title": f"{server} ({model}) through vision-attribution", "version": version, "description": f"The seed's POST /model/, answered by TorchServe's /{api}/{model}; further options of the archive may be added to the JSON body"},
        "paths": {
            "/model/": {
                "post": {
                    "operationId": "model",
                    "summary": f"{'Attributions' if api == 'explanations' else 'Segmentation masks'} for an image, as the seed replied",
                    "consumes": ["application/json"],
                    "produces": ["application/gzip", "application/json"],
                    "parameters": [{"name": "payload", "in": "body", "required": True, "schema": {"$ref": "#/definitions/SeedRequest"}}],
                    "responses": {"200": {"description": reply, "schema": {"type": "file"}}, "default": _PASSED_ERRORS},
                }
            }
        },
        "definitions": {"SeedRequest": request, "Error": _ERROR},
    }


def ui_page(title: str) -> str:
    """Swagger UI for ./swagger.json; the validator badge (a request to swagger.io) is off."""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="UTF-8">
  <title>{title}</title>
  <link rel="stylesheet" type="text/css" href="swagger-ui/swagger-ui.css">
  <link rel="icon" type="image/png" href="swagger-ui/favicon-32x32.png" sizes="32x32">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="swagger-ui/swagger-ui-bundle.js" charset="UTF-8"></script>
  <script>
    window.ui = SwaggerUIBundle({{url: "swagger.json", dom_id: "#swagger-ui", validatorUrl: null, docExpansion: "list", deepLinking: true}});
  </script>
</body>
</html>
"""

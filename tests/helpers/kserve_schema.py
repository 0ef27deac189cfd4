"""JSON Schemas for KServe's resources, offline: built from the kserve SDK's API types (generated from KServe's
OpenAPI definitions: each class lists its fields' JSON names and types), with the Kubernetes types they embed
(V1Container, V1Volume, ...) taken from kubernetes-validate's Kubernetes JSON schemas. Unknown fields are
refused at every level, as the API server's structural schema prunes or rejects them."""
import json
import re
from functools import lru_cache
from importlib import resources

import jsonschema
import kserve.models

KUBERNETES_VERSION = "1.37.0"
UNCHECKED: set[str] = set()
"""Types the SDK names but does not define (e.g. V1alpha1WorkerSpec in kserve 0.21): accepted as any object."""
PRIMITIVES = {"str": {"type": "string"}, "bool": {"type": "boolean"}, "int": {"type": "integer"}, "float": {"type": "number"},
              "object": {}, "datetime": {"type": "string"}, "ResourceQuantity": {"type": ["string", "number"]}}


@lru_cache(maxsize=None)
def kubernetes_definitions() -> dict:
    folder = resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{KUBERNETES_VERSION}-local-strict"
    return json.loads((folder / "_definitions.json").read_text())["$defs"]


def _kubernetes_definition(type_name: str) -> str:
    """'V1Container' -> 'io.k8s.api.core.v1.Container' (the core and meta groups first, as the SDK names them)."""
    match = re.fullmatch(r"(V\d+(?:alpha\d+|beta\d+)?)(\w+)", type_name)
    if match is None:
        raise KeyError(f"{type_name} is not a Kubernetes type name")
    version, kind = match.group(1).lower(), match.group(2)
    candidates = [name for name in kubernetes_definitions() if name.endswith(f".{version}.{kind}")]
    for preferred in ("io.k8s.api.core.", "io.k8s.apimachinery.pkg.apis.meta.", "io.k8s.api.apps."):
        for name in candidates:
            if name.startswith(preferred):
                return name
    if len(candidates) != 1:
        raise KeyError(f"no single Kubernetes definition for {type_name}: {candidates}")
    return candidates[0]


def _type_schema(type_name: str, definitions: dict) -> dict:
    if type_name in PRIMITIVES:
        return PRIMITIVES[type_name]
    if type_name.startswith("list["):
        return {"type": "array", "items": _type_schema(type_name[5:-1], definitions)}
    if type_name.startswith("dict("):
        return {"type": "object", "additionalProperties": _type_schema(type_name[5:-1].split(", ", 1)[1], definitions)}
    if hasattr(kserve.models, type_name):
        _model_schema(type_name, definitions)
        return {"$ref": f"#/$defs/{type_name}"}
    if type_name == "K8sIoApiAppsV1DeploymentStrategy":
        return {"$ref": "#/$defs/io.k8s.api.apps.v1.DeploymentStrategy"}
    try:
        return {"$ref": f"#/$defs/{_kubernetes_definition(type_name)}"}
    except KeyError:  # referenced by the SDK but not shipped with it: any object, and said so
        UNCHECKED.add(type_name)
        return {"type": "object", "x-unchecked": type_name}


def _model_schema(type_name: str, definitions: dict) -> None:
    if type_name in definitions:
        return
    model = getattr(kserve.models, type_name)
    definitions[type_name] = {}  # placeholder against recursion
    properties = {model.attribute_map[field]: _type_schema(kind, definitions) for field, kind in model.openapi_types.items()}
    definitions[type_name] = {"type": "object", "properties": properties, "additionalProperties": False}


@lru_cache(maxsize=None)
def validator(kind: str) -> jsonschema.Draft202012Validator:
    """A validator of `kind`'s schema, made once: jsonschema.validate would check the large schema against the
    metaschema on every call (about 7 s each on 2 cores)."""
    return jsonschema.Draft202012Validator(schema(kind))


@lru_cache(maxsize=None)
def schema(kind: str) -> dict:
    """The JSON Schema of a KServe resource kind (e.g. 'V1beta1InferenceService'), Kubernetes definitions included."""
    definitions = dict(kubernetes_definitions())
    _model_schema(kind, definitions)
    return {"$ref": f"#/$defs/{kind}", "$defs": definitions}


KINDS = {("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
         ("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
         ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "V1alpha1ClusterServingRuntime"}

"""The reply schema, in one place with the request schema (requests.py); the README's "Formats" documents both.

Every reply is a dict of tensors, numbers, strings, lists and dicts, encoded by the client's Accept header
(encode.py): gzip(torch.save) as the seeds wrote it, .npz, JSON, or a PNG label image for segmenters.
This module names the keys of each reply, builds the explanation reply, estimates its size before any
work is done, and picks the encoding.
"""
import base64
import dataclasses
from datetime import datetime
from typing import Any, Optional, Sequence

import torch

from ..adapters.base import ExplanationPlan, ModelInput
from ..engine import PathIntegral
from ..errors import RequestError
from .seed_apis import MAX_PREDICTION_TYPE

REPLY_TYPES = {
    "application/gzip": "gzip",
    "application/x-gzip": "gzip",
    "application/x-npz": "npz",
    "application/npz": "npz",
    "application/json": "json",
    "image/png": "png",
    "application/vnd.opex+json": "opex",
    MAX_PREDICTION_TYPE: "max",
}
CONTENT_TYPES = {
    "gzip": "application/gzip", "npz": "application/x-npz", "json": "application/json", "png": "image/png",
    "opex": "application/vnd.opex+json", "kserve_v2": "application/json", "max": "application/json",
}
EXPLANATION_TYPES = ("gzip", "npz", "json")

SEED_CLASSIFIER_EXPLANATION_KEYS = ("integrated_grads", "integrated_directional_grads", "step_sizes", "intermediates", "output", "target_class")
"""The seed reply of int-gradients-image-server (bit, lanet), key for key."""
PATH_KEYS = ("integrated_directional_grads", "intermediates")
"""The path tensors, (n, C, h, w) each: sent only with return_path."""


def negotiate_reply_type(accept: Optional[str], default: str, available: tuple[str, ...]) -> str:
    """Pick a reply encoding (gzip, npz, json, png) from an Accept header; 406 when none is available."""
    if not accept:
        return default
    for part in accept.split(","):
        media = part.split(";")[0].strip().lower()
        if media in ("*/*", "application/*", ""):
            return default
        if REPLY_TYPES.get(media) in available:
            return REPLY_TYPES[media]
    offered = sorted(media for media, kind in REPLY_TYPES.items() if kind in available)
    raise RequestError(f"cannot reply in {accept!r}; this endpoint offers {offered}", status=406)


def classifier_prediction(logits: torch.Tensor, class_names: list[str]) -> dict[str, Any]:
    """Reply to a classifier prediction, from logits (K,): the top class, the top 5 ({index, name, probability}
    records, best first), logits and probabilities (1, K)."""
    probabilities = logits.float().softmax(dim=0)
    top = probabilities.topk(min(5, len(class_names)))
    indices = top.indices.tolist()
    return {
        "predicted_name": class_names[indices[0]],
        "predicted_class": indices[0],
        "top5": [{"index": i, "name": class_names[i], "probability": p} for i, p in zip(indices, top.values.tolist())],
        "output": logits[None].float().cpu(),
        "probabilities": probabilities[None].cpu(),
    }


def explanation(integral: PathIntegral, plan: ExplanationPlan, model_input: ModelInput, baseline: str) -> dict[str, Any]:
    """Reply to an explanation: the integral, the prediction at the input, what was explained, IDG per mask, and
    for a tolerance-driven explanation how its refinement ended."""
    payload: dict[str, Any] = {
        "integrated_grads": integral.integrated_grads,
        "step_sizes": integral.step_sizes.unsqueeze(1),
        "alphas": integral.alphas,
    }
    if integral.path_gradients is not None:
        payload["integrated_directional_grads"] = integral.path_gradients
        payload["intermediates"] = integral.intermediates
    payload.update(plan.prediction)
    payload.update(
        target=plan.target,
        target_at_input=integral.target_at_input,
        target_at_baseline=integral.target_at_baseline,
        convergence_delta=integral.convergence_delta,
        method=integral.method,
        n_steps=len(integral.alphas),
        baseline=baseline,
        input_region=torch.tensor(model_input.region, dtype=torch.float64),
    )
    if integral.refinement is not None:
        payload["refinement"] = dataclasses.asdict(integral.refinement)
    if plan.integral_summary is not None:
        payload.update(plan.integral_summary(integral))
    if plan.groups is not None:
        payload["idg_per_mask"] = {"idg": integral.idg, "dividends": integral.idg_dividends, "masks": plan.groups.cpu(), "labels": plan.group_labels}
    return payload


DEXTR_META = {"segmenter": {"type": "dextr"}}
OPEX_TIMESTAMP = "%Y%m%d_%H%M%S.%f"  # the opex library's timestamp format


def interactive_segment_reply(mask_png: bytes, contours: list, points: Sequence[Sequence[float]], label: int) -> dict[str, Any]:
    """The DEXTR seed's reply (its Redis mode): {"mask": base64 PNG, "contours": [[[x, y], ...], ...],
    "meta": {"segmenter": {"type": "dextr"}, "prompt": {"points", "label"}}}."""
    return {
        "mask": base64.b64encode(mask_png).decode("ascii"),
        "contours": contours,
        "meta": {**DEXTR_META, "prompt": {"points": [list(point) for point in points], "label": label}},
    }


def opex_document(contours: list, label: int, object_id: str, meta: dict[str, str], timestamp: Optional[datetime] = None) -> dict[str, Any]:
    """OPEX (object predictions exchange format): one object per contour with its label, integer bounding box and
    polygon; `meta` values must be strings (the opex schema)."""
    objects = []
    for polygon in contours:
        xs, ys = [x for x, _ in polygon], [y for _, y in polygon]
        objects.append({
            "label": str(label),
            "bbox": {"left": min(xs), "top": min(ys), "right": max(xs), "bottom": max(ys)},
            "polygon": {"points": [[x, y] for x, y in polygon]},
        })  # fmt: skip
    stamp = (timestamp or datetime.now()).strftime(OPEX_TIMESTAMP)
    return {"timestamp": stamp, "id": object_id, "objects": objects, "meta": {key: str(value) for key, value in meta.items()}}


def seed_explanation(payload: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """The seed's reply: exactly its keys, less the path tensors when the client asked for return_path=false."""
    return {key: payload[key] for key in keys if key in payload or key not in PATH_KEYS}


# Reply size estimates, per value, by encoding: float32 path tensors do not compress in practice;
# boolean masks compress at least 8:1 with gzip; JSON (also KServe v2's) spends about 20 characters on a float.
_BYTES_PER_VALUE = {
    "gzip": {"float": 4.0, "bool": 0.125},
    "npz": {"float": 4.0, "bool": 1.0},
    "json": {"float": 20.0, "bool": 6.0},
    "kserve_v2": {"float": 20.0, "bool": 6.0},
}


def _tensor_bytes(tensor: torch.Tensor, reply_type: str) -> float:
    kind = "bool" if tensor.dtype == torch.bool else "float"
    return tensor.numel() * _BYTES_PER_VALUE[reply_type][kind]


def estimate_explanation_bytes(
    plan: ExplanationPlan, model_input: ModelInput, n_steps: int, keep_path: bool, reply_type: str, hierarchy: bool = False
) -> tuple[float, float]:
    """Estimated size of an explanation reply before it is computed: (total bytes, bytes per path step).

    The per-step part is the path tensors (2 x (C, h, w) float32 per step, with keep_path) and the
    quadrature coefficients; the rest is IG (C, h, w), the prediction already made, the IDG masks and,
    with an IDG hierarchy, its (h, w) label map.
    """
    per_value = _BYTES_PER_VALUE[reply_type]
    input_values = model_input.tensor[0].numel()
    per_step = 3 * per_value["float"] + (2 * input_values * per_value["float"] if keep_path else 0)
    fixed = input_values * per_value["float"]
    fixed += sum(_tensor_bytes(value, reply_type) for value in plan.prediction.values() if isinstance(value, torch.Tensor))
    if plan.groups is not None:
        fixed += _tensor_bytes(plan.groups, reply_type)
    if hierarchy:
        fixed += model_input.tensor[0, 0].numel() * per_value["float"]
    return fixed + n_steps * per_step, per_step


def refuse_oversize_explanation(
    plan: ExplanationPlan, model_input: ModelInput, n_steps: int, keep_path: bool, reply_type: str, limit: int, seed_reply: bool,
    has_threshold: bool, hierarchy: bool = False, steps_option: str = "n_steps",
) -> None:
    """413 at once, before any gradient is computed, when the estimated reply is over `limit` bytes; n_steps is
    the most steps the request may use (its `steps_option`: n_steps, or max_steps of a tolerance).
    The message gives the hints that apply: fewer steps, return_path=false, gzip, or (where the model has a
    score threshold and the masks are a large part of the reply) a higher threshold."""
    estimate, per_step = estimate_explanation_bytes(plan, model_input, n_steps, keep_path, reply_type, hierarchy)
    if estimate <= limit:
        return
    hints = []
    fitting_steps = int((limit - (estimate - n_steps * per_step)) // per_step)
    if keep_path and fitting_steps >= 1:
        hints.append(f"{steps_option}={fitting_steps} or fewer fits")
    if keep_path:
        drop = "the seed reply's integrated_directional_grads and intermediates" if seed_reply else "the path gradients and intermediates"
        hints.append(f"\"return_path\": false drops {drop}")
    if reply_type in ("npz", "json"):
        hints.append("Accept: application/gzip is smaller")
    if has_threshold and plan.groups is not None and _tensor_bytes(plan.groups, reply_type) > limit / 4:
        hints.append(f"the {len(plan.groups)} masks are a large part: a higher 'threshold' gives fewer")
    raise RequestError(
        f"the reply would be about {estimate / 2**20:.1f} MiB ({n_steps} steps of a {'x'.join(map(str, model_input.tensor.shape[1:]))} input"
        f"{' with the path tensors' if keep_path else ''}), over this server's response limit of {limit / 2**20:.1f} MiB"
        + (f"; {'; '.join(hints)}" if hints else ""),
        status=413,
    )


def check_reply_size(body: bytes, limit: int, hint: str) -> bytes:
    """Refuse an encoded reply over the server's response limit with 413 instead of letting it kill the worker."""
    if len(body) > limit:
        raise RequestError(f"the reply is {len(body)} bytes, over this server's response limit of {limit} bytes; {hint}", status=413)
    return body

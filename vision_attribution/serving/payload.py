"""The explanation reply's document, and its size: estimated before any gradient is computed (413 at once when
it cannot fit the server's response limit), and checked once encoded."""
import dataclasses
from typing import Any

import torch

from ..adapters.base import ExplanationPlan, ModelInput
from ..attribution.engine import PathIntegral
from ..formats.errors import RequestError


def explanation_document(
    integral: PathIntegral, plan: ExplanationPlan, model_input: ModelInput, baseline: str, default_max_steps: int | None = None
) -> dict[str, Any]:
    """Reply to an explanation: the integral, the prediction at the input, what was explained, IDG per mask, and
    for a tolerance-driven explanation how its refinement ended (with `default_max_steps`, the archive's default
    max_steps, when it was lowered to what fits the response limit)."""
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
        if default_max_steps is not None:
            payload["refinement"]["default_max_steps"] = default_max_steps
    if plan.integral_summary is not None:
        payload.update(plan.integral_summary(integral))
    if plan.groups is not None:
        payload["idg_per_mask"] = {"idg": integral.idg, "dividends": integral.idg_dividends, "masks": plan.groups.cpu(), "labels": plan.group_labels}
    return payload


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


def steps_that_fit(plan: ExplanationPlan, model_input: ModelInput, keep_path: bool, reply_type: str, limit: int, hierarchy: bool = False) -> int:
    """The most path steps whose estimated reply fits `limit` bytes (0 when not even the fixed part fits)."""
    fixed, per_step = estimate_explanation_bytes(plan, model_input, 0, keep_path, reply_type, hierarchy)
    return max(0, int((limit - fixed) // per_step))


def refuse_oversize_explanation(
    plan: ExplanationPlan, model_input: ModelInput, n_steps: int, keep_path: bool, reply_type: str, limit: int, seed_reply: bool,
    has_threshold: bool, hierarchy: bool = False, steps_option: str = "n_steps",
) -> None:
    """413 at once, before any gradient is computed, when the estimated reply is over `limit` bytes; n_steps is
    the most steps the request may use (its `steps_option`: n_steps, or max_steps of a tolerance).
    The message gives the hints that apply: fewer steps, return_path=false, gzip, or (where the model has a
    score threshold and the masks are a large part of the reply) a higher threshold."""
    estimate, _ = estimate_explanation_bytes(plan, model_input, n_steps, keep_path, reply_type, hierarchy)
    if estimate <= limit:
        return
    hints = []
    fitting_steps = steps_that_fit(plan, model_input, keep_path, reply_type, limit, hierarchy)
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


def refuse_oversize_reply(size: int, limit: int, hint: str) -> None:
    """Refuse an encoded reply over the server's response limit with 413 instead of letting it kill the worker."""
    if size > limit:
        raise RequestError(f"the reply is {size} bytes, over this server's response limit of {limit} bytes; {hint}", status=413)

"""The explanation reply's document, and its size: estimated before any gradient is computed (413 at once when
it cannot fit the server's response limit), and checked once encoded."""
import dataclasses
from typing import Any, Optional

import torch

from ..adapters.base import ExplanationPlan, ModelInput
from ..attribution.engine import PathIntegral, integrated_directional_gradients
from ..attribution.path_sets import CombinedIntegral
from ..attribution.xrai import XraiRegions
from ..formats.errors import RequestError


def explanation_document(
    paths: list[PathIntegral], combined: Optional[CombinedIntegral], plan: ExplanationPlan, model_input: ModelInput,
    attribution: dict[str, Any], default_max_steps: int | None = None,
) -> dict[str, Any]:
    """Reply to an explanation of K >= 1 paths (combined: their CombinedIntegral where K > 1): the attribution, the
    prediction at the input, what was explained, IDG per mask, `attribution` (the method and its baselines), and for a
    tolerance-driven explanation how its refinement ended (with `default_max_steps`, the archive's default max_steps,
    when it was lowered to what fits the response limit).

    Over K paths, target_at_input, target_at_baseline and convergence_delta are the means of the paths' own; n_steps
    is the most steps of a path; alphas and step_sizes are given where every path has the same nodes; `paths` holds
    each path's figures and integrated_grads_std the spread of the paths' IG."""
    first = paths[0]
    payload: dict[str, Any] = {"integrated_grads": first.integrated_grads if combined is None else combined.attribution}
    if all(torch.equal(path.alphas, first.alphas) and torch.equal(path.step_sizes, first.step_sizes) for path in paths[1:]):
        payload.update(step_sizes=first.step_sizes.unsqueeze(1), alphas=first.alphas)
    if first.path_gradients is not None:
        payload["integrated_directional_grads"] = first.path_gradients
        payload["intermediates"] = first.intermediates
    payload.update(plan.prediction)
    payload.update(
        target=plan.target,
        target_at_input=_mean(path.target_at_input for path in paths),
        target_at_baseline=_mean(path.target_at_baseline for path in paths),
        convergence_delta=_mean(path.convergence_delta for path in paths),
        method=first.method,
        n_steps=max(len(path.alphas) for path in paths),
        baseline=attribution["baseline"],
        input_region=torch.tensor(model_input.region, dtype=torch.float64),
    )
    if first.refinement is not None:
        payload["refinement"] = dataclasses.asdict(first.refinement) if combined is None else _worst_refinement(paths)
        if default_max_steps is not None:
            payload["refinement"]["default_max_steps"] = default_max_steps
    if plan.integral_summary is not None:
        payload.update(plan.integral_summary(payload["integrated_grads"]))
    if plan.groups is not None:
        idg, dividends = (first.idg, first.idg_dividends) if combined is None else (combined.idg, combined.idg_dividends)
        payload["idg_per_mask"] = {"idg": idg, "dividends": dividends, "masks": plan.groups.cpu(), "labels": plan.group_labels}
    payload["attribution"] = attribution
    if combined is not None:
        payload["integrated_grads_std"] = combined.spread
        payload["paths"] = [_path_record(path) for path in paths]
    return payload


def xrai_document(regions: XraiRegions, attribution: torch.Tensor, difference: torch.Tensor) -> dict[str, Any]:
    """The reply's `xrai`: the ranked regions, and the IDG of the same regions (attribution, difference: (1, C, h, w))."""
    idg, dividends = integrated_directional_gradients(attribution, difference, regions.masks())
    return {"ranks": regions.ranks.to(torch.int32), "gains": regions.gains, "heatmap": regions.heatmap.float(), "idg": idg, "dividends": dividends}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _worst_refinement(paths: list[PathIntegral]) -> dict[str, Any]:
    """The refinement of K paths: met where every path met the tolerance, with the largest errors of any path."""
    refinements = [path.refinement for path in paths]
    return {
        "tolerance": refinements[0].tolerance, "max_steps": refinements[0].max_steps,
        "tolerance_met": all(refinement.tolerance_met for refinement in refinements),
        "relative_error": max(refinement.relative_error for refinement in refinements),
        "segment_error": max(refinement.segment_error for refinement in refinements),
    }  # fmt: skip


def _path_record(path: PathIntegral) -> dict[str, Any]:
    """One path's figures in the reply's `paths`."""
    record = {
        "target_at_input": path.target_at_input, "target_at_baseline": path.target_at_baseline,
        "convergence_delta": path.convergence_delta, "n_steps": len(path.alphas),
    }  # fmt: skip
    if path.refinement is not None:
        record.update(relative_error=path.refinement.relative_error, tolerance_met=path.refinement.tolerance_met)
    return record


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
    plan: ExplanationPlan, model_input: ModelInput, n_steps: int, keep_path: bool, reply_type: str, pixel_maps: int = 0,
    paths: int = 1,
) -> tuple[float, float]:
    """Estimated size of an explanation reply before it is computed: (total bytes, bytes per path step).

    The per-step part is the path tensors (2 x (C, h, w) float32 per step, with keep_path) and the
    quadrature coefficients; the rest is IG (C, h, w), the prediction already made, the IDG masks,
    `pixel_maps` (h, w) maps (the IDG hierarchy's label map, XRAI's ranks and gains), and over several paths the spread (C, h, w) and each path's figures.
    """
    per_value = _BYTES_PER_VALUE[reply_type]
    input_values = model_input.tensor[0].numel()
    per_step = 3 * per_value["float"] + (2 * input_values * per_value["float"] if keep_path else 0)
    fixed = input_values * per_value["float"]
    fixed += sum(_tensor_bytes(value, reply_type) for value in plan.prediction.values() if isinstance(value, torch.Tensor))
    if plan.groups is not None:
        fixed += _tensor_bytes(plan.groups, reply_type)
    fixed += pixel_maps * model_input.tensor[0, 0].numel() * per_value["float"]
    if paths > 1:
        fixed += (input_values + 6 * paths) * per_value["float"]
    return fixed + n_steps * per_step, per_step


def steps_that_fit(
    plan: ExplanationPlan, model_input: ModelInput, keep_path: bool, reply_type: str, limit: int, pixel_maps: int = 0, paths: int = 1
) -> int:
    """The most path steps whose estimated reply fits `limit` bytes (0 when not even the fixed part fits)."""
    fixed, per_step = estimate_explanation_bytes(plan, model_input, 0, keep_path, reply_type, pixel_maps, paths)
    return max(0, int((limit - fixed) // per_step))


def refuse_oversize_explanation(
    plan: ExplanationPlan, model_input: ModelInput, n_steps: int, keep_path: bool, reply_type: str, limit: int, seed_reply: bool,
    has_threshold: bool, pixel_maps: int = 0, steps_option: str = "n_steps", paths: int = 1,
) -> None:
    """413 at once, before any gradient is computed, when the estimated reply is over `limit` bytes; n_steps is
    the most steps the request may use (its `steps_option`: n_steps, or max_steps of a tolerance).
    The message gives the hints that apply: fewer steps, return_path=false, gzip, or (where the model has a
    score threshold and the masks are a large part of the reply) a higher threshold."""
    estimate, _ = estimate_explanation_bytes(plan, model_input, n_steps, keep_path, reply_type, pixel_maps, paths)
    if estimate <= limit:
        return
    hints = []
    fitting_steps = steps_that_fit(plan, model_input, keep_path, reply_type, limit, pixel_maps, paths)
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

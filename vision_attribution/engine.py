"""The attribution engine: one pass of path gradients gives IG, path gradients, IDG and the completeness delta.

For an input x, a baseline x' and a scalar target F, the straight path x_k = x' + alpha_k (x - x') is
sampled at the nodes of a quadrature rule, the gradients g_k = dF/dx (x_k) are computed in chunks of
`internal_batch_size` path points, and everything is derived from those gradients:

    IG        = (x - x') * sum_k w_k g_k
    IDG(S)    = sum_k w_k <g_k, z_S / |z_S|>,   z_S = (x - x') * 1_S   (Sikdar et al., 2021)
    dividend  = |IDG(S)| / sum_T |IDG(T)|
    delta     = F(x) - F(x') - sum(IG)

IDG is linear in the gradients, so IDG(S) = sum(IG over S) / |z_S|: no second pass is ever needed.
"""
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .quadrature import path_coefficients

TargetFunction = Callable[[torch.Tensor], torch.Tensor]
"""Maps path points (b, C, H, W) to one differentiable scalar each, (b,)."""


@dataclass
class PathIntegral:
    """What one pass of path gradients gives for one input of shape (1, C, H, W); n = number of steps."""

    integrated_grads: torch.Tensor  # (1, C, H, W), dtype of the input
    alphas: torch.Tensor  # (n,) float64, path positions
    step_sizes: torch.Tensor  # (n,) float64, quadrature weights
    target_at_input: float  # F(x)
    target_at_baseline: float  # F(x')
    convergence_delta: float  # F(x) - F(x') - sum(IG)
    path_gradients: Optional[torch.Tensor] = None  # (n, C, H, W) float32 on CPU, row k = step k
    intermediates: Optional[torch.Tensor] = None  # (n, C, H, W) float32 on CPU, the path points x_k
    idg: Optional[torch.Tensor] = None  # (M,) float64, IDG per group
    idg_dividends: Optional[torch.Tensor] = None  # (M,) float64, sums to 1 unless every IDG is 0


def integrate_path(
    target_fn: TargetFunction,
    inputs: torch.Tensor,
    baseline: torch.Tensor,
    *,
    n_steps: int = 50,
    method: str = "gausslegendre",
    internal_batch_size: int = 16,
    groups: Optional[torch.Tensor] = None,
    keep_path: bool = False,
) -> PathIntegral:
    """Integrate the gradients of `target_fn` along the straight path from `baseline` to `inputs`.

    inputs, baseline: (1, C, H, W) on the model's device. groups: boolean masks (M, H, W) or
    (M, 1|C, H, W) for IDG, or None. keep_path: also return the path gradients and path points
    (memory then grows with n_steps; otherwise it is bounded by one chunk).
    """
    if inputs.dim() != 4 or inputs.shape[0] != 1 or baseline.shape != inputs.shape:
        raise ValueError(f"inputs and baseline must both be (1, C, H, W), got {tuple(inputs.shape)} and {tuple(baseline.shape)}")
    if internal_batch_size < 1:
        raise ValueError(f"internal_batch_size must be positive, got {internal_batch_size}")
    alphas, weights = path_coefficients(method, n_steps)
    inputs, baseline = inputs.detach(), baseline.detach()
    difference = inputs - baseline
    weighted_gradient_sum = torch.zeros_like(inputs)  # accumulated in the input's dtype, as Captum does
    kept_gradients, kept_points = [], []

    for start in range(0, n_steps, internal_batch_size):
        chunk_alphas = alphas[start : start + internal_batch_size].to(inputs.device, inputs.dtype)
        chunk_weights = weights[start : start + internal_batch_size].to(inputs.device, inputs.dtype)
        points = (baseline + chunk_alphas.view(-1, 1, 1, 1) * difference).requires_grad_(True)
        with torch.enable_grad():
            targets = target_fn(points)
            if targets.shape != (points.shape[0],):
                raise ValueError(f"target function must return shape ({points.shape[0]},), got {tuple(targets.shape)}")
            (gradients,) = torch.autograd.grad(targets.sum(), points)
        weighted_gradient_sum += torch.einsum("k,kchw->chw", chunk_weights, gradients).unsqueeze(0)
        if keep_path:
            kept_gradients.append(gradients.detach().to("cpu", torch.float32))
            kept_points.append(points.detach().to("cpu", torch.float32))

    integrated = difference.double() * weighted_gradient_sum.double()
    with torch.no_grad():
        endpoint_targets = target_fn(torch.cat([inputs, baseline])).double().cpu()
    target_at_input, target_at_baseline = endpoint_targets.tolist()
    result = PathIntegral(
        integrated_grads=integrated.to(inputs.dtype),
        alphas=alphas,
        step_sizes=weights,
        target_at_input=target_at_input,
        target_at_baseline=target_at_baseline,
        convergence_delta=target_at_input - target_at_baseline - float(integrated.sum()),
    )
    if keep_path:
        result.path_gradients = torch.cat(kept_gradients)
        result.intermediates = torch.cat(kept_points)
    if groups is not None:
        result.idg, result.idg_dividends = integrated_directional_gradients(integrated, difference, groups)
    return result


def integrated_directional_gradients(
    integrated_grads: torch.Tensor, difference: torch.Tensor, groups: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """IDG(S) = sum(IG over S) / |(x - x') * 1_S| for each group S, and the dividends |IDG| / sum |IDG|.

    integrated_grads, difference: (1, C, H, W). groups: boolean (M, H, W) or (M, 1|C, H, W).
    Returns two float64 tensors of shape (M,) on the CPU; a group with |z_S| = 0 gets IDG 0.
    """
    channels = difference.shape[1]
    masks = groups.to(difference.device)
    if masks.dim() == 3:
        masks = masks.unsqueeze(1)
    if masks.dim() != 4 or masks.shape[1] not in (1, channels) or masks.shape[2:] != difference.shape[2:]:
        raise ValueError(f"groups must be (M, H, W) or (M, 1|{channels}, H, W) over a {tuple(difference.shape[2:])} input, got {tuple(groups.shape)}")
    masks = masks.double()
    ig, squared = integrated_grads[0].double(), difference[0].double() ** 2
    if masks.shape[1] == 1:
        ig, squared, masks = ig.sum(0), squared.sum(0), masks[:, 0]
        numerator = torch.einsum("mhw,hw->m", masks, ig)
        norm = torch.einsum("mhw,hw->m", masks, squared).sqrt()
    else:
        numerator = torch.einsum("mchw,chw->m", masks, ig)
        norm = torch.einsum("mchw,chw->m", masks, squared).sqrt()
    idg = torch.where(norm > 0, numerator / norm.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(norm))
    total = idg.abs().sum()
    dividends = idg.abs() / total if total > 0 else torch.zeros_like(idg)
    return idg.cpu(), dividends.cpu()

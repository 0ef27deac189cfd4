"""Quadrature rules on [0, 1] for path integrals: where to sample the path and how to weight it."""
import numpy as np
import torch

METHODS = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")


def path_coefficients(method: str, n_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (alphas, weights), both float64 of shape (n_steps,), alphas ascending, weights summing to 1.

    gausslegendre: alpha_k = (1 + t_k) / 2 and w_k = omega_k / 2 for the Legendre nodes t_k and weights
    omega_k, so the endpoints are never sampled. riemann_left/right/middle: alpha_k = k/n, (k+1)/n,
    (k+1/2)/n with w_k = 1/n. riemann_trapezoid: alpha_k = k/(n-1) with weights h/2, h, ..., h, h/2 for
    h = 1/(n-1) (the true trapezoid rule; Captum's version weights 1/n and sums to 1 - 1/n).
    """
    if method not in METHODS:
        raise ValueError(f"unknown integration method {method!r}; choose one of {', '.join(METHODS)}")
    if n_steps < 1 or (method == "riemann_trapezoid" and n_steps < 2):
        raise ValueError(f"n_steps must be at least {2 if method == 'riemann_trapezoid' else 1}, got {n_steps}")
    k = np.arange(n_steps, dtype=np.float64)
    if method == "gausslegendre":
        nodes, omegas = np.polynomial.legendre.leggauss(n_steps)
        alphas, weights = 0.5 * (1.0 + nodes), 0.5 * omegas
    elif method == "riemann_trapezoid":
        h = 1.0 / (n_steps - 1)
        alphas = k * h
        weights = np.full(n_steps, h)
        weights[[0, -1]] = h / 2
    else:
        offset = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}[method]
        alphas, weights = (k + offset) / n_steps, np.full(n_steps, 1.0 / n_steps)
    return torch.from_numpy(alphas), torch.from_numpy(weights)

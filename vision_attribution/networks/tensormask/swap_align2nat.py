"""SwapAlign2Nat (TensorMask, arXiv:1903.12174) in plain PyTorch.

Input X has shape (N, V*U, H, W) with V == U: at every spatial location (y, x) of the
"aligned" representation it holds a V x U mask window.  The op swaps the unit lengths of
(V, U) and (H, W) by a factor ``lambda_val`` and converts to the "natural" representation:
the output has shape (N, V'*U', H', W') with V' = lambda*V, U' = lambda*U,
H' = ceil(H / lambda), W' = ceil(W / lambda).

Output element (n, v, u, y, x) is a 4-D multilinear interpolation of X at
    mask coordinates   (v + 0.5) / lambda - 0.5,  (u + 0.5) / lambda - 0.5
    spatial coordinates y * lambda + v - V'/2 + 0.5,  x * lambda + u - U'/2 + 0.5
where any of the 16 corners outside X reads ``pad_val``.  These are the semantics of
detectron2's CUDA kernel (SwapAlign2Nat_cuda.cu).  The gradient flows through autograd
(a gather forward, an index-add backward); padded corners receive no gradient.

The fractional parts of the coordinates depend only on (v, u), so each of the 16 corner
weights is a (V', U') table, and the corner reads are one vectorised gather each.
"""
import itertools
import math
from typing import List, Tuple

import torch
import torch.nn.functional as F

__all__ = ["swap_align2nat", "swap_align2nat_at_locations"]

# A tap along one (mask axis, spatial axis) pair: (weight (M',), mask index (M',),
# spatial offset (M',)); indices are in coordinates of the input padded by 1 on each side.
_Tap = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _axis_taps(lambda_val: int, mask_len: int, device) -> List[_Tap]:
    """The 4 interpolation taps of one axis pair, e.g. (V, H).

    One tap per combination of mask-axis corner (floor, floor+1) and spatial-axis corner
    (floor, floor+1): (weight (M',) float64, padded mask index (M',) int64, spatial offset
    (M',) int64). The spatial index of output position p is ``p * lambda + offset``.
    """
    out_len = lambda_val * mask_len
    m = torch.arange(out_len, dtype=torch.float64, device=device)
    mask_coord = (m + 0.5) / lambda_val - 0.5
    mask_floor = torch.floor(mask_coord)
    mask_frac = mask_coord - mask_floor
    spatial_shift = m - out_len / 2.0 + 0.5
    spatial_floor = torch.floor(spatial_shift)
    spatial_frac = spatial_shift - spatial_floor

    taps = []
    for mask_tap, mask_weight in ((0, 1.0 - mask_frac), (1, mask_frac)):
        mask_index = (mask_floor.long() + mask_tap).clamp(-1, mask_len) + 1
        for spatial_tap, spatial_weight in ((0, 1.0 - spatial_frac), (1, spatial_frac)):
            taps.append(
                (mask_weight * spatial_weight, mask_index, spatial_floor.long() + spatial_tap)
            )
    return taps


def _check_input(x: torch.Tensor, lambda_val: int) -> int:
    if x.dim() != 4:
        raise ValueError(f"SwapAlign2Nat expects (N, V*U, H, W), got shape {tuple(x.shape)}")
    if int(lambda_val) != lambda_val or lambda_val < 1:
        raise ValueError(f"lambda_val must be an integer >= 1, got {lambda_val}")
    mask_len = math.isqrt(x.shape[1])
    if mask_len * mask_len != x.shape[1]:
        raise ValueError(f"number of channels must be a square, got {x.shape[1]}")
    return mask_len


def _padded_flat(x: torch.Tensor, mask_len: int, pad_val: float) -> torch.Tensor:
    """(N, V*U, H, W) -> (N, (V+2)*(U+2)*(H+2)*(W+2)), every border filled with pad_val."""
    n, _, h, w = x.shape
    x5 = x.reshape(n, mask_len, mask_len, h, w)
    return F.pad(x5, (1, 1, 1, 1, 1, 1, 1, 1), value=pad_val).reshape(n, -1)


def _sample(
    x_flat: torch.Tensor,
    mask_len: int,
    height: int,
    width: int,
    lambda_val: int,
    rows: torch.Tensor,
    cols: torch.Tensor,
    index_base: torch.Tensor,
    layout,
) -> torch.Tensor:
    """Sum of the 16 weighted corner gathers.

    rows, cols: (P,) int64 output positions. ``layout(v_term, u_term, row_term, col_term,
    weight)`` broadcasts the per-axis index terms ((V',), (U',), (V', P), (U', P)) and the
    (V', U') corner weight into the output layout; index_base (batch offsets) is added.
    """
    padded_w = width + 2
    plane = (height + 2) * padded_w
    taps = _axis_taps(lambda_val, mask_len, x_flat.device)
    out = None
    for (wv, vi, row_off), (wu, ui, col_off) in itertools.product(taps, taps):
        weight = wv[:, None] * wu[None, :]
        if not bool(weight.any()):
            continue
        row_index = rows[None] * lambda_val + row_off[:, None]
        col_index = cols[None] * lambda_val + col_off[:, None]
        row_term = (row_index.clamp(-1, height) + 1) * padded_w
        col_term = col_index.clamp(-1, width) + 1
        v_term = vi * (mask_len + 2) * plane
        u_term = ui * plane
        index, weight = layout(v_term, u_term, row_term, col_term, weight)
        index = index + index_base
        # index_select on a 1-D view is much faster on CPU than take() or advanced indexing
        gathered = x_flat.reshape(-1).index_select(0, index.reshape(-1)).view(index.shape)
        term = gathered * weight.to(x_flat.dtype)
        out = term if out is None else out.add_(term)
    return out


def swap_align2nat(x: torch.Tensor, lambda_val: int, pad_val: float = -6.0) -> torch.Tensor:
    """Dense SwapAlign2Nat: (N, V*U, H, W) -> (N, (lambda*V)*(lambda*U), ceil(H/l), ceil(W/l))."""
    mask_len = _check_input(x, lambda_val)
    n, _, height, width = x.shape
    out_h, out_w = -(-height // lambda_val), -(-width // lambda_val)
    out_mask = lambda_val * mask_len
    if n == 0 or out_h == 0 or out_w == 0:
        return x.new_zeros((n, out_mask * out_mask, out_h, out_w))
    x_flat = _padded_flat(x, mask_len, pad_val)
    rows = torch.arange(out_h, device=x.device)
    cols = torch.arange(out_w, device=x.device)

    def dense_layout(v_term, u_term, row_term, col_term, weight):
        # index layout (V', U', H', W'); row_term (V', H'), col_term (U', W')
        vr = v_term[:, None] + row_term  # (V', H')
        uc = u_term[:, None] + col_term  # (U', W')
        index = vr[:, None, :, None] + uc[None, :, None, :]
        return index, weight[:, :, None, None]

    batch_offsets = torch.arange(n, device=x.device).view(n, 1, 1, 1, 1) * x_flat.shape[1]
    out = _sample(
        x_flat, mask_len, height, width, lambda_val, rows, cols, batch_offsets, dense_layout
    )
    return out.reshape(n, out_mask * out_mask, out_h, out_w)


def swap_align2nat_at_locations(
    x: torch.Tensor,
    lambda_val: int,
    batch_index: torch.Tensor,
    ys: torch.Tensor,
    xs: torch.Tensor,
    pad_val: float = -6.0,
) -> torch.Tensor:
    """SwapAlign2Nat evaluated only at K output locations.

    x (N, V*U, H, W); batch_index, ys, xs (K,) int64 output-grid positions.
    Returns (K, lambda*V, lambda*U): equal to
    ``swap_align2nat(x, lambda_val, pad_val)[batch_index, :, ys, xs]`` reshaped to masks.
    """
    mask_len = _check_input(x, lambda_val)
    _, _, height, width = x.shape
    out_mask = lambda_val * mask_len
    if batch_index.numel() == 0:
        return x.new_zeros((0, out_mask, out_mask))
    x_flat = _padded_flat(x, mask_len, pad_val)

    def point_layout(v_term, u_term, row_term, col_term, weight):
        # index layout (K, V', U'); row_term (V', K), col_term (U', K)
        vr = (v_term[:, None] + row_term).t()  # (K, V')
        uc = (u_term[:, None] + col_term).t()  # (K, U')
        return vr[:, :, None] + uc[:, None, :], weight[None]

    batch_offsets = batch_index.view(-1, 1, 1) * x_flat.shape[1]
    return _sample(
        x_flat, mask_len, height, width, lambda_val, ys, xs, batch_offsets, point_layout
    )

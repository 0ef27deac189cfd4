"""SwapAlign2Nat against a slow per-element transcription of detectron2's CUDA kernel."""
import math

import pytest
import torch

from vision_attribution.networks.tensormask.swap_align2nat import (
    swap_align2nat,
    swap_align2nat_at_locations,
)


def reference_swap_align2nat(x, lambda_val, pad_val):
    """One output element at a time, exactly as SwapAlign2NatForwardFeat computes it."""
    n_img, channels, h_in, w_in = x.shape
    v_in = u_in = math.isqrt(channels)
    v_out, u_out = lambda_val * v_in, lambda_val * u_in
    h_out, w_out = math.ceil(h_in / lambda_val), math.ceil(w_in / lambda_val)
    x5 = x.reshape(n_img, v_in, u_in, h_in, w_in)

    def pixel(n, y, xx, v, u):
        if 0 <= y < h_in and 0 <= xx < w_in and 0 <= v < v_in and 0 <= u < u_in:
            return x5[n, v, u, y, xx]
        return x.new_tensor(pad_val)

    out = []
    for n in range(n_img):
        for v in range(v_out):
            for u in range(u_out):
                for y in range(h_out):
                    for xx in range(w_out):
                        ox = xx * lambda_val + u - u_out / 2 + 0.5
                        oy = y * lambda_val + v - v_out / 2 + 0.5
                        ou = (u + 0.5) / lambda_val - 0.5
                        ov = (v + 0.5) / lambda_val - 0.5
                        xf, yf, uf, vf = (math.floor(c) for c in (ox, oy, ou, ov))
                        xc, yc, uc, vc = (math.ceil(c) for c in (ox, oy, ou, ov))
                        total = x.new_zeros(())
                        for yi, wy in ((yf, 1 - (oy - yf)), (yc, oy - yf)):
                            for xi, wx in ((xf, 1 - (ox - xf)), (xc, ox - xf)):
                                for vi, wv in ((vf, 1 - (ov - vf)), (vc, ov - vf)):
                                    for ui, wu in ((uf, 1 - (ou - uf)), (uc, ou - uf)):
                                        total = total + wy * wx * wv * wu * pixel(n, yi, xi, vi, ui)
                        out.append(total)
    return torch.stack(out).reshape(n_img, v_out * u_out, h_out, w_out)


CASES = [  # (N, V, H, W, lambda)
    (1, 1, 3, 4, 1),
    (2, 3, 4, 5, 1),
    (1, 2, 5, 3, 2),
    (2, 3, 5, 6, 2),
    (1, 2, 7, 5, 4),
    (1, 3, 4, 4, 3),
]


@pytest.mark.parametrize("n,v,h,w,lam", CASES)
def test_forward_matches_reference(n, v, h, w, lam):
    torch.manual_seed(0)
    x = torch.randn(n, v * v, h, w, dtype=torch.float64)
    expected = reference_swap_align2nat(x, lam, -6.0)
    actual = swap_align2nat(x, lam, -6.0)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n,v,h,w,lam", CASES[:5])
def test_gradient_matches_reference(n, v, h, w, lam):
    torch.manual_seed(1)
    x = torch.randn(n, v * v, h, w, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: swap_align2nat(t, lam, -6.0), (x,))
    upstream = torch.randn_like(swap_align2nat(x, lam, -6.0))
    (grad,) = torch.autograd.grad((swap_align2nat(x, lam, -6.0) * upstream).sum(), x)
    (grad_ref,) = torch.autograd.grad((reference_swap_align2nat(x, lam, -6.0) * upstream).sum(), x)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("lam", [1, 2, 4])
def test_locations_match_dense(lam):
    torch.manual_seed(2)
    x = torch.randn(2, 9, 9, 7)
    dense = swap_align2nat(x, lam)
    n_out, _, h_out, w_out = dense.shape
    grid = torch.cartesian_prod(torch.arange(n_out), torch.arange(h_out), torch.arange(w_out))
    masks = swap_align2nat_at_locations(x, lam, grid[:, 0], grid[:, 1], grid[:, 2])
    expected = dense[grid[:, 0], :, grid[:, 1], grid[:, 2]].reshape(masks.shape)
    torch.testing.assert_close(masks, expected)


def test_rejects_non_square_channels():
    with pytest.raises(ValueError):
        swap_align2nat(torch.zeros(1, 6, 3, 3), 2)

"""Compiled closed-form gradient of ``levelset.evolution_energy`` and the Adam loop on it.

Pixels are the ragged layout of ``levelset.BoxPixels``: boxes one after another, row-major
inside a box, so the right neighbour of pixel k is k + 1 and the one below is k + width.

Region term: with c1, c2 the p- and (1-p)-weighted means (Eq. 4), dE/dc = 0 at those
means, so dE/dp(x) = sum_c [(I-c1)^2 - (I-c2)^2] / (C n) exactly.

Histogram term (optional): E = -sum_b h_in(b) log(h_in(b) / |h_in|) - the same for h_out,
with h_in(b) the sum of p over the pixels in bin b and h_out that of 1 - p plus fixed ring
counts; for the same reason dE/dp(x) = -log(h_in / |h_in|) + log(h_out / |h_out|) at x's bin.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_EPS = 1e-5
HIST_PRIOR = 0.5  # pseudo-count per histogram bin (levelset adds it to the ring counts too)


class _Layout:
    """Index arrays the gradient needs, computed once per evolution (not per step)."""

    def __init__(self, inst, lx, ly, widths, heights):
        n = widths.shape[0]
        self.args = (
            inst, lx, ly, widths, heights,
            (np.cumsum(widths) - widths)[inst] + lx,  # column slot of each pixel
            (np.cumsum(heights) - heights)[inst] + ly,  # row slot of each pixel
            np.repeat(np.arange(n), widths),  # box owning each column slot
            np.repeat(np.arange(n), heights),  # box owning each row slot
        )


@njit(cache=True)
def _projection_grad(p, slot, owner, sizes, alpha, n, gp):  # pragma: no cover
    # Max-projection of p into slots (columns or rows of every box), then the gradient
    # of alpha x the 1-D dice against an all-ones target back onto the arg-max pixels.
    n_slots = owner.shape[0]
    proj = np.full(n_slots, -1.0)
    arg = np.zeros(n_slots, np.int64)
    for k in range(p.shape[0]):
        j = slot[k]
        if p[k] > proj[j]:
            proj[j] = p[k]
            arg[j] = k
    s1 = np.zeros(n)
    s2 = np.zeros(n)
    for j in range(n_slots):
        s1[owner[j]] += proj[j]
        s2[owner[j]] += proj[j] * proj[j]
    for j in range(n_slots):
        i = owner[j]
        u = s2[i] + sizes[i] + _EPS
        gp[arg[j]] += alpha * (-2.0 * u + 4.0 * s1[i] * proj[j]) / (u * u)


@njit(cache=True)
def _gradient(
    phi, feats, bins, ring, hist_weight, wr, wd, inst, lx, ly, widths, heights, col_slot, row_slot,
    col_owner, row_owner, gamma, alpha, border, grad,
):  # pragma: no cover
    n_pix, n_ch = feats.shape
    n = widths.shape[0]
    p = np.empty(n_pix)
    for k in range(n_pix):
        p[k] = 1.0 / (1.0 + np.exp(-phi[k]))
    sp = np.zeros(n)
    sq = np.zeros(n)
    c1 = np.zeros((n, n_ch))
    c2 = np.zeros((n, n_ch))
    for k in range(n_pix):
        i = inst[k]
        sp[i] += p[k]
        sq[i] += 1.0 - p[k]
        for c in range(n_ch):
            c1[i, c] += p[k] * feats[k, c]
            c2[i, c] += (1.0 - p[k]) * feats[k, c]
    for i in range(n):
        for c in range(n_ch):
            c1[i, c] /= max(sp[i], _EPS)
            c2[i, c] /= max(sq[i], _EPS)
    # Histogram region competition: -log h_in + log h_out per channel, h_out also counting
    # the ring of pixels around the box (known background, given in ring with the prior).
    n_bins = ring.shape[2]
    log_ratio = np.zeros((n, n_ch, n_bins))
    if hist_weight > 0:
        h1 = np.full((n, n_ch, n_bins), HIST_PRIOR)
        h2 = ring.copy()
        for k in range(n_pix):
            i = inst[k]
            for c in range(n_ch):
                h1[i, c, bins[k, c]] += p[k]
                h2[i, c, bins[k, c]] += 1.0 - p[k]
        for i in range(n):
            for c in range(n_ch):
                t1 = h1[i, c].sum()
                t2 = h2[i, c].sum()
                for b in range(n_bins):
                    log_ratio[i, c, b] = np.log(h2[i, c, b] / t2) - np.log(h1[i, c, b] / t1)
    gp = np.zeros(n_pix)
    for k in range(n_pix):
        i = inst[k]
        w = widths[i]
        count = w * heights[i]
        d = 0.0
        h = 0.0
        for c in range(n_ch):
            a = feats[k, c] - c1[i, c]
            b = feats[k, c] - c2[i, c]
            d += a * a - b * b
            h += log_ratio[i, c, bins[k, c]]
        gp[k] += (d + hist_weight * h) / (n_ch * count)
        # Length term: |p(right) - p(k)| and |p(below) - p(k)| inside the box.
        g = gamma / np.sqrt(count)
        if lx[k] < w - 1:
            s = np.sign(p[k + 1] - p[k]) * g * wr[k]
            gp[k + 1] += s
            gp[k] -= s
        if ly[k] < heights[i] - 1:
            s = np.sign(p[k + w] - p[k]) * g * wd[k]
            gp[k + w] += s
            gp[k] -= s
        # Box edge: p against the background beyond it, a link of weight border per side.
        sides = (lx[k] == 0) + (lx[k] == w - 1) + (ly[k] == 0) + (ly[k] == heights[i] - 1)
        gp[k] += g * border * sides
    _projection_grad(p, col_slot, col_owner, widths.astype(np.float64), alpha, n, gp)
    _projection_grad(p, row_slot, row_owner, heights.astype(np.float64), alpha, n, gp)
    for k in range(n_pix):
        grad[k] = gp[k] * p[k] * (1.0 - p[k])


@njit(cache=True)
def _adam(phi, feats, args, iterations, lr, gamma, alpha, border):  # pragma: no cover
    n_pix = phi.shape[0]
    grad = np.zeros(n_pix)
    m = np.zeros(n_pix)
    v = np.zeros(n_pix)
    b1, b2, eps = 0.9, 0.999, 1e-8
    for t in range(1, iterations + 1):
        _gradient(phi, feats, *args, gamma, alpha, border, grad)
        c1 = 1.0 - b1**t
        c2 = 1.0 - b2**t
        for k in range(n_pix):
            m[k] = b1 * m[k] + (1.0 - b1) * grad[k]
            v[k] = b2 * v[k] + (1.0 - b2) * grad[k] * grad[k]
            phi[k] -= lr * (m[k] / c1) / (np.sqrt(v[k] / c2) + eps)


def _kernel_args(feats, inst, lx, ly, widths, heights, hist, edges) -> tuple:
    """Everything _gradient takes between feats and gamma: the histogram term (a dummy
    single bin with weight 0 when hist is None), the link weights (ones when edges is
    None) and the index layout."""
    n_pix = feats.shape[0]
    if hist is None:
        hist_args = (np.zeros(feats.shape, np.int64), np.ones((widths.shape[0], feats.shape[1], 1)),
                     0.0)
    else:
        bins, ring, weight = hist
        hist_args = (np.ascontiguousarray(bins, np.int64), np.ascontiguousarray(ring, np.float64),
                     float(weight))
    if edges is None:
        edge_args = (np.ones(n_pix), np.ones(n_pix))
    else:
        edge_args = tuple(np.ascontiguousarray(e, np.float64) for e in edges)
    return hist_args + edge_args + _Layout(inst, lx, ly, widths, heights).args


def energy_gradient(
    phi, feats, inst, lx, ly, widths, heights, gamma, alpha, grad, hist=None, edges=None,
    border=0.0,
) -> None:
    """Write d(sum of evolution energies)/d phi into grad (float64 arithmetic); hist is
    None or (bins [P, C], ring counts [N, C, bins], weight) for the histogram term, edges
    None or the (right, down) link weights of the length term, border the weight of the
    length along the box's edge."""
    args = _kernel_args(feats, inst, lx, ly, widths, heights, hist, edges)
    _gradient(np.asarray(phi, np.float64), feats, *args, gamma, alpha, float(border), grad)


def adam_evolve(
    phi, feats, inst, lx, ly, widths, heights, iterations, lr, gamma, alpha, hist=None,
    edges=None, border=0.0,
) -> None:
    """Adam (betas 0.9, 0.999, eps 1e-8, as torch.optim.Adam) on phi (float64), in place."""
    args = _kernel_args(feats, inst, lx, ly, widths, heights, hist, edges)
    _adam(phi, feats, args, iterations, float(lr), float(gamma), float(alpha), float(border))

"""Compiled closed-form gradient of ``levelset.evolution_energy`` and the Adam loop on it.

Pixels are the ragged layout of ``levelset.BoxPixels``: boxes one after another, row-major
inside a box, so the right neighbour of pixel k is k + 1 and the one below is k + width.

Region term: with c1, c2 the p- and (1-p)-weighted means (Eq. 4), dE/dc = 0 at those
means, so dE/dp(x) = sum_c [(I-c1)^2 - (I-c2)^2] / (C n) exactly.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_EPS = 1e-5


@njit(cache=True)
def _projection_grad(p, slot, owner, n_slots, sizes_of_owner, alpha, n, gp):  # pragma: no cover
    # Max-projection of p into slots (columns or rows of every box), then the gradient
    # of alpha x the 1-D dice against an all-ones target back onto the arg-max pixels.
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
        u = s2[i] + sizes_of_owner[i] + _EPS
        gp[arg[j]] += alpha * (-2.0 * u + 4.0 * s1[i] * proj[j]) / (u * u)


@njit(cache=True)
def energy_gradient(phi, feats, inst, lx, ly, widths, heights, gamma, alpha, grad):  # pragma: no cover
    """Write d(sum of evolution energies)/d phi into grad (float64 arithmetic)."""
    n_pix, n_ch = feats.shape
    n = widths.shape[0]
    p = 1.0 / (1.0 + np.exp(-phi.astype(np.float64)))
    sp = np.zeros(n)
    sq = np.zeros(n)
    s1 = np.zeros((n, n_ch))
    s2 = np.zeros((n, n_ch))
    for k in range(n_pix):
        i = inst[k]
        sp[i] += p[k]
        sq[i] += 1.0 - p[k]
        for c in range(n_ch):
            s1[i, c] += p[k] * feats[k, c]
            s2[i, c] += (1.0 - p[k]) * feats[k, c]
    gp = np.zeros(n_pix)
    for k in range(n_pix):
        i = inst[k]
        count = widths[i] * heights[i]
        d = 0.0
        for c in range(n_ch):
            a = feats[k, c] - s1[i, c] / max(sp[i], _EPS)
            b = feats[k, c] - s2[i, c] / max(sq[i], _EPS)
            d += a * a - b * b
        gp[k] += d / (n_ch * count)
        # Length term: |p(right) - p(k)| and |p(below) - p(k)| inside the box.
        g = gamma / np.sqrt(count)
        if lx[k] < widths[i] - 1:
            s = np.sign(p[k + 1] - p[k]) * g
            gp[k + 1] += s
            gp[k] -= s
        if ly[k] < heights[i] - 1:
            s = np.sign(p[k + widths[i]] - p[k]) * g
            gp[k + widths[i]] += s
            gp[k] -= s
    # Box projection on x (columns) and y (rows).
    col_off = np.cumsum(widths) - widths
    row_off = np.cumsum(heights) - heights
    col_slot = col_off[inst] + lx
    row_slot = row_off[inst] + ly
    n_cols = int(widths.sum())
    n_rows = int(heights.sum())
    col_owner = np.repeat(np.arange(n), widths)
    row_owner = np.repeat(np.arange(n), heights)
    _projection_grad(p, col_slot, col_owner, n_cols, widths.astype(np.float64), alpha, n, gp)
    _projection_grad(p, row_slot, row_owner, n_rows, heights.astype(np.float64), alpha, n, gp)
    for k in range(n_pix):
        grad[k] = gp[k] * p[k] * (1.0 - p[k])


@njit(cache=True)
def adam_evolve(
    phi, feats, inst, lx, ly, widths, heights, iterations, lr, gamma, alpha
):  # pragma: no cover
    """Adam (betas 0.9, 0.999, eps 1e-8, as torch.optim.Adam) on phi, in place."""
    n_pix = phi.shape[0]
    grad = np.zeros(n_pix)
    m = np.zeros(n_pix)
    v = np.zeros(n_pix)
    b1, b2, eps = 0.9, 0.999, 1e-8
    for t in range(1, iterations + 1):
        energy_gradient(phi, feats, inst, lx, ly, widths, heights, gamma, alpha, grad)
        c1 = 1.0 - b1**t
        c2 = 1.0 - b2**t
        for k in range(n_pix):
            m[k] = b1 * m[k] + (1.0 - b1) * grad[k]
            v[k] = b2 * v[k] + (1.0 - b2) * grad[k] * grad[k]
            phi[k] -= lr * (m[k] / c1) / (np.sqrt(v[k] / c2) + eps)

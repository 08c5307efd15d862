"""Exact minimum-spanning-tree filter (Song et al., NeurIPS 2019; Tree Energy Loss, CVPR 2022).

For every image the 4-connected pixel grid is reduced to its minimum spanning tree (edge cost =
squared distance between guide vectors).  Each tree edge from a vertex ``v`` to its parent gets the
weight ``w_v = exp(-|g_v - g_parent|^2 / sigma)``, and the filter is

    out(v) = sum_u S[v, u] x(u) / sum_u S[v, u],     S[v, u] = product of w along the tree path u-v,

computed exactly in O(pixels) by two sweeps over a breadth-first order of the tree:

    up   (leaves -> root):  A(v) = x(v) + sum_{children c} w_c A(c)
    down (root -> leaves):  O(root) = A(root),  O(v) = A(v) (1 - w_v^2) + w_v O(parent(v))

The normaliser Z = S 1 is the same sweep on an all-ones channel, appended to the C channels so all
of them share one tree and one pass.  The backward pass is the exact adjoint of the two sweeps (also
O(pixels)): it gives the gradient wrt x (which equals S grad, S being symmetric) and wrt the edge
weights; autograd chains the latter into the guide through ``w = exp(-d / sigma)``.

The sweeps are numba-compiled (cached on disk) and run in float64 whatever the input dtype; they
recompute rather than store their intermediates, so backward keeps only x and the weights.  CUDA
tensors are filtered on the CPU and moved back: the tree is inherently sequential, and this portable
path is exact (its cost is the device<->host copies of x and of the gradient).
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import breadth_first_order, minimum_spanning_tree

__all__ = ["tree_filter", "spanning_tree"]

# scipy's csgraph drops zero-weight edges; flat guide regions must still give a spanning tree.
_TIE_EPS = 1e-12


def _grid_edges(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Both endpoints (flat pixel indices, row-major) of the horizontal then vertical grid edges."""
    idx = np.arange(h * w, dtype=np.int64).reshape(h, w)
    src = np.concatenate([idx[:, :-1].ravel(), idx[:-1, :].ravel()])
    dst = np.concatenate([idx[:, 1:].ravel(), idx[1:, :].ravel()])
    return src, dst


def spanning_tree(guide: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum spanning tree of one guide map's 4-connected grid, as a rooted BFS ordering.

    Args:
        guide: ``(D, H, W)`` array; edge cost = squared Euclidean distance of the guide vectors.

    Returns:
        ``order`` (``H*W`` int64, breadth-first from pixel 0, root first) and ``parent``
        (``H*W`` int64, parent pixel of every vertex; the root is its own parent).
    """
    if guide.ndim != 3:
        raise ValueError(f"spanning_tree: guide must be (D, H, W), got shape {guide.shape}")
    _, h, w = guide.shape
    n = h * w
    if n == 1:
        return np.zeros(1, np.int64), np.zeros(1, np.int64)
    g = np.asarray(guide, dtype=np.float64)
    src, dst = _grid_edges(h, w)
    # Same edge order as _grid_edges: horizontal then vertical, row-major.
    cost = np.concatenate([
        np.square(g[:, :, 1:] - g[:, :, :-1]).sum(axis=0).ravel(),
        np.square(g[:, 1:, :] - g[:, :-1, :]).sum(axis=0).ravel(),
    ])
    cost += _TIE_EPS
    graph = coo_matrix((cost, (src, dst)), shape=(n, n)).tocsr()
    mst = minimum_spanning_tree(graph)
    order, pred = breadth_first_order(mst, 0, directed=False, return_predecessors=True)
    if order.shape[0] != n:  # cannot happen on a connected grid with positive costs
        raise RuntimeError(f"spanning_tree: tree reaches {order.shape[0]} of {n} pixels")
    parent = pred.astype(np.int64)
    parent[order[0]] = order[0]
    return order.astype(np.int64), parent


# ----------------------------------------------------------------------------------------------
# numba sweeps.  Work arrays are float64 and pixel-major (N, C + 1): the channel loop is innermost
# and contiguous, and the extra last channel is the all-ones input whose filtered value is Z.

# Weights below this are flushed to 0: they are 0 to any precision that matters, and products of
# them would be denormal floats, which x86 handles ~100x slower.
_WEIGHT_FLOOR = 1e-60


@numba.njit(cache=True, nogil=True)
def _sweeps(xb, wb, ob, pb, up, out):  # pragma: no cover - compiled
    """Up and down sweeps of one image: xb (C, N) -> up, out (N, C + 1), last channel = ones."""
    nc, n = xb.shape
    for v in range(n):
        for c in range(nc):
            up[v, c] = xb[c, v]
        up[v, nc] = 1.0
    for i in range(n - 1, 0, -1):  # leaves first: a vertex is final before its parent reads it
        v = ob[i]
        p = pb[v]
        wv = wb[v]
        for c in range(nc + 1):
            up[p, c] += wv * up[v, c]
    r = ob[0]
    for c in range(nc + 1):
        out[r, c] = up[r, c]
    for i in range(1, n):  # parents first
        v = ob[i]
        p = pb[v]
        wv = wb[v]
        k = 1.0 - wv * wv
        for c in range(nc + 1):
            out[v, c] = up[v, c] * k + wv * out[p, c]


@numba.njit(cache=True, nogil=True)
def _filter_forward(x, w, order, parent, y):  # pragma: no cover - compiled
    """y[b, c] = (S_b x[b, c]) / (S_b 1) for x, y (B, C, N); w, order, parent (B, N)."""
    nb, nc, n = x.shape
    up = np.empty((n, nc + 1))
    out = np.empty((n, nc + 1))
    for b in range(nb):
        _sweeps(x[b], w[b], order[b], parent[b], up, out)
        for v in range(n):
            inv_z = 1.0 / out[v, nc]
            for c in range(nc):
                y[b, c, v] = out[v, c] * inv_z


@numba.njit(cache=True, nogil=True)
def _filter_backward(x, w, order, parent, grad_y, grad_x, grad_w):  # pragma: no cover - compiled
    """Exact adjoint of ``_filter_forward`` (the sweeps are recomputed instead of stored).

    Normalisation:  gO(v, c) = gy(v, c) / Z(v),  gZ(v) = -sum_c gy(v, c) y(v, c) / Z(v).
    Down sweep adjoint (leaves first), G = accumulated gO:
        gA(v) = G(v) (1 - w_v^2),  G(p) += w_v G(v),  dL/dw_v += G(v) . (O(p) - 2 w_v A(v)).
    Up sweep adjoint (parents first), gA accumulated into gx:
        gx(v) = gA(v) + w_v gx(p),  dL/dw_v += gx(p) . A(v).
    gx of the ones channel is dropped (it is a constant).
    """
    nb, nc, n = x.shape
    up = np.empty((n, nc + 1))
    out = np.empty((n, nc + 1))
    g = np.empty((n, nc + 1))
    gx = np.empty((n, nc + 1))
    for b in range(nb):
        wb, ob, pb = w[b], order[b], parent[b]
        _sweeps(x[b], wb, ob, pb, up, out)
        for v in range(n):
            inv_z = 1.0 / out[v, nc]
            gz = 0.0
            for c in range(nc):
                gy = grad_y[b, c, v] * inv_z
                g[v, c] = gy
                gz -= gy * out[v, c] * inv_z
            g[v, nc] = gz
        for i in range(n - 1, 0, -1):
            v = ob[i]
            p = pb[v]
            wv = wb[v]
            k = 1.0 - wv * wv
            s = 0.0
            for c in range(nc + 1):
                gv = g[v, c]
                gx[v, c] = gv * k
                s += gv * (out[p, c] - 2.0 * wv * up[v, c])
                g[p, c] += wv * gv
            grad_w[b, v] = s
        r = ob[0]
        grad_w[b, r] = 0.0
        for c in range(nc + 1):
            gx[r, c] = g[r, c]
        for i in range(1, n):
            v = ob[i]
            p = pb[v]
            wv = wb[v]
            s = 0.0
            for c in range(nc + 1):
                gp = gx[p, c]
                gx[v, c] += wv * gp
                s += gp * up[v, c]
            grad_w[b, v] += s
        for c in range(nc):
            for v in range(n):
                grad_x[b, c, v] = gx[v, c]


class _TreeFilterFunction(torch.autograd.Function):
    """y = (S x) / (S 1) with S built from trees and squared guide distances of tree edges.

    x (B, C, N); dist (B, N): squared guide distance of every vertex to its parent; differentiable
    wrt x and dist.  Computed on the CPU in float64, returned in x's dtype and device.
    """

    @staticmethod
    def forward(ctx, x, dist, sigma, order, parent):  # type: ignore[override]
        xn = x.detach().cpu().numpy()
        wn = np.exp(-dist.detach().cpu().double().numpy() / sigma)
        wn[wn < _WEIGHT_FLOOR] = 0.0
        y = np.empty(xn.shape, dtype=xn.dtype)
        _filter_forward(xn, wn, order, parent, y)
        ctx.arrays = (xn, wn, order, parent)
        ctx.sigma = sigma
        ctx.dist_dtype = dist.dtype
        return torch.from_numpy(y).to(x.device)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):  # type: ignore[override]
        xn, wn, order, parent = ctx.arrays
        gy = np.ascontiguousarray(grad_y.detach().cpu().numpy(), dtype=np.float64)
        grad_x = np.empty(xn.shape, dtype=xn.dtype)
        grad_w = np.empty(wn.shape, dtype=np.float64)
        _filter_backward(xn, wn, order, parent, gy, grad_x, grad_w)
        grad_dist = grad_w * wn * (-1.0 / ctx.sigma)  # w = exp(-d / sigma)
        device = grad_y.device
        return (
            torch.from_numpy(grad_x).to(device),
            torch.from_numpy(grad_dist).to(device=device, dtype=ctx.dist_dtype),
            None,
            None,
            None,
        )


def tree_filter(x: torch.Tensor, guide: torch.Tensor, sigma: float) -> torch.Tensor:
    """Normalised minimum-spanning-tree filter of ``x`` guided by ``guide``.

    Args:
        x: ``(B, C, H, W)`` float32/float64 values to filter; all C channels of an image share one
            tree (e.g. every positive mask of the image as a channel).
        guide: ``(B, D, H, W)`` guide features; the tree is the MST of the 4-connected grid under
            squared guide distance, and the edge weights ``exp(-|g_v - g_parent|^2 / sigma)`` are
            differentiable, so gradients flow into ``guide``.
        sigma: positive bandwidth of the edge weights.

    Returns:
        ``(B, C, H, W)`` tensor, same dtype/device as ``x``: for every pixel the average of x over
        all pixels weighted by the product of edge weights along the tree path.
    """
    if x.dim() != 4 or guide.dim() != 4:
        raise ValueError(
            f"tree_filter: x and guide must be (B, C, H, W) and (B, D, H, W), "
            f"got {tuple(x.shape)} and {tuple(guide.shape)}"
        )
    b, c, h, w = x.shape
    if guide.shape[0] != b or guide.shape[2:] != (h, w):
        raise ValueError(
            f"tree_filter: guide {tuple(guide.shape)} does not match x {tuple(x.shape)} "
            "in batch size and spatial size"
        )
    if x.dtype not in (torch.float32, torch.float64) or not guide.is_floating_point():
        raise ValueError(f"tree_filter: need float32/float64 x and float guide, got {x.dtype}, "
                         f"{guide.dtype}")
    if not sigma > 0:
        raise ValueError(f"tree_filter: sigma must be positive, got {sigma}")
    n = h * w
    if b == 0 or c == 0 or n == 0:
        return x.clone()

    guide_flat = guide.reshape(b, guide.shape[1], n)
    guide_np = guide_flat.detach().cpu().double().numpy()
    if not np.isfinite(guide_np).all():
        raise ValueError("tree_filter: guide contains NaN or infinite values")
    orders = np.empty((b, n), np.int64)
    parents = np.empty((b, n), np.int64)
    for i in range(b):
        orders[i], parents[i] = spanning_tree(guide_np[i].reshape(-1, h, w))

    # Squared guide distance of every vertex to its parent, in torch so autograd carries the
    # gradient of the edge weights on into the guide.
    parent_t = torch.from_numpy(parents).to(guide.device)
    g_parent = torch.gather(guide_flat, 2, parent_t[:, None, :].expand_as(guide_flat))
    dist = (guide_flat - g_parent).square().sum(1)

    y = _TreeFilterFunction.apply(x.reshape(b, c, n).contiguous(), dist, float(sigma), orders,
                                  parents)
    return y.reshape(b, c, h, w)

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

The sweeps are numba-compiled (cached on disk).  CUDA tensors are filtered on the CPU and moved back:
the tree is inherently sequential and the portable path is exact.
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
    g = np.asarray(guide, dtype=np.float64).reshape(guide.shape[0], n)
    src, dst = _grid_edges(h, w)
    cost = np.square(g[:, src] - g[:, dst]).sum(axis=0) + _TIE_EPS
    graph = coo_matrix((cost, (src, dst)), shape=(n, n)).tocsr()
    mst = minimum_spanning_tree(graph)
    order, pred = breadth_first_order(mst, 0, directed=False, return_predecessors=True)
    if order.shape[0] != n:  # cannot happen on a connected grid with positive costs
        raise RuntimeError(f"spanning_tree: tree reaches {order.shape[0]} of {n} pixels")
    parent = pred.astype(np.int64)
    parent[order[0]] = order[0]
    return order.astype(np.int64), parent


# ----------------------------------------------------------------------------------------------
# numba sweeps.  Arrays are pixel-major (N, C) so the channel loop is innermost and contiguous.


@numba.njit(cache=True, nogil=True)
def _sweep_forward(x, w, order, parent, up, out):  # pragma: no cover - compiled
    """Up and down sweeps for a batch: x, up, out (B, N, C); w, order, parent (B, N)."""
    nb, n, nc = x.shape
    for b in range(nb):
        xb, wb, ob, pb, ub, outb = x[b], w[b], order[b], parent[b], up[b], out[b]
        for v in range(n):
            for c in range(nc):
                ub[v, c] = xb[v, c]
        for i in range(n - 1, 0, -1):  # leaves first: a vertex is final before its parent reads it
            v = ob[i]
            p = pb[v]
            wv = wb[v]
            for c in range(nc):
                ub[p, c] += wv * ub[v, c]
        r = ob[0]
        for c in range(nc):
            outb[r, c] = ub[r, c]
        for i in range(1, n):  # parents first
            v = ob[i]
            p = pb[v]
            wv = wb[v]
            k = 1.0 - wv * wv
            for c in range(nc):
                outb[v, c] = ub[v, c] * k + wv * outb[p, c]


@numba.njit(cache=True, nogil=True)
def _sweep_backward(grad_out, w, order, parent, up, out, grad_x, grad_w):  # pragma: no cover
    """Adjoint of ``_sweep_forward``; grad_out is overwritten (used as an accumulator).

    Down sweep adjoint (leaves first):  gA(v) = G(v)(1 - w_v^2),  G(p) += w_v G(v),
        dL/dw_v += G(v) (O(p) - 2 w_v A(v)).
    Up sweep adjoint (parents first):  gx(v) = gA(v) + w_v gx(p),  dL/dw_v += gx(p) A(v).
    """
    nb, n, nc = grad_out.shape
    for b in range(nb):
        gb, wb, ob, pb, ub, outb = grad_out[b], w[b], order[b], parent[b], up[b], out[b]
        gxb, gwb = grad_x[b], grad_w[b]
        for i in range(n - 1, 0, -1):
            v = ob[i]
            p = pb[v]
            wv = wb[v]
            k = 1.0 - wv * wv
            s = 0.0
            for c in range(nc):
                g = gb[v, c]
                gxb[v, c] = g * k
                s += g * (outb[p, c] - 2.0 * wv * ub[v, c])
                gb[p, c] += wv * g
            gwb[v] = s
        r = ob[0]
        gwb[r] = 0.0
        for c in range(nc):
            gxb[r, c] = gb[r, c]
        for i in range(1, n):
            v = ob[i]
            p = pb[v]
            wv = wb[v]
            s = 0.0
            for c in range(nc):
                gp = gxb[p, c]
                gxb[v, c] += wv * gp
                s += gp * ub[v, c]
            gwb[v] += s


class _TreeSweep(torch.autograd.Function):
    """out = S(w) x for a batch of trees; x (B, N, C), w (B, N); differentiable wrt x and w."""

    @staticmethod
    def forward(ctx, x, w, order, parent):  # type: ignore[override]
        device = x.device
        xn = x.detach().cpu().contiguous().numpy()
        wn = w.detach().cpu().to(x.dtype).contiguous().numpy()
        up = np.empty_like(xn)
        out = np.empty_like(xn)
        _sweep_forward(xn, wn, order, parent, up, out)
        ctx.arrays = (wn, order, parent, up, out)
        ctx.device = device
        return torch.from_numpy(out).to(device)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        wn, order, parent, up, out = ctx.arrays
        g = grad_out.detach().cpu().numpy().astype(out.dtype, copy=True)
        grad_x = np.empty_like(g)
        grad_w = np.empty(wn.shape, dtype=g.dtype)
        _sweep_backward(g, wn, order, parent, up, out, grad_x, grad_w)
        return (
            torch.from_numpy(grad_x).to(ctx.device),
            torch.from_numpy(grad_w).to(ctx.device),
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

    # Edge weights in torch so autograd carries d(out)/dw into the guide.
    parent_t = torch.from_numpy(parents).to(guide.device)
    g_parent = torch.gather(guide_flat, 2, parent_t[:, None, :].expand_as(guide_flat))
    weights = torch.exp(-(guide_flat - g_parent).square().sum(1) / sigma).to(x.dtype)

    # Pixel-major layout with an all-ones channel appended for the normaliser Z.
    x_flat = x.reshape(b, c, n).transpose(1, 2)
    ones = x.new_ones(b, n, 1)
    filtered = _TreeSweep.apply(torch.cat([x_flat, ones], dim=2), weights, orders, parents)
    out = filtered[..., :c] / filtered[..., c:]
    return out.transpose(1, 2).reshape(b, c, h, w)

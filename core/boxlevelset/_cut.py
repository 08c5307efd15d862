"""Global minimisation of the box-to-mask energy by graph cuts, for ``segment_boxes(...,
solver="cut")``.

With the region models held fixed (c1, c2 of Eq. 4 and the inside/outside histograms),
the region and histogram terms are linear in a binary mask u: sum_x r(x) u(x), with r
their derivative dE/dp, and a contrast-weighted boundary length is a sum of pair costs
|u(x) - u(y)|. That energy is minimised exactly by a minimum s-t cut (Boykov and
Kolmogorov 2003; the graph-cut form of the global Chan-Vese minimisers of Chan, Esedoglu
and Nikolova 2006). The cut alternates with re-estimating the region models from its
mask, as GrabCut does.

Unlike gradient descent from an ellipse, the cut can drop a structure of object-like
intensity that hangs on the object through a thin bridge when its boundary costs more
than its region term gains (CT: vessels and bowel beside the liver inside the liver's
box).
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import breadth_first_order, maximum_flow

from boxlevelset._evolve_kernel import HIST_PRIOR

# 8-neighbour weights whose cut cost approximates Euclidean boundary length (Cauchy-Crofton,
# Boykov and Kolmogorov 2003): pi/8 per axis link and pi/(8 sqrt 2) per diagonal link.
_AXIS = np.pi / 8
_DIAGONAL = np.pi / (8 * np.sqrt(2))
# Capacities are integers for scipy's max-flow: energies per box are scaled to O(1) per
# pixel and then by this factor before rounding (less when the flow out of the source
# could pass int32, e.g. crops far above the 64 px default).
_RESOLUTION = 1000.0
_MAX_FLOW = 2.0**30


def region_derivative(
    feats: np.ndarray, bins: np.ndarray | None, ring_counts: np.ndarray | None,
    hist_weight: float, u: np.ndarray,
) -> np.ndarray:
    """dE/dp of one box's region term (Eq. 3-4) + hist_weight x histogram term at the
    binary mask u [P], times the box's pixel count (so O(1) per pixel). feats [P, C]; bins
    [P, C] and ring_counts [C, bins] (this box's row of what ``levelset._histograms``
    gives)."""
    n_ch = feats.shape[1]
    inside = u.astype(bool)
    c1 = feats[inside].mean(0) if inside.any() else feats.mean(0)
    c2 = feats[~inside].mean(0) if (~inside).any() else feats.mean(0)
    r = (((feats - c1) ** 2) - ((feats - c2) ** 2)).sum(1)
    if hist_weight > 0 and bins is not None and ring_counts is not None:
        n_bins = ring_counts.shape[-1]
        for c in range(n_ch):
            h_in = HIST_PRIOR + np.bincount(bins[inside, c], minlength=n_bins)
            h_out = ring_counts[c] + np.bincount(bins[~inside, c], minlength=n_bins)
            log_ratio = np.log(h_out / h_out.sum()) - np.log(h_in / h_in.sum())
            r = r + hist_weight * log_ratio[bins[:, c]]
    return r / n_ch


def link_weights(crop: np.ndarray, edge: float) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(pixel, neighbour, weight) per link family of an 8-connected grid on crop [H, W, C]:
    Cauchy-Crofton length x exp(-edge |dI|^2 / (2 mean |dI|^2)), the squared difference
    per unit distance and the mean over the crop's axis links (``image.axis_contrast``,
    as the evolution's length term has it)."""
    from boxlevelset.image import axis_contrast

    h, w = crop.shape[:2]
    idx = np.arange(h * w).reshape(h, w)
    dx, dy, scale = axis_contrast(crop, edge)
    families = [
        (dx, idx[:, :-1], idx[:, 1:], 1.0),
        (dy, idx[:-1], idx[1:], 1.0),
        (((crop[1:, 1:] - crop[:-1, :-1]) ** 2).sum(-1), idx[:-1, :-1], idx[1:, 1:], 2.0),
        (((crop[1:, :-1] - crop[:-1, 1:]) ** 2).sum(-1), idx[:-1, 1:], idx[1:, :-1], 2.0),
    ]
    out = []
    for d2, a, b, dist2 in families:
        length = _AXIS if dist2 == 1.0 else _DIAGONAL
        out.append((a.ravel(), b.ravel(), length * np.exp(-scale * d2.ravel() / dist2)))
    return out


def min_cut(
    unary: list[np.ndarray], links: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]],
    pair_weight: list[float],
) -> list[np.ndarray]:
    """Exact minimiser of sum_x unary(x) u(x) + pair_weight x sum_links w |u(x) - u(y)| over
    binary u, for several independent boxes solved in one max-flow (boxes are disjoint
    parts of one graph). Returns u per box (bool)."""
    sizes = [len(r) for r in unary]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    n = int(offsets[-1])
    source, sink = n, n + 1
    rows, cols, caps = [], [], []
    for off, r, box_links, lam in zip(offsets, unary, links, pair_weight):
        node = off + np.arange(len(r))
        fg_cost = r > 0  # u = 1 (source side) costs r > 0: a link to the sink
        rows += [node[fg_cost], np.full(int((~fg_cost).sum()), source)]
        cols += [np.full(int(fg_cost.sum()), sink), node[~fg_cost]]
        caps += [r[fg_cost], -r[~fg_cost]]
        for a, b, w in box_links:
            rows += [off + a, off + b]
            cols += [off + b, off + a]
            caps += [lam * w, lam * w]
    tail, head, cap = np.concatenate(rows), np.concatenate(cols), np.concatenate(caps)
    scale = min(_RESOLUTION, _MAX_FLOW / max(1.0, cap[tail == source].sum()))
    cap = np.rint(cap * scale).astype(np.int32)
    graph = csr_matrix((cap, (tail, head)), shape=(n + 2, n + 2))
    graph.sum_duplicates()
    flow = maximum_flow(graph, source, sink, method="dinic").flow
    residual = (graph - flow).tocsr()
    residual.data = (residual.data > 0).astype(np.int32)
    residual.eliminate_zeros()
    reached = np.zeros(n + 2, bool)
    reached[breadth_first_order(residual, source, directed=True, return_predecessors=False)] = True
    return [reached[a:b] for a, b in zip(offsets[:-1], offsets[1:])]

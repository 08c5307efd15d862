"""Tree filter: exact against a brute-force path-product reference, exact gradients, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import minimum_spanning_tree

from boxlevelset.tree_filter import spanning_tree, tree_filter


def _path_matrix(guide: torch.Tensor, sigma: float) -> torch.Tensor:
    """S[v, u] = product of edge weights on the tree path u-v, found by walking parents.

    With depth(v) = sum of squared guide distances from v up to the root, the path u-v through
    their lowest common ancestor a has product exp(-(depth(u) + depth(v) - 2 depth(a)) / sigma).
    """
    d, h, w = guide.shape
    n = h * w
    _, parent = spanning_tree(guide.detach().numpy())
    g = guide.reshape(d, n)
    ancestors = []  # every vertex's path to the root, itself first
    for u in range(n):
        path = [u]
        while parent[path[-1]] != path[-1]:
            path.append(int(parent[path[-1]]))
        ancestors.append(path)
    depth = []
    for path in ancestors:
        steps = [(g[:, a] - g[:, b]).square().sum() for a, b in zip(path[:-1], path[1:])]
        depth.append(torch.stack(steps).sum() if steps else g.new_zeros(()))
    depth_t = torch.stack(depth)
    lca = np.empty((n, n), np.int64)
    for v in range(n):
        on_path = set(ancestors[v])
        for u in range(n):
            lca[v, u] = next(a for a in ancestors[u] if a in on_path)
    lca_depth = depth_t[torch.from_numpy(lca)]
    return torch.exp(-(depth_t[:, None] + depth_t[None, :] - 2 * lca_depth) / sigma)


def _brute_force(x: torch.Tensor, guide: torch.Tensor, sigma: float) -> torch.Tensor:
    b, c, h, w = x.shape
    out = []
    for i in range(b):
        s = _path_matrix(guide[i], sigma)
        xf = x[i].reshape(c, h * w)
        out.append(((xf @ s.T) / s.sum(1)).reshape(c, h, w))
    return torch.stack(out)


def test_spanning_tree_is_a_tree():
    rng = np.random.default_rng(0)
    order, parent = spanning_tree(rng.random((3, 7, 9)))
    n = 63
    assert sorted(order.tolist()) == list(range(n))
    assert parent[order[0]] == order[0]
    position = np.empty(n, np.int64)
    position[order] = np.arange(n)
    # Every non-root vertex has a parent earlier in BFS order and 4-adjacent to it.
    for v in order[1:]:
        p = parent[v]
        assert position[p] < position[v]
        (yv, xv), (yp, xp) = divmod(int(v), 9), divmod(int(p), 9)
        assert abs(yv - yp) + abs(xv - xp) == 1


def _scipy_mst(guide: np.ndarray) -> tuple[set, float]:
    """Reference MST edges and total cost from scipy (tiny offset: scipy drops zero-cost edges)."""
    _, h, w = guide.shape
    idx = np.arange(h * w).reshape(h, w)
    src = np.concatenate([idx[:, :-1].ravel(), idx[:-1, :].ravel()])
    dst = np.concatenate([idx[:, 1:].ravel(), idx[1:, :].ravel()])
    g = guide.reshape(guide.shape[0], -1)
    cost = np.square(g[:, src] - g[:, dst]).sum(0)
    mst = minimum_spanning_tree(coo_matrix((cost + 1e-9, (src, dst)), shape=(h * w,) * 2)).tocoo()
    edges = {frozenset((int(a), int(b))) for a, b in zip(mst.row, mst.col)}
    return edges, float(mst.data.sum() - 1e-9 * len(edges))


def _tree_edges(guide: np.ndarray) -> tuple[set, float]:
    order, parent = spanning_tree(guide)
    g = guide.reshape(guide.shape[0], -1)
    edges = {frozenset((int(v), int(parent[v]))) for v in order[1:]}
    cost = sum(float(np.square(g[:, v] - g[:, parent[v]]).sum()) for v in order[1:])
    return edges, cost


def test_spanning_tree_matches_scipy():
    rng = np.random.default_rng(1)
    for shape in [(3, 7, 9), (1, 1, 12), (2, 11, 1), (4, 16, 13)]:
        guide = rng.random(shape)
        assert _tree_edges(guide)[0] == _scipy_mst(guide)[0]
        assert _tree_edges(guide.astype(np.float32))[0] == _scipy_mst(guide)[0]
    # Many ties (quantised guide): the tree may differ, its total cost may not.
    guide = rng.integers(0, 3, (2, 12, 10)).astype(np.float64)
    assert _tree_edges(guide)[1] == pytest.approx(_scipy_mst(guide)[1], abs=1e-6)


def test_spanning_tree_flat_guide_still_spans():
    order, parent = spanning_tree(np.zeros((1, 4, 5)))
    assert sorted(order.tolist()) == list(range(20))
    assert (parent[order[1:]] != order[1:]).all()


def test_matches_brute_force():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 5, 6, dtype=torch.float64)
    guide = torch.rand(2, 4, 5, 6, dtype=torch.float64)
    for sigma in (0.05, 0.5):
        out = tree_filter(x, guide, sigma)
        ref = _brute_force(x, guide, sigma)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


def test_float32_matches_float64():
    torch.manual_seed(1)
    x = torch.rand(1, 2, 9, 11, dtype=torch.float64)
    guide = torch.rand(1, 3, 9, 11, dtype=torch.float64)
    ref = tree_filter(x, guide, 0.2)
    out = tree_filter(x.float(), guide.float(), 0.2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def test_gradcheck_x_and_guide():
    torch.manual_seed(2)
    x = torch.rand(2, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    guide = torch.rand(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    # A small perturbation never changes the MST of a random guide, so the map is smooth there.
    assert torch.autograd.gradcheck(lambda a, g: tree_filter(a, g, 0.3), (x, guide))


def test_gradient_matches_brute_force_autograd():
    torch.manual_seed(3)
    x = torch.rand(1, 3, 4, 6, dtype=torch.float64, requires_grad=True)
    guide = torch.rand(1, 2, 4, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(1, 3, 4, 6, dtype=torch.float64)
    (tree_filter(x, guide, 0.4) * weight).sum().backward()
    gx, gg = x.grad.clone(), guide.grad.clone()
    x.grad = guide.grad = None
    (_brute_force(x, guide, 0.4) * weight).sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gg, guide.grad)


def test_constant_input_is_preserved():
    torch.manual_seed(4)
    x = torch.full((1, 2, 8, 7), 3.25, dtype=torch.float64)
    out = tree_filter(x, torch.rand(1, 3, 8, 7, dtype=torch.float64), 0.01)
    torch.testing.assert_close(out, x)


def test_flat_guide_averages_globally():
    torch.manual_seed(5)
    x = torch.rand(1, 2, 6, 6, dtype=torch.float64)
    out = tree_filter(x, torch.zeros(1, 1, 6, 6, dtype=torch.float64), 1.0)
    mean = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    torch.testing.assert_close(out, mean)


def test_edge_aware():
    # Left half dark, right half bright guide; noisy input around 0 and 1.
    torch.manual_seed(6)
    guide = torch.zeros(1, 1, 10, 12)
    guide[..., 6:] = 1.0
    x = guide + 0.3 * torch.randn(1, 1, 10, 12)
    out = tree_filter(x, guide + 0.01 * torch.rand(1, 1, 10, 12), 0.02)
    left, right = out[..., :6], out[..., 6:]
    assert left.max() < 0.25 and right.min() > 0.75
    # Smoothing within each region: spread shrinks a lot.
    assert left.std() < 0.3 * x[..., :6].std() and right.std() < 0.3 * x[..., 6:].std()


def test_batch_and_channels_equal_per_item_loops():
    torch.manual_seed(7)
    x = torch.rand(3, 4, 6, 5)
    guide = torch.rand(3, 2, 6, 5)
    out = tree_filter(x, guide, 0.1)
    for b in range(3):
        for c in range(4):
            single = tree_filter(x[b : b + 1, c : c + 1], guide[b : b + 1], 0.1)
            torch.testing.assert_close(out[b : b + 1, c : c + 1], single)


def test_threaded_batch_equals_serial():
    torch.manual_seed(10)
    x = torch.rand(3, 2, 7, 6, dtype=torch.float64, requires_grad=True)
    guide = torch.rand(3, 2, 7, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(3, 2, 7, 6, dtype=torch.float64)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 3):  # images of the batch go to min(B, torch threads) worker threads
            torch.set_num_threads(n)
            out = tree_filter(x, guide, 0.2)
            gx, gg = torch.autograd.grad((out * weight).sum(), (x, guide))
            results.append((out, gx, gg))
    finally:
        torch.set_num_threads(threads)
    for serial, threaded in zip(*results):
        torch.testing.assert_close(threaded, serial, rtol=0, atol=0)


def test_half_precision_is_filtered_in_float32():
    torch.manual_seed(8)
    x = torch.rand(1, 2, 5, 7)
    guide = torch.rand(1, 3, 5, 7)
    out = tree_filter(x.to(torch.bfloat16), guide.to(torch.bfloat16), 0.5)
    assert out.dtype == torch.bfloat16
    ref = tree_filter(x.to(torch.bfloat16).float(), guide.to(torch.bfloat16).float(), 0.5)
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    torch.manual_seed(9)
    x = torch.rand(2, 3, 6, 7, dtype=torch.float64, requires_grad=True)
    guide = torch.rand(2, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(2, 3, 6, 7, dtype=torch.float64)
    (tree_filter(x, guide, 0.3) * weight).sum().backward()
    x_cuda = x.detach().cuda().requires_grad_()
    guide_cuda = guide.detach().cuda().requires_grad_()
    out = tree_filter(x_cuda, guide_cuda, 0.3)
    assert out.device.type == "cuda"
    (out * weight.cuda()).sum().backward()
    torch.testing.assert_close(out.cpu(), tree_filter(x, guide, 0.3))
    torch.testing.assert_close(x_cuda.grad.cpu(), x.grad)
    torch.testing.assert_close(guide_cuda.grad.cpu(), guide.grad)


def test_single_row_and_pixel():
    x = torch.tensor([[[[1.0, 2.0, 4.0]]]], dtype=torch.float64)
    guide = torch.tensor([[[[0.0, 0.0, 10.0]]]], dtype=torch.float64)
    out = tree_filter(x, guide, 1.0)
    # Pixels 0,1 joined with weight 1; pixel 2 cut off (weight exp(-100)).
    torch.testing.assert_close(out, torch.tensor([[[[1.5, 1.5, 4.0]]]], dtype=torch.float64))
    one = torch.rand(2, 3, 1, 1)
    torch.testing.assert_close(tree_filter(one, torch.rand(2, 1, 1, 1), 1.0), one)


def test_bad_input():
    with pytest.raises(ValueError, match="guide"):
        tree_filter(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 5), 1.0)
    with pytest.raises(ValueError, match="sigma"):
        tree_filter(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4), 0.0)
    with pytest.raises(ValueError, match="NaN"):
        tree_filter(torch.rand(1, 1, 4, 4), torch.full((1, 1, 4, 4), float("nan")), 1.0)
    with pytest.raises(ValueError):
        tree_filter(torch.rand(1, 4, 4), torch.rand(1, 1, 4, 4), 1.0)

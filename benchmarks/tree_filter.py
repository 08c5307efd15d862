"""Speed of the exact tree filter on this CPU.

Prints two tables: time vs image size (C = 8 channels) and time vs number of channels (positives)
at 200x336, split into tree construction (MST + BFS), forward and forward+backward.  One tree is
shared by all C channels of an image, so the cost is ~ tree build + a small per-channel term.

Times are the best of N runs of this process's CPU time (time.process_time), with one torch thread
by default: on a machine shared with other jobs, wall-clock numbers mostly measure the neighbours.
The last column is the best wall-clock time of forward+backward for comparison.

    python benchmarks/tree_filter.py [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from boxlevelset.tree_filter import spanning_tree, tree_filter


def _best_ms(fn, repeats: int, clock=time.process_time) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return 1e3 * best


def _measure(h: int, w: int, channels: int, repeats: int, dtype=torch.float32) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, channels, h, w, generator=gen, dtype=dtype, requires_grad=True)
    guide = torch.rand(1, 3, h, w, generator=gen, dtype=dtype, requires_grad=True)
    guide_np = guide.detach().double().numpy()[0]

    def forward() -> None:
        with torch.no_grad():
            tree_filter(x, guide, 0.02)

    def forward_backward() -> None:
        tree_filter(x, guide, 0.02).square().sum().backward()

    forward_backward()  # JIT (cached on disk after the first run) and allocator warm-up
    return {
        "tree": _best_ms(lambda: spanning_tree(guide_np), repeats),
        "fwd": _best_ms(forward, repeats),
        "fwd+bwd": _best_ms(forward_backward, repeats),
        "wall": _best_ms(forward_backward, repeats, time.perf_counter),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="best of N timings")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"tree_filter, float32, guide D=3, best of {args.repeats}, "
          f"{torch.get_num_threads()} torch thread(s), load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs; CPU ms except the wall column\n")
    header = (f"{'size':>9} {'pixels':>7} {'C':>3} {'tree':>7} {'fwd':>7} {'fwd+bwd':>8} "
              f"{'us/px':>6} {'wall':>7}")

    print("vs image size, C = 8")
    print(header)
    for h, w in [(32, 32), (64, 64), (100, 100), (128, 128), (200, 300), (256, 336)]:
        t = _measure(h, w, 8, args.repeats)
        print(f"{h:>4}x{w:<4} {h * w:>7} {8:>3} {t['tree']:>7.2f} {t['fwd']:>7.2f} "
              f"{t['fwd+bwd']:>8.2f} {1e3 * t['fwd+bwd'] / (h * w):>6.2f} {t['wall']:>7.2f}")

    print("\nvs channels (positives sharing one tree), 200x336")
    print(header + f" {'per ch':>7}")
    base = None
    for c in [1, 2, 4, 8, 16, 32, 64]:
        t = _measure(200, 336, c, args.repeats)
        base = t["fwd+bwd"] if base is None else base
        per_channel = (t["fwd+bwd"] - base) / (c - 1) if c > 1 else float("nan")
        print(f"{'200x336':>9} {200 * 336:>7} {c:>3} {t['tree']:>7.2f} {t['fwd']:>7.2f} "
              f"{t['fwd+bwd']:>8.2f} {1e3 * t['fwd+bwd'] / (200 * 336):>6.2f} {t['wall']:>7.2f} "
              f"{per_channel:>7.2f}")

    # What rebuilding the tree for every positive (the official op's way) would cost instead.
    c = 16
    one_tree = _measure(200, 336, c, args.repeats)["fwd+bwd"]
    per_item = _measure(200, 336, 1, args.repeats)["fwd+bwd"] * c
    print(f"\n{c} positives at 200x336: one shared tree {one_tree:.1f} ms, "
          f"one tree per positive {per_item:.1f} ms ({per_item / one_tree:.1f}x)")


if __name__ == "__main__":
    main()

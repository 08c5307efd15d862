"""Cost of the level-set loss against the number of instances and box size.

Our energies gather only in-box pixels (cost ~ summed box area); the whole-map form that
multiplies every instance's full map by its box mask (as the official code does) costs
~ instances x image size. Both compute the same numbers (checked here).

    python benchmarks/levelset_loss.py [--height 200 --width 336 --repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch

from boxlevelset.levelset import box_masks, levelset_energy


def whole_map_energy(logits: torch.Tensor, feats: torch.Tensor, boxes: torch.Tensor,
                     gamma: float = 1e-5) -> torch.Tensor:
    """Reference: Eq. 3-4 + length on full [N, H, W] maps multiplied by the box masks."""
    b = box_masks(boxes, *logits.shape[1:]).to(logits.dtype)[:, None]
    p = torch.sigmoid(logits)[:, None] * b
    q = (1 - torch.sigmoid(logits))[:, None] * b
    f = feats.expand(logits.shape[0], -1, -1, -1)
    npx = b.sum((1, 2, 3))
    c1 = (p * f).sum((2, 3)) / p.sum((2, 3)).clamp(min=1e-5)
    c2 = (q * f).sum((2, 3)) / q.sum((2, 3)).clamp(min=1e-5)
    e = ((f - c1[..., None, None]) ** 2 * p + (f - c2[..., None, None]) ** 2 * q).sum((1, 2, 3))
    e = e / (f.shape[1] * npx)
    s = torch.sigmoid(logits)[:, None]
    inner_x = b[..., :, 1:] * b[..., :, :-1]
    inner_y = b[..., 1:, :] * b[..., :-1, :]
    tv = ((s[..., :, 1:] - s[..., :, :-1]).abs() * inner_x).sum((1, 2, 3)) + (
        (s[..., 1:, :] - s[..., :-1, :]).abs() * inner_y).sum((1, 2, 3))
    return e + gamma * tv / npx


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=200)
    parser.add_argument("--width", type=int, default=336)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    h, w = args.height, args.width
    g = torch.Generator().manual_seed(0)
    feats = torch.rand(1, 3, h, w, generator=g)
    print(f"map {h}x{w}, 3-channel input, forward + backward, best of {args.repeats}, "
          f"torch threads {torch.get_num_threads()}\n")
    print("| instances | box px | summed box area | ours ms | whole-map ms | max abs diff |")
    print("|---|---|---|---|---|---|")
    for side in (16, 48):
        for n in (1, 10, 50, 100, 200):
            x0 = torch.randint(0, w - side, (n,), generator=g).float()
            y0 = torch.randint(0, h - side, (n,), generator=g).float()
            boxes = torch.stack([x0, y0, x0 + side, y0 + side], 1)
            logits = torch.randn(n, h, w, generator=g, requires_grad=True)
            bi = torch.zeros(n, dtype=torch.long)

            def ours():
                levelset_energy(logits, feats, boxes, bi).sum().backward()

            def whole():
                whole_map_energy(logits, feats, boxes).sum().backward()

            diff = (levelset_energy(logits, feats, boxes, bi)
                    - whole_map_energy(logits, feats, boxes)).abs().max().item()
            print(f"| {n} | {side} | {n * side * side} | {_time(ours, args.repeats):.1f} | "
                  f"{_time(whole, args.repeats):.1f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()

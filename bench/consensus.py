"""Rounds for push-sum gossip (meshd.core.averaging) to reach consensus on the exact mean.

Simulated in memory, training off: every round each node prepares ``fanout`` shares to random peers,
all messages are delivered (minus ``--loss``, which are abandoned), then acknowledged. A node has
converged when ``||z_i - mean|| / ||mean|| <= tol``, ``mean`` being the exact mean of the starting
vectors. Prints a table and writes ``bench/results/consensus.json``.

    .venv/bin/python bench/consensus.py [--seeds 5] [--dim 100] [--tol 1e-6] [--loss 0.0]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from meshd.core.averaging import PushSum, Share, consensus_distance
from meshd.core.codec import CodecName

RESULTS = Path(__file__).resolve().parent / "results" / "consensus.json"


def rounds_to_consensus(
    n: int,
    seed: int,
    *,
    dim: int = 100,
    tol: float = 1e-6,
    fanout: int = 1,
    loss: float = 0.0,
    codec: CodecName = "f64",
    max_rounds: int = 500,
) -> int | None:
    """Rounds until every node is within ``tol`` (relative L2) of the exact mean; None if never."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    start = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    mean = start.mean(dim=0)
    nodes = [PushSum(start[i].clone(), codec=codec) for i in range(n)]
    for rnd in range(1, max_rounds + 1):
        sends: list[tuple[int, int, Share]] = []
        for i, node in enumerate(nodes):
            peers = rng.sample([j for j in range(n) if j != i], fanout)
            sends.extend((i, j, share) for j, share in zip(peers, node.prepare(fanout), strict=True))
        for i, j, share in sends:
            if rng.random() < loss:
                nodes[i].abandon(share.id)
            else:
                nodes[j].merge(share.values, share.weight, share.version)
                nodes[i].confirm(share.id)
        if max(consensus_distance(node.estimate(), mean) for node in nodes) <= tol:
            return rnd
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 32, 96])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--dim", type=int, default=100)
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--fanout", type=int, default=1)
    parser.add_argument("--loss", type=float, default=0.0)
    parser.add_argument("--codecs", nargs="+", default=["f64", "f32"], choices=["f64", "f32", "f16"])
    args = parser.parse_args()

    rows = []
    started = time.perf_counter()
    print(f"rounds to {args.tol:g} relative of the exact mean (fanout={args.fanout}, loss={args.loss})")
    print(f"{'codec':>5} {'n':>4}  {'min':>4} {'median':>6} {'max':>4}  per seed")
    for codec in args.codecs:
        for n in args.sizes:
            per_seed = [
                rounds_to_consensus(
                    n, seed, dim=args.dim, tol=args.tol, fanout=args.fanout, loss=args.loss, codec=codec
                )
                for seed in range(args.seeds)
            ]
            done = [r for r in per_seed if r is not None]
            row = {
                "codec": codec,
                "n": n,
                "rounds": per_seed,
                "min": min(done) if done else None,
                "median": statistics.median(done) if done else None,
                "max": max(done) if len(done) == len(per_seed) else None,
            }
            rows.append(row)
            cells = " ".join("-" if r is None else str(r) for r in per_seed)
            print(f"{codec:>5} {n:>4}  {row['min']!s:>4} {row['median']!s:>6} {row['max']!s:>4}  {cells}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "push-sum rounds to consensus",
        "params": {
            "dim": args.dim,
            "tol": args.tol,
            "fanout": args.fanout,
            "loss": args.loss,
            "seeds": args.seeds,
        },
        "results": rows,
        "seconds": round(time.perf_counter() - started, 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

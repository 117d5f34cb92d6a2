"""Same-run A/B of single-event ingest between source trees: each tree's daemon (its
`destfnd/` package first on PYTHONPATH) on a fresh database, all pinned to CPU 0 as in
bench.py, the load generator on CPU 1, rounds rotating the order so drift hits all alike.

    python bench/ab.py TREE_A TREE_B [TREE_C ...] [--rounds 8] [--duration 4]

A tree is a folder holding a `destfnd/` package, e.g. `git worktree add /tmp/a HEAD~1` or
`git archive HEAD destfnd | tar -x -C /tmp/a`. Prints req/s per round, then per tree the best
and mean req/s, the server's CPU per request, and the mean relative to the first tree. Rounds
of one daemon differ by several percent: trust a difference seen in several runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import bench as B  # bench/ is on sys.path: run as a script


class TreeDaemon(B.Daemon):
    """The daemon of `tree`: `python -m destfnd` with the tree first on PYTHONPATH."""

    def __init__(self, workdir: Path, config: str, cpu: int | None, tree: Path) -> None:
        super().__init__(workdir, config, cpu)
        self.tree = tree

    def start(self, timeout_s: float = 120.0) -> float:
        spawn = B.spawn
        env = dict(os.environ, PYTHONPATH=str(self.tree))
        B.spawn = lambda argv, **kw: spawn(argv, env=env, **kw)
        try:
            return super().start(timeout_s)
        finally:
            B.spawn = spawn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trees", nargs="+", type=Path)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--duration", type=float, default=4.0, help="seconds per round and tree")
    args = p.parse_args()
    if len(args.trees) < 2:
        p.error("give at least two trees")
    for tree in args.trees:
        if not (tree / "destfnd" / "__init__.py").is_file():
            p.error(f"{tree} holds no destfnd/ package")
    options = argparse.Namespace(
        quick=False, no_pin=False, duration=args.duration, rounds=args.rounds, e2e_events=None,
        slow_events=None, backlog=None, batch_events=None, synchronous="FULL",
    )  # fmt: skip
    bench = B.Bench(options)
    tmp = Path(tempfile.mkdtemp(prefix="destfnd-ab-"))
    sink = B.Sink(bench.client_cpu, tmp / "sink.log", mode="hold")
    daemons = []
    rps: list[list[float]] = [[] for _ in args.trees]
    cpu_us: list[list[float]] = [[] for _ in args.trees]
    try:
        for i, tree in enumerate(args.trees):
            work = tmp / f"d{i}"
            config = B.daemon_config(work / "q.sqlite3", sink.url)
            daemon = TreeDaemon(work, config, bench.server_cpu, tree.resolve())
            daemon.start()
            daemons.append(daemon)
        n = len(daemons)
        for r in range(args.rounds):
            for i in [(r + j) % n for j in range(n)]:
                d = daemons[i]
                res = bench.measured(
                    d.proc.pid, d.url, f"ab{r}-{i}", auth=B.WRITE_KEY, mode="closed",
                    concurrency=64, warmup=1.0, duration=args.duration,
                )  # fmt: skip
                rps[i].append(res["requests_per_s"])
                served = res["requests_per_s"] * (args.duration + 1.0)  # with the warm-up
                cpu_us[i].append(res["server_cpu_s"] * 1e6 / served)
                print(f"round {r + 1} {args.trees[i]}: {res['requests_per_s']:,.0f} req/s")
    finally:
        for d in daemons:
            d.stop()
        sink.stop()
    base = sum(rps[0]) / len(rps[0])
    for i, tree in enumerate(args.trees):
        mean = sum(rps[i]) / len(rps[i])
        cpu = sum(cpu_us[i]) / len(cpu_us[i])
        print(
            f"{tree}: best {max(rps[i]):,.0f}, mean {mean:,.0f} req/s, "
            f"CPU ~{cpu:.0f} us/request, mean vs first {mean / base:.3f}"
        )


if __name__ == "__main__":
    sys.exit(main())

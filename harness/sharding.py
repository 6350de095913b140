"""Which process runs which cases when a sweep is split over several (GPUs, nodes, jobs).

A process learns its share from torchrun (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`) or from
`--shard I/N` (a scheduler's job array). The cases are grouped by (variant configuration,
causality, mode): one group's lengths run in one process, in increasing order, so that a group
that runs out of memory at length N records its larger lengths as `oom` without running them,
exactly as a single process does. Groups go to processes by their estimated cost, largest
first, each to the least loaded process (ties to the lowest index). The estimate uses fixed
nominal rates and nothing measured or already finished, so every process computes the same
split from the same command, whenever it starts.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
from dataclasses import dataclass

from harness.config import ConfigError
from harness.estimate import INTERPRETER_SLOWDOWN, case_seconds, interpreted, prepare_seconds

# Nominal FLOP/s of the run's dtype and of float64, per device type: only the ratio of one
# group's cost to another's matters.
NOMINAL_RATES = {"cpu": (50e9, 25e9), "cuda": (200e12, 30e12)}
UNSUPPORTED_COST = 1e-3  # a group whose shapes the variant refuses still writes its rows

Group = tuple[str, bool, str]  # (variant label, causal, mode)


@dataclass(frozen=True)
class Shard:
    """This process's share: `index` of `count`; `local_rank` is torchrun's (None for
    `--shard`)."""

    index: int
    count: int
    local_rank: int | None = None

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """argparse type for `--shard I/N`, 0 <= I < N."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N (e.g. 0/4), got '{text}'")
    index, count = int(match[1]), int(match[2])
    if count < 1 or index >= count:
        valid = f"0..{count - 1}" if count >= 1 else "none: N must be at least 1"
        raise argparse.ArgumentTypeError(f"'{text}': I must be in {valid} (shards are numbered "
                                         f"from 0)")
    return Shard(index, count)


def torchrun_shard(env=os.environ) -> Shard | None:
    """The share torchrun gives this process (RANK of WORLD_SIZE), None outside torchrun."""
    if "WORLD_SIZE" not in env or "RANK" not in env:
        return None
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
    except ValueError:
        raise ConfigError(f"torchrun's RANK, WORLD_SIZE or LOCAL_RANK is not an integer: "
                          f"{env.get('RANK')!r}, {env.get('WORLD_SIZE')!r}, "
                          f"{env.get('LOCAL_RANK')!r}") from None
    if not 0 <= rank < world:
        raise ConfigError(f"torchrun's RANK {rank} is outside 0..{world - 1}")
    return Shard(rank, world, local)


def current_shard(requested: Shard | None, env=os.environ) -> Shard | None:
    """This process's share from `--shard` or torchrun; None for a whole (one-process) run."""
    launched = torchrun_shard(env)
    if requested is not None and launched is not None and launched.count > 1:
        raise ConfigError("--shard and torchrun both split the sweep; drop --shard under "
                          "torchrun")
    shard = requested or launched
    return shard if shard is not None and shard.count > 1 else None


def pin_gpu(shard: Shard, env=os.environ) -> None:
    """Give a torchrun process the GPU of its local rank, as the only one it (and the worker
    processes it starts) can see. Must run before CUDA is initialised."""
    if shard.local_rank is None:
        return
    visible = env.get("CUDA_VISIBLE_DEVICES")
    devices = [d for d in visible.split(",") if d.strip()] if visible else None
    if devices is None:
        env["CUDA_VISIBLE_DEVICES"] = str(shard.local_rank)
    elif shard.local_rank < len(devices):
        env["CUDA_VISIBLE_DEVICES"] = devices[shard.local_rank].strip()
    else:
        raise ConfigError(f"LOCAL_RANK {shard.local_rank} has no GPU: CUDA_VISIBLE_DEVICES "
                          f"lists {len(devices)} ({visible}); start at most {len(devices)} "
                          f"processes per node")


def stop_on_sigterm() -> None:
    """Turn SIGTERM (torchrun stopping the other processes after one failed) into
    KeyboardInterrupt, so that a process ends like a Ctrl-C: written rows kept, worker
    stopped."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def group_of(case) -> Group:
    return (case.variant, case.causal, case.mode)


def group_costs(sweep) -> dict[Group, float]:
    """Estimated seconds of every group of the sweep's cases (finished or not), in the order
    the sweep first reaches them."""
    config = sweep.config
    rate, fp64_rate = NOMINAL_RATES[config.device]
    costs: dict[Group, float] = {}
    for name, shape in sweep.problems():
        for vc in sweep.configs:
            slow = INTERPRETER_SLOWDOWN if config.device == "cpu" and interpreted(vc) else 1.0
            refused = vc.spec.unsupported_reason(shape, vc.params) is not None
            built: set[Group] = set()
            for case, suite in sweep.planned(vc, shape, name):
                group = group_of(case)
                if refused:
                    cost = UNSUPPORTED_COST
                else:
                    cost = case_seconds(config, vc, shape, name, case.mode, suite,
                                        rate / slow, fp64_rate)
                    if group not in built:  # each group builds the variant once per shape
                        cost += prepare_seconds(vc, shape, rate / slow)
                        built.add(group)
                costs[group] = costs.get(group, 0.0) + cost
    return costs


def assign(costs: dict[Group, float], count: int) -> list[set[Group]]:
    """Groups per process: the costliest first, each to the least loaded process."""
    loads = [0.0] * count
    shares: list[set[Group]] = [set() for _ in range(count)]
    for group in sorted(costs, key=lambda g: -costs[g]):  # stable: ties in sweep order
        target = min(range(count), key=lambda p: (loads[p], p))
        loads[target] += costs[group]
        shares[target].add(group)
    return shares


def share_of(sweep, shard: Shard) -> set[Group]:
    """The groups `shard` runs; a sweep with fewer groups than processes is bad input."""
    costs = group_costs(sweep)
    if shard.count > len(costs):
        cases = sum(len(sweep.planned(vc, shape, name)) for name, shape in sweep.problems()
                    for vc in sweep.configs)
        raise ConfigError(f"{shard.count} processes for a sweep of {cases} cases in "
                          f"{len(costs)} groups (variant x causal x mode, whose lengths run in "
                          f"one process); use at most {len(costs)} processes")
    return assign(costs, shard.count)[shard.index]

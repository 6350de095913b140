"""One process's part of a sharded sweep (`harness.sharding`), written as `harness.shardfiles`
describes, and the choice between it and a whole sweep.

A process creates meta.json when it is the first to start (the run's configuration, command,
environment, and `sharding.world_size`), or checks that the run it joins has the same
configuration and GPU model; it records its host, GPU and calibration time, runs the
unfinished cases of its share, and merges. No collective operation is used: a process never
waits on another.
"""
from __future__ import annotations

import json
import shlex
import socket
from datetime import datetime, timezone
from pathlib import Path

import torch

from harness.calibration import calibrate
from harness.config import BenchConfig, ConfigError, RunOptions
from harness.environment import fingerprint
from harness.results import META_FILE, RESULTS_FILE, read_meta
from harness.runner import Sweep, check_same_gpu
from harness.shardfiles import Merged, existing_rows, has_parts, merge
from harness.shardfiles import rank_dir, rank_dirs, run_lock, write_json, write_record
from harness.sharding import Shard, group_of, share_of


class ShardedSweep(Sweep):
    """The cases of one share of the sweep, written to this process's own directory.

    After `run`, `merged` says whether the run is complete and whether this process's merge
    completed it.
    """

    def __init__(self, config: BenchConfig, run_dir: Path, shard: Shard, resume: bool = False,
                 console=None, options: RunOptions | None = None):
        self.shard = shard
        super().__init__(config, run_dir, console=console, options=options)
        self.resume = resume
        self.share = share_of(self, shard)
        self.rows_dir = rank_dir(self.run_dir, shard.index)
        self.calibration: dict | None = None
        self.merged: Merged | None = None

    def existing_rows(self):
        """Every process's rows, less the case a killed process left unfinished at the end of
        this process's file (of every process's file when this is the only process: a run
        resumed whole)."""
        own = (rank_dirs(self.run_dir) if self.shard.count == 1
               else [rank_dir(self.run_dir, self.shard.index)])
        for directory in own:
            self.drop_unfinished_case(directory / RESULTS_FILE)
        return existing_rows(self.run_dir)

    def cases_for(self, vc, shape, inputs: str = "randn"):
        return [(case, name) for case, name in super().cases_for(vc, shape, inputs)
                if group_of(case) in self.share]

    def run(self, command: list[str] | None = None) -> Path:
        self.rows_dir.mkdir(parents=True, exist_ok=True)
        self.calibration = calibrate(self.device)
        super().run(command)
        self.merged = merge(self.run_dir, case_order(self))
        return self.run_dir

    def write_meta(self, command: list[str]) -> None:
        """Create meta.json, or check the run this process joins; record this process."""
        here = fingerprint(self.device)
        with run_lock(self.run_dir):
            previous = read_meta(self.run_dir)
            if previous:
                self.check_joinable(previous)
                check_same_gpu(self.run_dir, previous, here)
            else:
                meta = self.new_meta(command)
                meta["sharding"] = {"world_size": self.shard.count, "ranks": []}
                write_json(self.run_dir / META_FILE, meta)
        write_record(self.run_dir, self.shard.index, {
            "rank": self.shard.index, "world_size": self.shard.count,
            "local_rank": self.shard.local_rank, "host": socket.gethostname(),
            "device": here["device"], "gpu": here["gpu"], "gpu_uuid": gpu_uuid(self.device),
            "calibration": self.calibration, "command": shlex.join(command),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        })  # fmt: skip

    def check_joinable(self, previous: dict) -> None:
        """A process of a new run (`--out`) joins only the same sharded run."""
        if self.resume:
            return
        out = self.run_dir
        stored = (previous.get("sharding") or {}).get("world_size")
        if stored is None:
            raise ConfigError(f"--out {out} already holds a run; finish it with --resume {out}, "
                              f"or choose a new --out directory")
        if stored != self.shard.count or previous.get("config") != as_json(self.config):
            raise ConfigError(f"--out {out} holds a sharded run of {stored} processes with "
                              f"another configuration or process count; finish it with "
                              f"--resume {out}, or choose a new --out directory")


def as_json(config: BenchConfig) -> dict:
    """The configuration as meta.json stores it (lists, not tuples)."""
    return json.loads(json.dumps(config.as_dict()))


def case_order(sweep: Sweep) -> list[tuple]:
    """Every case key of `sweep`, finished or not, in the order a single process runs them."""
    return [case.key for name, shape in sweep.problems() for vc in sweep.configs
            for case, _ in sweep.planned(vc, shape, name)]


def gpu_uuid(device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    return str(getattr(torch.cuda.get_device_properties(device), "uuid", None))


def make_sweep(config: BenchConfig, run_dir: Path, options: RunOptions, shard: Shard | None,
               resume: bool) -> Sweep:
    """This process's sweep: its share of a sharded run, or the whole run. A whole run that
    continues a sharded one is its only process (share 0 of 1), so that it reads the rows of
    every process and ends with the merge."""
    if shard is None and resume and (has_parts(run_dir) or "sharding" in read_meta(run_dir)):
        shard = Shard(0, 1)
    if shard is not None:
        return ShardedSweep(config, run_dir, shard, resume=resume, options=options)
    return Sweep(config, run_dir, options=options)


def require_run_dir(shard: Shard | None, out: Path | None, resume: Path | None) -> None:
    """Every process of a sharded run writes into one directory, which the command names."""
    if shard is not None and out is None and resume is None:
        raise ConfigError(f"a sharded run (torchrun or --shard, here {shard}) needs --out "
                          f"RUN_DIR, the same for every process (or --resume RUN_DIR)")

"""Running cases in a worker process, so that a crash or a hang costs one case, not the sweep.

One long-lived worker (started with multiprocessing's "spawn", which is safe with CUDA) builds
each variant and measures its cases, sending every case's rows back as soon as it finishes.
The sweep waits at most `case_timeout` seconds for each step (building the variant, then each
case). When the worker dies (a segfault, `os.abort()`, a killed process) or does not answer in
time, the case it was on becomes an `error` or `timeout` row with the reason, the worker is
replaced, and the remaining cases go to the new one. On CUDA a worker retires after an `error`
row, since a faulting kernel can leave its CUDA context unusable for every later case.
The worker's own stdout and stderr go to `worker.log` in the directory where the sweep writes
its rows (the run directory, or a sharded run's `shards/rank-I/`); a lost worker's row names it.
"""
from __future__ import annotations

import faulthandler
import multiprocessing
import os
import signal
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

from harness.config import BenchConfig
from harness.executor import Todo
from harness.registry import Shape, VariantConfig
from harness.results import Row
from harness.roofline import Roofline
from harness.suite import get_suite

LOG_FILE = "worker.log"
START_TIMEOUT_S = 300.0  # importing torch and the variants, before any case runs


class WorkerLost(Exception):
    """The worker died or did not answer in time; `status` and `reason` name what happened."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


class Worker:
    """One worker process and the pipe to it."""

    def __init__(self, config: BenchConfig, roofline: Roofline | None, log_path: Path):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.log_path = log_path
        self.process = ctx.Process(
            target=worker_main, name="attnbench-worker",
            args=(child, config.as_dict(), roofline.as_dict() if roofline else None, str(log_path)),
        )  # fmt: skip
        self.process.start()
        child.close()
        self.ready = False

    def send(self, message) -> None:
        try:
            self.conn.send(message)
        except (BrokenPipeError, ConnectionResetError, EOFError):
            raise self._died() from None

    def receive(self, timeout: float | None) -> tuple:
        """The next message; raises `WorkerLost` on death or after `timeout` seconds (None or
        0: wait as long as it takes)."""
        if not self.ready:  # start-up is not a case's time
            self._wait(max(START_TIMEOUT_S, timeout or 0), "the worker did not start")
            message = self._recv()
            if message[0] != "ready":
                raise WorkerLost("error", f"worker failed to start: {message[1]}")
            self.ready = True
        if timeout:
            self._wait(timeout, f"no result within {timeout:g} s (--case-timeout)")
        return self._recv()

    def _wait(self, timeout: float | None, what: str) -> None:
        if not self.conn.poll(timeout):
            raise WorkerLost("timeout", f"{what}; worker stopped")

    def _recv(self) -> tuple:
        try:
            return self.conn.recv()
        except (EOFError, ConnectionResetError, OSError):
            raise self._died() from None

    def _died(self) -> WorkerLost:
        self.process.join(5)
        code = self.process.exitcode
        if code is not None and code < 0:
            how = f"killed by {signal.Signals(-code).name}"
        else:
            how = f"exit code {code}"
        return WorkerLost("error", f"worker process died ({how}); its output is in {self.log_path}")

    def stop(self) -> None:
        """End the process (at once: it may be hung) and close the pipe."""
        if self.process.is_alive():
            self.process.kill()
        self.process.join(10)
        self.conn.close()


class IsolatedRunner:
    """Runs groups of cases in a worker process, replacing it after a crash or a hang."""

    def __init__(self, config: BenchConfig, roofline: Roofline | None, run_dir: Path,
                 case_timeout: float):
        self.config, self.roofline = config, roofline
        self.log_path = Path(run_dir) / LOG_FILE
        self.case_timeout = case_timeout
        self.worker: Worker | None = None
        self.progress = None  # (done, total) callback for the steps of a long case

    def run_group(self, vc: VariantConfig, shape: Shape, todo: Todo,
                  inputs: str = "randn") -> Iterator[list[Row]]:
        """Yield the rows of each case in `todo`, in order, whatever happens to the worker."""
        pending = list(todo)
        while pending:
            if self.worker is None:
                self.worker = Worker(self.config, self.roofline, self.log_path)
            prepared = False
            try:
                self.worker.send(("job", vc.spec.name, vc.params, shape, inputs, pending))
                while True:  # until the worker says the job is done (or retires)
                    kind, payload = self.worker.receive(self.case_timeout)
                    if kind == "prepared":
                        prepared = True
                    elif kind == "progress":
                        if self.progress:
                            self.progress(*payload)
                    elif kind == "rows":
                        pending.pop(0)
                        yield payload
                    elif kind == "retire":  # CUDA context may be poisoned: a fresh worker
                        self.stop()
                        break
                    elif kind == "done":
                        break
            except WorkerLost as lost:
                self.stop()
                # Lost while building the variant: every case of the group shares the fault.
                lost_cases = pending[:1] if prepared else pending
                reason = lost.reason if prepared else f"{lost.reason}, building the variant"
                for case, suite_name in lost_cases:
                    yield [Row(case, get_suite(suite_name).primary, None, lost.status,
                               reason)]
                pending = pending[len(lost_cases):]

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker = None

    close = stop


def worker_main(conn: Connection, config: dict, roofline: dict | None, log_path: str) -> None:
    """The worker process: load the variants, then build and measure what the parent sends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for fd in (1, 2):
        os.dup2(log, fd)
    faulthandler.enable()  # a fatal signal leaves a traceback in the log
    try:
        from harness.executor import CaseRunner
        from harness.plugins import load_plugins
        from harness.registry import get_variant
        from suites import load_builtin_suites
        from variants import load_builtin_variants

        cfg = BenchConfig.from_dict(config)
        load_builtin_suites()
        load_builtin_variants()
        load_plugins(cfg.plugins)
        runner = CaseRunner(cfg, Roofline(**roofline) if roofline else None,
                            Path(log_path).parent)
        runner.progress = lambda done, total: conn.send(("progress", (done, total)))
    except Exception as exc:  # noqa: BLE001 - reported to the parent as the start failure
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", None))
    cuda = runner.device.type == "cuda"
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        _, name, params, shape, inputs, todo = job
        trial, failure = runner.try_prepare(VariantConfig(get_variant(name), params), shape,
                                            inputs)
        conn.send(("prepared", None))
        poisoned = False
        for case, suite_name in todo:
            rows = runner.rows_of(trial, failure, case, suite_name)
            conn.send(("rows", rows))
            poisoned = poisoned or (cuda and any(r.status == "error" for r in rows))
            if poisoned and failure is None:
                break
        if poisoned:
            conn.send(("retire", None))
            return
        conn.send(("done", None))

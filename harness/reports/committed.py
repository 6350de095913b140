"""Whether a run is part of a repository's committed results (what a README may show).

A README's results section must describe results a reader of the repository has: the run's
results.csv committed, unmodified, inside the README's repository, and its plots/ folder not
ignored by git (its figures will be committed beside it).
"""
from __future__ import annotations

import subprocess
from pathlib import Path

from harness.results import RESULTS_FILE


def _git(cwd: Path, *args: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None


def uncommitted_reason(run_dir: Path, readme: Path) -> str | None:
    """Why `run_dir` may not be written into `readme` (None when it may), in one line."""
    where = readme.resolve().parent
    top = _git(where, "rev-parse", "--show-toplevel")
    if top is None or top.returncode != 0:
        return f"{readme} is not in a git repository, so no run of it is committed"
    root = Path(top.stdout.strip()).resolve()
    run = Path(run_dir).resolve()
    if not run.is_relative_to(root):
        return f"run {run_dir} is outside the repository of {readme} ({root})"
    csv = (run / RESULTS_FILE).relative_to(root).as_posix()
    tracked = _git(root, "ls-files", "--error-unmatch", "--", csv)
    if tracked is None or tracked.returncode != 0:
        return f"run {run_dir} is not committed ({csv} is not tracked by git)"
    changed = _git(root, "diff", "--quiet", "HEAD", "--", csv)
    if changed is None or changed.returncode != 0:
        return f"run {run_dir} has uncommitted changes in {csv}"
    figure = (run / "plots" / "scaling.png").relative_to(root).as_posix()
    ignored = _git(root, "check-ignore", "-q", "--no-index", "--", figure)
    if ignored is not None and ignored.returncode == 0:
        return f"the figures of run {run_dir} would not be committed ({figure} is ignored by git)"
    return None

"""The environment fingerprint stored in meta.json: hardware, software and code version."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def _run(*cmd: str) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=REPO)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state() -> tuple[str | None, bool | None]:
    """(commit sha, dirty flag). ATTNBENCH_GIT_SHA / ATTNBENCH_GIT_DIRTY, when set, win over
    the checkout: a copied working tree (e.g. on a remote GPU machine) may carry a stale .git,
    or none."""
    env_sha = os.environ.get("ATTNBENCH_GIT_SHA")
    env_dirty = os.environ.get("ATTNBENCH_GIT_DIRTY")
    if env_sha:
        return env_sha, (env_dirty == "1") if env_dirty is not None else None
    sha = _run("git", "rev-parse", "HEAD")
    if sha:
        return sha, bool(_run("git", "status", "--porcelain", "--untracked-files=no"))
    return None, None


def fingerprint(device: torch.device) -> dict:
    """GPU (or CPU) name, driver, CUDA, torch, triton, python versions and git state."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    sha, dirty = git_state()
    info = {
        "device": device.type,
        "gpu": None,
        "driver": None,
        "cuda": torch.version.cuda,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": sys.version.split()[0],
        "git_sha": sha,
        "git_dirty": dirty,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["driver"] = _run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
    return info

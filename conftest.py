"""pytest set-up: Triton kernels run under the interpreter when there is no GPU.

TRITON_INTERPRET must be set before any `@triton.jit` function is defined, so it is set
here, before test modules import the variants.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from suites import load_builtin_suites  # noqa: E402 - after TRITON_INTERPRET

load_builtin_suites()  # metric declarations that results, summaries and reports read

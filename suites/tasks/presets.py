"""The task settings of each preset: task, length, task options and training recipe.

`tasks` (GPU): MQAR at 256 (16 pairs) and 2048 (64 pairs), ListOps of 1500 to 2000 tokens,
character LM at 1024 and 4096, each for a budget of 4M training tokens (16K a step), sized so
that five variants x three seeds finish in a few minutes on one H200. `tasks-smoke` (CPU): the
same tasks shrunk to lengths 32 to 64 and tiny models, for tests and a first look (about ten
seconds a run on a 2-core CPU).

The recipe was fixed once, before any variant was compared, from common small-model defaults
(AdamW at 1e-3 to 3e-3, warm-up then cosine, width 128 with head dim 64, which the Triton kernels
take) and checked only in that exact softmax learns each task's smoke setting; every variant
gets the same one. The smoke MQAR setting is sized so that exact softmax solves it on a CPU,
not only beats chance (with 4 pairs a model that picks one of the context's values scores 1/4):
8 keys, 8 values and 500 steps at the same learning rate, about ten seconds a run.

ListOps lengths lie in 3N/4 .. N rather than LRA's N/4 .. N: the variants take q, k, v only,
with no key-padding mask, so the padding a global variant attends to (and a band one mostly
does not) is kept to at most a quarter of the sequence.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from suites.tasks.catalog import TaskError, make_task
from suites.tasks.train import Recipe

GPU_BUDGET = 4_000_000  # training tokens per run of the GPU preset
GPU = Recipe(dim=128, layers=2, heads=2, lr=3e-3, tokens=GPU_BUDGET)
SMOKE = Recipe(dim=32, layers=2, heads=2, batch=32, lr=3e-3, tokens=32 * 32 * 200)
SMOKE_MQAR = Recipe(**{**SMOKE.as_dict(), "tokens": 32 * 32 * 500})


@dataclass(frozen=True)
class Setting:
    """One task at one length, with its options and recipe."""

    task: str
    seq_len: int
    recipe: Recipe
    options: dict = field(default_factory=dict)

    def make(self):
        return make_task(self.task, self.seq_len, **self.options)

    def describe(self) -> dict:
        """What a row records about the setting (task options, corpus, recipe)."""
        return {"task": self.task, **self.make().describe(), "recipe": self.recipe.as_dict()}


def _gpu(task: str, n: int, batch: int, **options) -> Setting:
    return Setting(task, n, Recipe(**{**GPU.as_dict(), "batch": batch}), options)


SETTINGS: dict[str, tuple[Setting, ...]] = {
    "tasks": (
        _gpu("mqar", 256, 64, pairs=16, vocab=512),
        _gpu("mqar", 2048, 8, pairs=64, vocab=512),
        _gpu("listops", 2000, 8, min_len=1500, pool=2048),
        _gpu("charlm", 1024, 16),
        _gpu("charlm", 4096, 4),
    ),
    "tasks-smoke": (
        Setting("mqar", 32, SMOKE_MQAR, {"pairs": 4, "vocab": 16, "test_count": 64}),
        Setting("listops", 64, SMOKE, {"min_len": 48, "max_depth": 4, "max_args": 5,
                                        "test_count": 64, "pool": 512}),
        Setting("charlm", 64, SMOKE, {"test_count": 16, "test_span": 256}),
    ),
}


def settings_for(preset: str, tasks: tuple[str, ...]) -> list[Setting]:
    """The settings of `tasks` in the task preset `preset`."""
    if preset not in SETTINGS:
        raise TaskError(f"no task settings in preset '{preset}'; valid: {', '.join(SETTINGS)}")
    table = SETTINGS[preset]
    known = list(dict.fromkeys(s.task for s in table))
    if not tasks:
        raise TaskError(f"--task needs at least one task; valid: {', '.join(known)}")
    for name in tasks:
        if name not in known:
            raise TaskError(f"unknown task '{name}'; valid: {', '.join(known)}")
    return [s for s in table if s.task in tasks]

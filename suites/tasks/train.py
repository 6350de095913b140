"""Training one model on one task: fixed token budget, AdamW, the same recipe for every variant.

The recipe (`Recipe`) is fixed per preset and never tuned per variant: AdamW (betas 0.9/0.98,
weight decay 0.1 on matrices only), the preset's peak learning rate (3e-3 in both) after a linear
warm-up over the first 10% of steps and decayed by a cosine to 10% of the peak, gradients clipped
to norm 1. The token budget fixes the number of steps (`tokens // (batch * N)`), so variants are
compared at equal data. Under CUDA the forward runs in `torch.autocast` with the run's dtype when
that is bf16 or fp16 (the variant then sees q, k, v in that dtype); in fp32 otherwise
(`training_dtype` says which; the task suite refuses the dtypes a device cannot train in).

A non-finite loss or gradient norm stops the run, and so do non-finite weights or held-out logits
after the last step: `Outcome.diverged_at` is the step and `Outcome.diverged` says what turned.
The loss and the gradient norm of every step are read in batches of `LOG_EVERY` steps, so the
loop waits for the device only then.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from suites.tasks.catalog import Task
from suites.tasks.model import AttentionFactory, TaskModel

LOG_EVERY = 10  # steps between reads of the loss (each read waits for the device)


@dataclass(frozen=True)
class Recipe:
    """Model size and optimisation of one task setting."""

    dim: int = 128
    layers: int = 2
    heads: int = 2
    batch: int = 16
    tokens: int = 1_000_000  # training budget: input tokens seen
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: float = 0.1  # fraction of steps
    clip: float = 1.0

    def steps(self, seq_len: int) -> int:
        return max(1, self.tokens // (self.batch * seq_len))

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Outcome:
    """What a training run measured; `curve` rows are the learning curve."""

    metrics: dict[str, float] = field(default_factory=dict)
    curve: list[dict] = field(default_factory=list)
    diverged_at: int | None = None
    diverged: str = ""  # what turned non-finite: "training loss", "gradient norm", ...

    def fail(self, step: int, what: str) -> None:
        self.diverged_at, self.diverged = step, what


Progress = Callable[[int, int], None]  # (steps done, steps in all)


def optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """AdamW; weight decay on weight matrices and embeddings, none on biases, norms, blends."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": recipe.weight_decay},
              {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, 0.98))


def lr_factor(step: int, steps: int, warmup: float) -> float:
    """Linear warm-up to 1, then cosine decay to 0.1."""
    ramp = max(1, int(steps * warmup))
    if step < ramp:
        return (step + 1) / ramp
    t = (step - ramp) / max(1, steps - ramp)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * t))


def autocast_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype | None:
    """The autocast dtype of a run: bf16 on CUDA, else none (fp32)."""
    if device.type == "cuda" and dtype == torch.bfloat16:
        return dtype
    return None


def training_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype the variant computes in when a run of `dtype` trains on `device`."""
    return autocast_dtype(device, dtype) or torch.float32


def trainable_dtypes(device_type: str) -> tuple[torch.dtype, ...]:
    """The run dtypes a model trains in as asked on a device of `device_type`: fp32 everywhere
    (no autocast), bf16 through autocast on CUDA only. fp16 would need loss scaling, which the
    training loop does not do, so it is refused rather than left to underflow."""
    if device_type == "cuda":
        return (torch.float32, torch.bfloat16)
    return (torch.float32,)


def evaluate(model: TaskModel, task: Task, device: torch.device, amp: torch.dtype | None,
             batch: int) -> float | None:
    """The task's held-out metric (accuracy, or bits per character); None when a held-out
    logit is not finite."""
    model.eval()
    x_all, y_all = task.test_set
    total, count = 0.0, 0
    finite = torch.ones((), dtype=torch.bool, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32,
                                         enabled=amp is not None):
        for start in range(0, len(x_all), batch):
            x = x_all[start:start + batch].to(device)
            y = y_all[start:start + batch].to(device)
            logits = model(x).float()
            finite &= torch.isfinite(logits).all()
            s, n = task.score(logits, y)
            total, count = total + s, count + n
    model.train()
    return total / max(count, 1) if bool(finite) else None


def weights_finite(model: torch.nn.Module) -> bool:
    """Whether every parameter of `model` is finite (one read of the device)."""
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())


def train(task: Task, attention: AttentionFactory, recipe: Recipe, device: torch.device,
          dtype: torch.dtype, seed: int, progress: Progress | None = None) -> Outcome:
    """Train a fresh model (seeded by `seed`) on `task` for the recipe's budget and score it.

    Metrics: the task's `metric` on the held-out set, `train_tokens_per_s` (input tokens per
    second over the training steps, batches included) and `final_train_loss`.
    """
    torch.manual_seed(seed)
    model = TaskModel(task.vocab, task.seq_len, recipe.dim, recipe.layers, recipe.heads,
                      attention, classes=task.classes).to(device)
    opt = optimizer(model, recipe)
    steps = recipe.steps(task.seq_len)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, recipe.warmup))
    amp = autocast_dtype(device, dtype)
    gen = torch.Generator().manual_seed(seed)
    outcome, pending, tokens = Outcome(), [], 0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for step in range(steps):
        x, y = task.train_batch(recipe.batch, gen)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = task.loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip)
        opt.step()
        schedule.step()
        tokens += x.numel()
        pending.append((step + 1, tokens, loss.detach(), grad_norm.detach()))
        if (step + 1) % LOG_EVERY == 0 or step + 1 == steps:
            if not record(outcome, pending):
                return outcome
            pending = []
            if progress:
                progress(step + 1, steps)
    sync()
    seconds = time.perf_counter() - start
    if not weights_finite(model):
        outcome.fail(steps, "weights")
        return outcome
    score = evaluate(model, task, device, amp, recipe.batch)
    if score is None:
        outcome.fail(steps, "held-out logits")
        return outcome
    outcome.metrics = {
        task.metric: score,
        "train_tokens_per_s": tokens / seconds,
        "final_train_loss": outcome.curve[-1]["train_loss"],
    }
    return outcome


def record(outcome: Outcome, pending: list[tuple[int, int, torch.Tensor, torch.Tensor]]) -> bool:
    """Append (step, tokens so far, loss) rows to the curve; False (and the failure set) at the
    first step whose loss or gradient norm is not finite."""
    values = torch.stack([torch.stack([loss.float(), norm.float()])
                          for _, _, loss, norm in pending]).cpu().tolist()
    for (step, tokens, _, _), (loss, norm) in zip(pending, values):
        if not math.isfinite(loss):
            outcome.fail(step, "training loss")
            return False
        if not math.isfinite(norm):
            outcome.fail(step, "gradient norm")
            return False
        outcome.curve.append({"step": step, "tokens": tokens, "train_loss": loss})
    return True

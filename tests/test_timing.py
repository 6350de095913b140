"""Timing of closures: CUDA-graph replays time the same work as the calls they capture."""
import time

import pytest
import torch

from harness.timing import EventClock, graph_replay, time_closure



def test_cpu_timing_resets_gradients_between_calls():
    x = torch.randn(64, 64, requires_grad=True)
    calls = []

    def fwd_bwd():
        calls.append(x.grad)  # None every time: reset before each call
        (x @ x).sum().backward()

    stats = time_closure(fwd_bwd, torch.device("cpu"), rep_ms=5, grad_to_none=[x])
    assert 0 < stats.p20 <= stats.median <= stats.p80
    assert calls and all(g is None for g in calls)


@pytest.mark.cuda
def test_graph_replay_writes_the_gradients_of_a_fresh_backward():
    """A captured forward and backward: each replay recomputes the output and writes (not
    accumulates) the gradients an uncaptured call gives, on new input values."""
    w = torch.randn(256, 256, device="cuda", requires_grad=True)
    x = torch.randn(256, 256, device="cuda")
    replay = graph_replay(lambda: (torch.tanh(x @ w) ** 2).sum().backward(), [w])
    for _ in range(3):
        x.copy_(torch.randn_like(x))  # the graph reads x's memory: new values each replay
        replay()
        got = w.grad.clone()
        want = torch.autograd.grad((torch.tanh(x @ w) ** 2).sum(), w)[0]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
def test_cuda_graph_timing_measures_the_gpu_work():
    a = torch.randn(4096, 4096, device="cuda")
    one = time_closure(lambda: a @ a, torch.device("cuda"), cuda_graph=True)
    four = time_closure(lambda: [a @ a for _ in range(4)], torch.device("cuda"), cuda_graph=True)
    assert 0 < one.median and 3 * one.median < four.median < 5 * one.median


@pytest.mark.cuda
def test_event_clock_advances_by_the_gpu_time_of_timed_calls_cuda():
    """Read around a timed call, the clock gives that call's CUDA-event time (as do_bench
    measures it), and host time between calls does not move it."""
    a = torch.randn(4096, 4096, device="cuda")
    clock = EventClock()
    one, four = clock.timed(lambda: a @ a), clock.timed(lambda: [a @ a for _ in range(4)])
    one()
    before = clock.now()
    one()
    t_one = clock.now() - before
    time.sleep(0.05)
    before = clock.now()
    four()
    t_four = clock.now() - before
    reference = time_closure(lambda: a @ a, torch.device("cuda")).median * 1e-3
    assert 0.5 * reference < t_one < 2 * reference and 3 * t_one < t_four < 5 * t_one

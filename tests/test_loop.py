import math

import pytest

from multitoken.config import TrainConfig
from multitoken.errors import UserError
from multitoken.loop import lr_at, training_loop
from multitoken.loss import LossReport


def fake_step(calls):
    def step_fn(step, lr):
        calls.append((step, lr))
        return LossReport(float(step), [float(step)]), 0.5

    return step_fn


def test_the_loop_runs_every_step_with_the_schedule_and_logs_each():
    cfg = TrainConfig(max_steps=7, warmup_steps=2, lr=1.0)
    calls, records, after = [], [], []
    result = training_loop(fake_step(calls), cfg, tokens_per_step=10, log=records.append,
                           after_step=lambda step, report: after.append((step, report.total)))  # fmt: skip
    assert [s for s, _ in calls] == list(range(7))
    assert [lr for _, lr in calls] == [lr_at(s / 7, s, cfg) for s in range(7)]
    assert result.step == 7 and result.losses == [float(s) for s in range(7)]
    assert [r["step"] for r in records] == list(range(1, 8)) and records[0]["grad_norm"] == 0.5
    assert {"loss", "per_head", "lr", "tokens_per_s", "elapsed_s"} <= set(records[0])
    assert after == [(s + 1, float(s)) for s in range(7)]  # after the step, with its report


def test_a_resumed_loop_continues_the_schedule_where_it_stopped():
    cfg = TrainConfig(max_steps=10, warmup_steps=3, lr=2.0)
    calls = []
    result = training_loop(fake_step(calls), cfg, tokens_per_step=1, start_step=6)
    assert calls == [(s, lr_at(s / 10, s, cfg)) for s in range(6, 10)] and result.step == 10


def test_the_time_budget_stops_the_loop_and_drives_the_schedule():
    cfg = TrainConfig(max_steps=1_000_000, warmup_steps=1, lr=1.0, time_budget_s=100.0)
    clock = iter(range(0, 1000, 30))  # each step sees 30 more seconds on the shared clock
    calls = []
    result = training_loop(fake_step(calls), cfg, tokens_per_step=1, shared_clock=lambda _: float(next(clock)))
    assert result.step == 4  # at 0, 30, 60, 90 s; 120 s is past the budget
    assert calls[3][1] == pytest.approx(lr_at(0.9, 3, cfg))  # progress is the budget's share when it is larger
    assert math.isclose(calls[3][1], 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.9)))


def test_elapsed_time_before_the_loop_counts_against_the_budget():
    cfg = TrainConfig(max_steps=5, time_budget_s=10.0)
    assert training_loop(fake_step([]), cfg, tokens_per_step=1, elapsed_before=11.0).step == 0


def test_a_cpu_budget_counts_this_process_cpu_seconds_not_the_wall(monkeypatch):
    """A process that sleeps (as one on a shared machine waits for a core) uses up a wall budget, not a CPU one."""
    import time

    def sleeping(step, lr):
        time.sleep(0.05)
        return LossReport(1.0, [1.0]), 0.0

    wall = TrainConfig(max_steps=6, time_budget_s=0.12)
    cpu = TrainConfig(max_steps=6, time_budget_s=0.12, budget_clock="cpu")
    assert training_loop(sleeping, wall, tokens_per_step=1).step < 6
    assert training_loop(sleeping, cpu, tokens_per_step=1).step == 6
    with pytest.raises(UserError, match="budget_clock"):
        TrainConfig(budget_clock="gpu")


def test_an_error_in_a_step_ends_the_loop_and_reaches_the_caller():
    def failing(step, lr):
        if step == 2:
            raise UserError("diverged")
        return LossReport(1.0, [1.0]), 0.0

    with pytest.raises(UserError, match="diverged"):
        training_loop(failing, TrainConfig(max_steps=5), tokens_per_step=1, progress=True)

"""Smoke tests of the benchmarks on tiny configurations: documents have the expected keys. No timing asserts."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from multitoken.bench import memory, train_speed
from multitoken.bench.memory import StepSpec, measure_step, run_worker

TINY = dict(dim=64, n_layers=4, vocab_size=97, context=16, warmup=1, steps=1, threads=1)
RESULT_KEYS = {"spec", "params", "flops_per_token", "memory_kind", "baseline_mib", "peak_mib", "peak_increase_mib",
               "step_times_s", "step_time_s", "tokens_per_s"}  # fmt: skip


@pytest.mark.parametrize("method", memory.METHODS)
def test_measure_step_in_process(method: str) -> None:
    result = measure_step(StepSpec(n_future=2, method=method, chunk=4, **TINY))
    assert RESULT_KEYS <= result.keys()
    assert result["spec"]["method"] == method
    assert result["peak_mib"] > 0 and len(result["step_times_s"]) == 1


def test_worker_runs_in_a_fresh_process() -> None:
    result = run_worker(StepSpec(n_future=2, **TINY), timeout_s=120)
    assert "error" not in result, result.get("error")
    assert RESULT_KEYS <= result.keys()


def _in_process(spec: StepSpec, timeout_s: float = 0.0) -> dict:
    return measure_step(spec)


def _parse(module, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


def test_memory_document(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(memory, "run_worker", _in_process)  # the plumbing, without a process per config
    args = _parse(memory, [
        "--dim", "64", "--layers", "3", "--n", "2", "--vocab", "97", "--sweep-layers", "3", "--sweep-vocab", "50",
        "--sweep-n", "1,2", "--context", "16", "--steps", "1", "--chunk", "4", "--device", "cpu",
        "--plot-dir", str(tmp_path),
    ])  # fmt: skip
    doc = memory.run(args)
    assert {"benchmark", "machine", "settings", "compare", "targets", "sweep", "plots"} <= doc.keys()
    rows = doc["compare"][0]["rows"]
    assert [r["label"] for r in rows] == ["n=1", "n=2 summed-loss", "n=2 sequential", "n=2 sequential+chunk4"]
    assert {"mem_ratio", "time_ratio", "flop_ratio", "time_over_flop"} <= rows[1].keys()
    assert {t["config"] for t in doc["targets"]} == {"n=2 sequential", "n=2 sequential+chunk4"}
    assert len(doc["sweep"][0]["rows"]) == 1 + len(memory.METHODS)  # n=1 once, then each method at n=2
    assert all(Path(p).stat().st_size > 0 for p in doc["plots"])


def test_train_document(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(train_speed, "run_worker", _in_process)
    args = _parse(train_speed, [
        "--dim", "64", "--layers", "3", "--vocab", "97", "--n-list", "1,2", "--context", "16", "--steps", "1",
        "--repeats", "1", "--device", "cpu", "--peak-tflops", "1.0", "--plot-dir", str(tmp_path),
    ])  # fmt: skip
    doc = train_speed.run(args)
    assert {"benchmark", "machine", "settings", "peak_tflops", "peak_source", "rows", "plots"} <= doc.keys()
    assert doc["peak_source"] == "--peak-tflops"
    assert [r["spec"]["n_future"] for r in doc["rows"]] == [1, 2]
    assert {"tflops", "mfu", "time_ratio", "flop_ratio", "time_over_flop"} <= doc["rows"][1].keys()
    assert Path(doc["plots"][0]).stat().st_size > 0


def test_matmul_peak_is_positive() -> None:
    assert train_speed.measure_matmul_tflops(memory.torch.device("cpu"), "fp32", size=128, seconds=0.05) > 0


def test_compiled_blocks_are_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    # Inductor takes minutes on 2 cores: the "eager" backend compiles through Dynamo only, which is enough to
    # check that --compile reaches the worker's model and that its steps still run and are timed.
    compiled = []

    def compile_eager(model):
        compiled.append(model)
        memory_compile(model, backend="eager")

    memory_compile = memory.compile_blocks
    monkeypatch.setattr(memory, "compile_blocks", compile_eager)
    monkeypatch.setattr(train_speed, "run_worker", _in_process)
    args = _parse(train_speed, [
        "--dim", "64", "--layers", "3", "--vocab", "97", "--n-list", "2", "--context", "16", "--steps", "1",
        "--repeats", "1", "--device", "cpu", "--peak-tflops", "1.0", "--compile",
    ])  # fmt: skip
    doc = train_speed.run(args)
    assert doc["settings"]["compile"] and doc["rows"][0]["spec"]["compile"] and len(compiled) == 1
    assert all(block._compiled_call_impl is not None for block in [*compiled[0].trunk, *compiled[0].heads])
    assert doc["rows"][0]["step_time_s"] > 0

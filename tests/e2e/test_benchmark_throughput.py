"""End to end: `tools/benchmark_throughput.py` on CPU, as docs/benchmarks.md runs it (smaller)."""
import re

from tests.cli import ok, run_tool


def test_cpu_throughput_table(shakespeare_corpus, tmp_path):
    result = ok(run_tool("benchmark_throughput.py", shakespeare_corpus + [
        "--warmup", "1", "--iters", "2", "model=tiny", "model.num_layers=2", "data.seq_length=32",
        "train.global_batch_size=4", "train.micro_batch_size=2", f"run_dir={tmp_path / 'run'}"]))
    rows = {}
    for line in result.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 7 and cells[1] in ("mdlm", "proseco"):
            rows[cells[1]] = cells
    assert set(rows) == {"mdlm", "proseco"}, result.stdout
    for precision, objective, step_ms, tokens, tflops, mfu, memory in rows.values():
        assert precision == "fp32" and mfu == "n/a"  # CPU: no peak FLOP/s to divide by
        assert float(step_ms) > 0 and float(tflops) > 0 and float(memory) > 0
        # tokens/s per process = global batch tokens / step time
        assert float(tokens) == pytest_approx(4 * 32 / (float(step_ms) / 1e3))
    # model FLOPs of a ProSeCo step are twice MDLM's: TFLOP/s x step time must say so
    work = {k: float(r[4]) * float(r[2]) for k, r in rows.items()}
    assert abs(work["proseco"] / work["mdlm"] - 2.0) < 0.02
    assert re.search(r"fp32: proseco / mdlm step time \d+\.\d+x", result.stdout)


def pytest_approx(value):
    import pytest

    return pytest.approx(value, rel=0.01, abs=1.0)  # the table rounds tokens/s to an integer

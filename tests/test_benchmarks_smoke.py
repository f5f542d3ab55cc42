"""The benchmark runner end to end at tiny sizes: every suite's code path, no timing claims."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
from conftest import needs_data

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_runner_smoke(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        # Smoke sizes measure nothing: compile fast rather than well.
        "XLA_FLAGS": "--xla_backend_optimization_level=0",
    }
    suites = ["standard", "convnet", "inner_steps", "meta_batch", "model_size", "compile_cache"]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.run",
            "--smoke",
            "--repeats",
            "2",
            "--out",
            str(tmp_path),
            "--suite",
            *suites,
        ],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=900,
    )
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["suites"]) == set(suites)
    standard = results["suites"]["standard"]
    assert [r["algorithm"] for r in standard] == ["maml", "imaml"]
    for row in standard:
        assert row["median_s"] > 0 and row["flops"] > 0 and row["temp_bytes"] > 0
    # Remat recomputes the inner steps in the backward pass: more FLOPs for the same result.
    plain, remat = sorted(results["suites"]["inner_steps"], key=lambda r: r["remat"])
    assert remat["scan_body_flops"] > plain["scan_body_flops"]
    # The scanned task loop's FLOPs are scaled by the number of groups; unrolled, XLA counts
    # every task itself: the two counts of the same work agree.
    forms = {r["task_loop"]: r for r in results["suites"]["convnet"]}
    assert set(forms) == {"vmap", "scan", "unrolled"}
    assert abs(forms["unrolled"]["flops"] / forms["scan"]["flops"] - 1) < 0.1
    cold, cached = results["suites"]["compile_cache"]
    assert cold["cache"] == "cold" and cached["cache"] == "from_cache"
    assert (tmp_path / "inner_steps.png").stat().st_size > 1000
    assert "| case |" in (tmp_path / "results.md").read_text()


def test_profile_step_smoke(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.profile_step",
            "--smoke",
            "--no-torch",
            "--repeats",
            "2",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=900,
    )
    result = json.loads((tmp_path / "profile.json").read_text())
    # Every executed kernel was found in the optimised HLO and the matmuls were recognised.
    categories = result["run"]["categories"]
    assert categories["matmul"]["ms_per_step"] > 0
    assert abs(sum(c["fraction"] for c in categories.values()) - 1) < 1e-6
    assert result["compile"]["fused_kernels_compiled"] > 0
    assert result["compile"]["phases_s"]["Codegen"] > 0
    assert result["trace"]["jaxpr_equations"] > 100
    assert "| matmul |" in (tmp_path / "profile.md").read_text()


def test_xla_options_smoke(tmp_path):
    # Each option set in its own process; the default runs first and last.
    subprocess.run(
        [sys.executable, "-m", "benchmarks.xla_options", "--smoke", "--options", "opt_level_0",
         "--out", str(tmp_path)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True, timeout=900,
    )  # fmt: skip
    rows = [r for r in json.loads((tmp_path / "xla_options.json").read_text()) if "scan" in r]
    assert [r["option"] for r in rows] == ["default", "opt_level_0", "default"]
    assert rows[1]["xla_flags"].startswith("--xla_backend_optimization_level=0")
    # Another compiler, the same meta-gradient to float32 rounding; the default reproduces.
    assert 0 < rows[1]["grad_rel_diff"] < 1e-4 and rows[2]["grad_rel_diff"] == 0.0
    assert all(r[form]["compile_s"] > 0 for r in rows for form in ("scan", "unrolled"))


def test_decoding_benchmark_smoke():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.decoding", "--smoke", "--repeats", "2"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True, timeout=600,
        capture_output=True, text=True,
    )  # fmt: skip
    result = json.loads(done.stdout)
    # 4 prompts, 12 tokens each: scaled random weights never emit END early.
    assert result["generated_tokens"] == 4 * 12 and result["speedup"] > 0


def test_decoding_benchmark_on_a_pretrained_config():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.decoding", "--config", "translate:smollm2_tiny",
         "--repeats", "1"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True, timeout=600,
        capture_output=True, text=True,
    )  # fmt: skip
    result = json.loads(done.stdout)
    # One chunk of the tiny config (8 tasks of 2 queries), at most decode_len = 8 tokens
    # each; the benchmark has checked that both forms give the same tokens.
    assert result["prompts"] == 16 and 0 < result["generated_tokens"] <= 16 * 8


def test_inner_loop_default_smoke(tmp_path):
    # Smoke sizes: 2 inner steps timed, remat compiled at 2 and 12 steps.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    subprocess.run(
        [sys.executable, "-m", "benchmarks.inner_loop_default", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT, env=env, check=True, timeout=600,
    )  # fmt: skip
    result = json.loads((tmp_path / "inner_loop_default.json").read_text())
    step = result["step"]
    assert set(step) == {"default", "unroll", "scan", "hand"}
    # Every form computes the hand-written meta-gradient (the script refuses to time otherwise).
    assert all(r["rel_diff_vs_hand"] < 1e-5 and r["median_s"] > 0 for r in step.values())
    # Two steps are a short loop: the default is the unrolled program itself, not the scan.
    assert step["unroll"]["same_program_as_default"] and not step["scan"]["same_program_as_default"]
    few, many, scan = result["remat"]
    assert (few["inner_steps"], many["inner_steps"], scan["inner_steps"]) == (2, 12, 2)
    assert (few["loops"], many["loops"], scan["loops"]) == (False, True, True)
    assert all(r["temp_mb"] > 0 and r["compile_s"] > 0 for r in result["remat"])


@needs_data("fewrel")
def test_config_steps_times_second_and_first_order_on_the_same_tasks(capsys):
    from benchmarks import config_steps

    runs = config_steps.main(
        ["fewrel:smollm2_tiny_maml", "fewrel:smollm2_tiny_fomaml", "--rounds", "2"]
    )
    maml, fomaml = runs.values()
    # Identical tasks (same source, same seed): only the algorithm differs.
    same = map(np.array_equal, jax.tree.leaves(maml["tasks"]), jax.tree.leaves(fomaml["tasks"]))
    assert all(same)
    assert len(maml["times"]) == len(fomaml["times"]) == 2
    # The second-order step differentiates through the inner step: more work than FOMAML's.
    assert maml["flops"] > 1.2 * fomaml["flops"]
    table = capsys.readouterr().out
    assert "| fewrel:smollm2_tiny_fomaml |" in table and "| 1.00x |" in table

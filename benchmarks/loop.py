"""The runner's train loop against its bare jitted step, and warm starts of ``metajax train``.

    PYTHONPATH=. .venv/bin/python -m benchmarks.loop                 # every case
    PYTHONPATH=. .venv/bin/python -m benchmarks.loop --cases sinusoid warm_sinusoid

Loop cases: the meta-steps per second of ``metajax.run.loop.train`` (the time between its
first and last logged step, from ``metrics.jsonl``; no evaluation, one checkpoint after the
last timed step) against the bare jitted step (``make_train_step`` on the runner's mesh) on
the same batches, sampled and placed before the clock starts, in the same process. The bare
step is timed before and after the runner and averaged, which shows how much the shared
machine moved in between.

- ``sinusoid``: the quick start (MLP 1-40-40-1, meta-batch 25, second-order MAML, one inner
  step); its tasks are sampled on the device.
- ``omniglot``: ``omniglot:tiny`` with 16 filters and 5 queries per class (5-way 1-shot,
  meta-batch 8, second-order MAML, one inner step), sampled on the host from
  ``$METAJAX_OMNIGLOT_DIR``, else ``../shared/data/omniglot`` (skipped with a message when
  absent).

Warm cases (``warm_*``) start ``metajax train`` twice in new processes with one fresh
compilation cache and report what the runner prints as "meta-step ready in X s": from the
start of tracing (or of the program cache's look-up) to the compiled step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OMNIGLOT = Path(os.environ.get("METAJAX_OMNIGLOT_DIR") or ROOT.parent / "shared/data/omniglot")

LOOP_CASES = {
    "sinusoid": ("sinusoid", ["train.steps=4000", "train.log_every=200"]),
    "omniglot": (
        "omniglot:tiny",
        [
            "train.steps=60",
            "train.log_every=10",
            "task.filters=16",
            "task.queries=5",
            f"task.zip_dir={OMNIGLOT}",
        ],
    ),
}
# The standard benchmark case's Transformer (width 128, 2 layers, 4 heads, MLP 512,
# 32 tokens, 5 support and 15 query sequences, 5 inner steps) on the words_lm family.
STANDARD = [
    "task.width=128",
    "task.depth=2",
    "task.heads=4",
    "task.mlp_width=512",
    "task.max_len=32",
    "task.shots=5",
    "task.queries=15",
    "algorithm.inner_steps=5",
]
WARM_CASES = {
    "warm_sinusoid": ("sinusoid", ["train.steps=200", "train.log_every=100"]),
    "warm_words_lm_tiny": ("words_lm:tiny", ["train.steps=4"]),
    "warm_standard_transformer": ("words_lm", [*STANDARD, "train.steps=2", "train.log_every=1"]),
}


def _config(name: str, overrides: list[str]):
    from metajax.run.config_files import load_config

    steps = next(int(o.split("=")[1]) for o in overrides if o.startswith("train.steps="))
    return load_config(
        name, [*overrides, f"train.checkpoint_every={steps}", "eval.after_train=false"]
    )


def runner_rate(config) -> float:
    """Meta-steps per second of ``loop.train`` between its first and last logged step."""
    from metajax.run import loop

    with tempfile.TemporaryDirectory() as workdir:
        loop.train(config, workdir, progress=False, evaluate=False)
        rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").open()]
    # Each row's rate covers the steps since the previous row; the first row holds the
    # compile-and-warm-up window and is left out.
    seconds = sum((b["step"] - a["step"]) / b["steps_per_s"] for a, b in zip(rows, rows[1:]))
    return (rows[-1]["step"] - rows[0]["step"]) / seconds


class BareStep:
    """The jitted step alone (``make_train_step`` on the runner's mesh), compiled once, on the
    batches of the runner's timed steps, sampled and placed on the devices beforehand."""

    def __init__(self, config):
        from metajax import parallel
        from metajax.run import loop
        from metajax.run.build import build
        from metajax.train import make_train_step, place_state, train_state

        tc = config.train
        exp = build(config)
        mesh = loop._mesh(tc)
        self.step = make_train_step(exp.algo, exp.optimizer, mesh=mesh)
        self.fresh = lambda: place_state(train_state(exp.algo, exp.params, exp.optimizer), mesh)
        source = exp.setup.train_source
        self.batches = [
            parallel.shard_tasks(source.sample(s, tc.meta_batch), mesh)
            for s in range(tc.log_every, tc.steps)
        ]

    def rate(self) -> float:
        """Meta-steps per second over all the batches (after one step to compile)."""
        import jax

        state, metrics = self.step(self.fresh(), self.batches[0])
        jax.block_until_ready((state, metrics, self.batches))
        start = time.perf_counter()
        for tasks in self.batches:
            state, metrics = self.step(state, tasks)
        jax.block_until_ready((state, metrics))
        return len(self.batches) / (time.perf_counter() - start)


def loop_case(name: str) -> dict | None:
    config_name, overrides = LOOP_CASES[name]
    if name == "omniglot" and not OMNIGLOT.is_dir():
        print(f"skipping {name}: {OMNIGLOT} does not exist", file=sys.stderr)
        return None
    config = _config(config_name, overrides)
    bare_step = BareStep(config)
    before = bare_step.rate()
    runner = runner_rate(config)
    after = bare_step.rate()
    bare = (before + after) / 2
    return {
        "case": name,
        "steps": config.train.steps,
        "bare_steps_per_s": bare,
        "bare_before_after": (before, after),
        "runner_steps_per_s": runner,
        "ratio": runner / bare,
    }


READY = re.compile(r"meta-step ready in ([0-9.]+) s")


def warm_case(name: str) -> dict:
    """Two ``metajax train`` processes of one config sharing a fresh compilation cache."""
    config_name, overrides = WARM_CASES[name]
    steps = next(o for o in overrides if o.startswith("train.steps="))
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    ready, wall = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for run in ("cold", "warm"):
            cmd = [
                sys.executable,
                "-m",
                "metajax.run.cli",
                "train",
                config_name,
                "--no-progress",
                "--no-eval",
                "--workdir",
                f"{tmp}/{run}",
                "--cache-dir",
                f"{tmp}/cache",
                "--set",
                *overrides,
                f"train.checkpoint_every={steps.split('=')[1]}",
            ]
            start = time.perf_counter()
            out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            wall.append(time.perf_counter() - start)
            if out.returncode:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}")
            match = READY.search(out.stdout + out.stderr)
            if match is None:
                raise RuntimeError(f"no 'meta-step ready' line in:\n{out.stdout}")
            ready.append(float(match.group(1)))
    return {
        "case": name,
        "ready_cold_s": ready[0],
        "ready_warm_s": ready[1],
        "process_cold_s": wall[0],
        "process_warm_s": wall[1],
    }


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown(loops: list[dict], warms: list[dict]) -> str:
    import jax

    lines = [
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, commit {_commit()} (+ working "
        f"tree), {platform.machine()} {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f}, jax {jax.__version__}",
        "",
    ]
    if loops:
        lines += [
            "| case | steps | bare step (steps/s) | runner (steps/s) | runner / bare |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in loops:
            b0, b1 = r["bare_before_after"]
            lines.append(
                f"| {r['case']} | {r['steps']} | {r['bare_steps_per_s']:.4g} "
                f"({b0:.4g}, {b1:.4g}) | {r['runner_steps_per_s']:.4g} | "
                f"{r['ratio']:.2f} |"
            )
        lines.append("")
    if warms:
        lines += [
            "| case | meta-step ready, cold (s) | ready, warm (s) | process, cold (s) "
            "| process, warm (s) |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in warms:
            lines.append(
                f"| {r['case']} | {r['ready_cold_s']:.1f} | {r['ready_warm_s']:.2f} | "
                f"{r['process_cold_s']:.1f} | {r['process_warm_s']:.1f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    every = [*LOOP_CASES, *WARM_CASES]
    parser.add_argument("--cases", nargs="+", default=every, choices=every)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    loops = [r for c in args.cases if c in LOOP_CASES if (r := loop_case(c)) is not None]
    warms = [warm_case(c) for c in args.cases if c in WARM_CASES]
    if args.json:
        Path(args.json).write_text(json.dumps({"loop": loops, "warm": warms}, indent=1))
    print(markdown(loops, warms))


if __name__ == "__main__":
    main()

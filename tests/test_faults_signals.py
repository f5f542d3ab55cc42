"""Ctrl-C and closed pipes end the CLI in one line or quietly (real processes: a signal and
a pipe need them)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax

from metajax.run.checkpoint import Checkpointer

ROOT = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env["METAJAX_CACHE_DIR"] = jax.config.jax_compilation_cache_dir or "none"
    return env


def _metajax(*args, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-m", "metajax.run.cli", *args],
        cwd=ROOT,
        env=_env(),
        text=True,
        **kwargs,
    )


def test_sigint_checkpoints_and_says_where_the_run_resumes(tmp_path):
    workdir = tmp_path / "run"
    sets = ["train.steps=1000000", "train.log_every=5", "train.checkpoint_every=100000"]
    proc = _metajax(
        "train", "sinusoid:tiny", "--workdir", str(workdir), "--no-progress", "--set", *sets,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if ": step " in line:  # training has begun
                break
        assert ": step " in lines[-1], "".join(lines)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    err = err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("metajax: interrupted at step ") and "resumes from step" in err
    step = int(err.split("resumes from step ")[1].rstrip("."))
    assert step >= 5
    ckpt = Checkpointer(workdir / "checkpoints", create=False)
    try:
        assert ckpt.all_steps() == [step]
    finally:
        ckpt.close()


def test_a_closed_pipe_ends_quietly():
    # The reader is gone before the first line is written, as `metajax list | head -1`
    # is after its line (a short output would fit in the pipe's buffer otherwise).
    for args in (["show", "sinusoid"], ["list"]):
        proc = _metajax(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdout.close()
        err = proc.stderr.read()
        proc.wait(timeout=60)
        assert proc.returncode == 0 and err == "", (args, err)

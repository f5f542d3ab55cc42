"""A run killed with SIGKILL and resumed ends exactly where an uninterrupted run does."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from metajax.run import build as experiment
from metajax.run import cli
from metajax.run.checkpoint import Checkpointer
from metajax.run.config_files import load_config
from metajax.train import train_state

STEPS = 200
ARGS = [
    "train",
    "sinusoid:tiny",
    "--no-progress",
    "--set",
    f"train.steps={STEPS}",
    "train.checkpoint_every=20",
    "train.log_every=20",
    "train.keep_checkpoints=2",
    "eval.after_train=false",
]


def _final_state(workdir):
    exp = experiment.build(load_config("sinusoid:tiny"))
    ckpt = Checkpointer(workdir / "checkpoints")
    assert ckpt.latest_step() == STEPS
    return jax.device_get(ckpt.restore(train_state(exp.algo, exp.params, exp.optimizer)))


def _committed_steps(workdir):
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in directory.iterdir()
        if p.name.isdigit() and (p / "commit_success.txt").exists()
    )


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, capsys):
    killed = tmp_path / "killed"
    # Same environment (8 fake devices, compilation cache) as this process, so same programs.
    env = dict(
        os.environ,
        PYTHONUNBUFFERED="1",
        METAJAX_CACHE_DIR=jax.config.jax_compilation_cache_dir or "none",
    )
    command = [sys.executable, "-m", "metajax.run.cli", *ARGS, "--workdir", str(killed)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not _committed_steps(killed) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    output = proc.communicate()[0].decode()
    assert proc.returncode == -signal.SIGKILL, output
    at_kill = _committed_steps(killed)
    assert at_kill and at_kill[-1] < STEPS, at_kill  # killed mid-run, after a checkpoint

    capsys.readouterr()
    assert cli.main([*ARGS, "--workdir", str(killed)]) == 0
    assert f"resuming {killed} from step {at_kill[-1]}" in capsys.readouterr().out
    reference = tmp_path / "reference"
    assert cli.main([*ARGS, "--workdir", str(reference)]) == 0

    resumed, uninterrupted = _final_state(killed), _final_state(reference)
    assert int(resumed.step) == STEPS
    jax.tree.map(np.testing.assert_array_equal, resumed, uninterrupted)  # bitwise
    # The log has each step once: lines past the restored checkpoint were dropped and re-logged.
    logged = [json.loads(x)["step"] for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(20, STEPS + 1, 20))

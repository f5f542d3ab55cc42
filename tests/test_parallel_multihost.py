"""Two local processes (jax.distributed over gloo, 2 fake devices each) equal one process."""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from metajax.run import build as experiment
from metajax.run import loop as runner
from metajax.run.checkpoint import Checkpointer
from metajax.run.config_files import load_config
from metajax.train import train_state

SETS = ["train.steps=3", "train.checkpoint_every=3", "train.log_every=1", "eval.after_train=false"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir, sets, heartbeat=10):
    port = _free_port()
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
        PYTHONUNBUFFERED="1",
        METAJAX_CACHE_DIR=jax.config.jax_compilation_cache_dir or "none",
    )
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "metajax.run.cli",
                "train",
                "sinusoid:tiny",
                "--workdir",
                str(workdir),
                "--no-progress",
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
                "--heartbeat-timeout",
                str(heartbeat),
                "--set",
                *sets,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]


def test_two_processes_equal_one(tmp_path):
    procs = _launch(tmp_path / "two", SETS)
    outputs = [p.communicate(timeout=240)[0].decode() for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]

    # One process, same global meta-batch (8 tasks) over 4 of this process's 8 fake devices.
    config = load_config("sinusoid:tiny", [*SETS, "train.devices=4"])
    single = jax.device_get(
        runner.train(config, tmp_path / "one", progress=False, echo=lambda *_: None)
    )
    exp = experiment.build(config)
    two = Checkpointer(tmp_path / "two" / "checkpoints")
    assert two.latest_step() == 3
    restored = jax.device_get(two.restore(train_state(exp.algo, exp.params, exp.optimizer)))
    assert int(restored.step) == 3
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), single.meta_params, exp.params)
    assert max(jax.tree.leaves(moved)) > 1e-3  # training changed the parameters
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), restored, single
    )
    # Only process 0 wrote the log; it saw the global metrics.
    log = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(log) == 3


def test_dead_process_stops_the_other(tmp_path):
    procs = _launch(
        tmp_path / "run",
        ["train.steps=1000000", "train.log_every=1", "train.checkpoint_every=1000000"],
        heartbeat=5,
    )
    log = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while (not log.exists() or not log.read_text()) and time.monotonic() < deadline:
        assert procs[0].poll() is None and procs[1].poll() is None
        time.sleep(0.1)
    assert log.read_text(), "training never started"
    os.kill(procs[1].pid, signal.SIGKILL)
    killed_at = time.monotonic()
    try:
        out = procs[0].communicate(timeout=60)[0].decode()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode != 0
    assert time.monotonic() - killed_at < 60
    assert "another process has probably died" in out or "heartbeat" in out, out[-3000:]

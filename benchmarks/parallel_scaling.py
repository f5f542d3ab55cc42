"""Step time of the MAML train step: 1 vs N devices, sharding vs pmap, 1 vs 2 processes.

    .venv/bin/python benchmarks/parallel_scaling.py [--devices 8] [--repeats 50]

Every timing is the median over ``--repeats`` jitted steps after warm-up, with
``block_until_ready``; ratios are taken within one invocation (the machines
are shared). Part 1 runs in this process with ``--devices`` fake CPU devices;
part 2 starts fresh processes: one with 2 devices, then two (jax.distributed
over gloo on 127.0.0.1) with 1 device each, the same global meta-batch.
On a CPU the fake devices share the same cores, so these ratios measure the
overhead of partitioning and collectives, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

MODELS = {"mlp40x2 (MAML sinusoid)": (40, 40), "mlp256x3": (256, 256, 256)}


def _setup_env(devices: int) -> None:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _time_steps(hidden, meta_batch, mesh, parallel_mode, repeats, process_local=False):
    import jax
    import numpy as np

    from metajax import parallel
    from metajax.run.build import build
    from metajax.run.config_files import load_config
    from metajax.train import make_train_step, place_state, train_state

    config = load_config(
        "sinusoid", [f"task.hidden={tuple(hidden)}", f"train.meta_batch={meta_batch}"]
    )
    exp = build(config)
    state = train_state(exp.algo, exp.params, exp.optimizer)
    step = make_train_step(exp.algo, exp.optimizer, mesh=mesh, parallel=parallel_mode)
    if parallel_mode == "pmap":
        state = parallel.replicate(state, jax.local_devices()[: mesh.size])
        tasks = exp.setup.train_source.sample(0, meta_batch)
    elif mesh is not None:
        state = place_state(state, mesh)
        first, local = parallel.local_task_range(meta_batch)
        tasks = parallel.shard_tasks(exp.setup.train_source.sample(0, local, first), mesh)
    else:
        tasks = exp.setup.train_source.sample(0, meta_batch)
    for _ in range(3):  # compile and warm up
        state, metrics = step(state, tasks)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        state, metrics = step(state, tasks)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def part_devices(devices: int, meta_batch: int, repeats: int) -> list[dict]:
    from metajax import parallel

    rows = []
    for name, hidden in MODELS.items():
        one = _time_steps(hidden, meta_batch, None, "sharding", repeats)
        many = _time_steps(hidden, meta_batch, parallel.task_mesh(devices), "sharding", repeats)
        pmap = _time_steps(hidden, meta_batch, parallel.task_mesh(devices), "pmap", repeats)
        rows.append(
            {
                "model": name,
                "meta_batch": meta_batch,
                "step_ms_1_device": 1e3 * one,
                f"ratio_{devices}_devices_sharding": many / one,
                f"ratio_{devices}_devices_pmap": pmap / one,
            }
        )
    return rows


def worker(args) -> None:
    """One process of part 2; prints a JSON line of step times."""
    _setup_env(args.worker_devices)
    from metajax.parallel import init_distributed, task_mesh

    if args.num_processes > 1:
        init_distributed(
            f"127.0.0.1:{args.port}", args.num_processes, args.process_id, heartbeat_timeout_s=30
        )
    out = {
        name: _time_steps(hidden, args.meta_batch, task_mesh(), "sharding", args.repeats)
        for name, hidden in MODELS.items()
    }
    if args.process_id == 0:
        print("RESULT " + json.dumps(out), flush=True)


def part_processes(meta_batch: int, repeats: int) -> list[dict]:
    def run(num_processes, devices_each):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    "--port",
                    str(port),
                    "--num-processes",
                    str(num_processes),
                    "--process-id",
                    str(i),
                    "--worker-devices",
                    str(devices_each),
                    "--meta-batch",
                    str(meta_batch),
                    "--repeats",
                    str(repeats),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            for i in range(num_processes)
        ]
        outs = [p.communicate()[0].decode() for p in procs]
        line = next(x for x in outs[0].splitlines() if x.startswith("RESULT "))
        return json.loads(line[len("RESULT ") :])

    one = run(1, 2)
    two = run(2, 1)
    return [
        {
            "model": name,
            "meta_batch": meta_batch,
            "step_ms_1_process_2_devices": 1e3 * one[name],
            "ratio_2_processes_1_device_each": two[name] / one[name],
        }
        for name in MODELS
    ]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--meta-batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--skip-processes", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--num-processes", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--worker-devices", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    _setup_env(args.devices)
    for row in part_devices(args.devices, args.meta_batch, args.repeats):
        print(json.dumps(row))
    if not args.skip_processes:
        for row in part_processes(args.meta_batch, args.repeats):
            print(json.dumps(row))


if __name__ == "__main__":
    main()

"""iMAML's meta-gradient memory does not grow with inner steps; second-order MAML's does.

Prints XLA's temp buffer size (``compiled.memory_analysis().temp_size_in_bytes``, deterministic
for a given program) of the jitted ``meta_grad`` for 5, 20 and 100 inner steps, both with the
inner loop as a ``lax.scan`` (``unroll=False``) so that 100 steps compile quickly.

    python benchmarks/imaml_memory.py [--hidden 40] [--tasks 10] [--shots 10]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from metajax import Task
from metajax.algorithms import imaml, maml


def mlp_init(key, sizes):
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {"w": jax.random.normal(k, (i, o)) / jnp.sqrt(i), "b": jnp.zeros(o)}
        for k, i, o in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def mse_loss(params, batch):
    x, y = batch
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return jnp.mean((x @ params[-1]["w"] + params[-1]["b"] - y) ** 2)


def sinusoid_tasks(key, num_tasks, shots):
    k_amp, k_phase, k_x = jax.random.split(key, 3)
    amp = jax.random.uniform(k_amp, (num_tasks, 1, 1), minval=0.1, maxval=5.0)
    phase = jax.random.uniform(k_phase, (num_tasks, 1, 1), maxval=jnp.pi)
    x = jax.random.uniform(k_x, (num_tasks, 2 * shots, 1), minval=-5.0, maxval=5.0)
    y = amp * jnp.sin(x + phase)
    return Task(support=(x[:, :shots], y[:, :shots]), query=(x[:, shots:], y[:, shots:]))


def temp_bytes(algo, params, tasks):
    compiled = jax.jit(algo.meta_grad).lower(params, tasks).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=40)
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--shots", type=int, default=10)
    args = parser.parse_args()
    params = mlp_init(jax.random.key(0), (1, args.hidden, args.hidden, 1))
    tasks = sinusoid_tasks(jax.random.key(1), args.tasks, args.shots)
    print(
        f"device {jax.devices()[0].platform}; MLP 1-{args.hidden}-{args.hidden}-1, "
        f"{args.tasks} tasks x {args.shots} shots; lax.scan inner loop"
    )
    print(
        f"{'inner steps':>11} | {'iMAML temp bytes':>16} | {'MAML 2nd-order temp bytes':>25} |"
        f" {'MAML / iMAML':>12}"
    )
    for steps in (5, 20, 100):
        common = dict(inner_steps=steps, inner_lr=0.01, unroll=False)
        mem_i = temp_bytes(imaml(mse_loss, reg=1.0, cg_steps=5, **common), params, tasks)
        mem_m = temp_bytes(maml(mse_loss, **common), params, tasks)
        print(f"{steps:>11} | {mem_i:>16,} | {mem_m:>25,} | {mem_m / mem_i:>12.1f}")


if __name__ == "__main__":
    main()

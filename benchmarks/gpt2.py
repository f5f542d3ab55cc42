"""GPT-2-small meta-learning steps: second against first order, LoRA against full inner loops.

    PYTHONPATH=. .venv/bin/python -m benchmarks.gpt2                # the 124M shape, 1 and 2 tasks
    PYTHONPATH=. .venv/bin/python -m benchmarks.gpt2 --quick        # the tiny size: a smoke test
    PYTHONPATH=. .venv/bin/python -m benchmarks.gpt2 --tasks 1 2 4 --repeats 3 --out /tmp/g

The model is :class:`metajax.models.GPT2LM` of the ``gpt2`` shape (124M parameters, random
weights: the cost does not depend on their values). A task is ``--support`` + ``--query``
random sequences of ``--seq`` tokens. Each row is one whole jitted training step
(``mj.make_train_step``: meta-gradient plus the outer Adam update, state donated) for one
algorithm (second-order MAML, FOMAML, Reptile; ``--inner-steps`` plain SGD steps each) and
one inner loop:

- ``lora``: meta-parameters ``{"base", "lora"}`` (rank 8 on every block's ``c_attn``,
  ``c_proj`` and ``c_fc`` kernels), the inner loop adapts the factors only, and the outer
  Adam trains only the factors (:func:`metajax.lora.freeze_base`), as ``words_lm`` with a
  pretrained ``task.model`` does;
- ``full``: the inner and the outer loop train every weight.

Measured as the other benchmarks (benchmarks/measure.py): compile time, FLOPs from
``cost_analysis()``, temporary bytes from ``memory_analysis()``, and the median step time
after one warm-up call. A program whose temporary memory exceeds ``--max-temp-gb`` is
compiled and reported but not run. Ratios (second / first order, LoRA / full) are between
rows of the same run. Prints a Markdown table; ``--out`` also writes it and a JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import metajax as mj
from benchmarks.measure import compile_stats, matmul_peak_flops, time_calls
from metajax import lora as lora_lib
from metajax.models import GPT2LM, GPT2Config, gpt2_param_count, next_token_loss

ALGORITHMS = ("maml", "fomaml", "reptile")
ADAPT = ("lora", "full")
LORA = dict(rank=8, alpha=16.0, targets=r"(c_attn|c_proj|c_fc)/kernel")


def make_tasks(config: GPT2Config, tasks: int, support: int, query: int, seq: int) -> mj.Task:
    """Random ids ``(tasks, n, seq + 1)``: the model sees ``seq`` positions per sequence."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (tasks, support + query, seq + 1), np.int32)
    mask = np.ones(tokens.shape, np.float32)
    return jax.device_put(
        mj.Task(
            support=(tokens[:, :support], mask[:, :support]),
            query=(tokens[:, support:], mask[:, support:]),
        )
    )


def make_algorithm(name: str, loss_fn, inner_steps: int, mask=None) -> mj.MetaLearner:
    common = dict(inner_steps=inner_steps, inner_lr=0.1, mask=mask, unroll=True)
    if name == "maml":
        return mj.maml(loss_fn, **common)
    if name == "fomaml":
        return mj.maml(loss_fn, first_order=True, **common)
    if name == "reptile":
        return mj.reptile(loss_fn, **common)
    raise ValueError(f"unknown algorithm {name!r}; choose one of {ALGORITHMS}.")


def measure(algo, params, optimizer, tasks, repeats: int, max_temp_bytes: float) -> dict:
    """Compile stats of one training step and, if its temporary memory fits, its median time."""
    step = mj.make_train_step(algo, optimizer)
    state = mj.train_state(algo, params, optimizer)
    compiled, stats = compile_stats(step, state, tasks)
    if stats["temp_bytes"] > max_temp_bytes:
        stats["skipped"] = f"temp memory above {max_temp_bytes / 2**30:.0f} GiB"
        return stats
    holder = [state, None]

    def run():
        holder[0], holder[1] = compiled(holder[0], tasks)
        return holder[1]

    stats.update(time_calls(run, warmup=1, repeats=repeats))
    stats["loss_after"] = float(holder[1]["loss_after"])
    return stats


def run_rows(args, header: dict) -> tuple[dict, list[dict]]:
    """Every (tasks, inner loop, algorithm) row; written to ``args.out`` after each one."""
    config = GPT2Config.named(args.size)
    model = GPT2LM(config)
    params = model.init(jax.random.key(0), jnp.zeros((1, args.seq), jnp.int32))
    loss_fn = next_token_loss(model.apply)
    lora = lora_lib.LoRA(**LORA)
    meta = lora.init(params, jax.random.key(1))
    setups = {
        "lora": (
            lora.wrap(loss_fn),
            meta,
            lora_lib.inner_mask(meta, "lora"),
            lora_lib.freeze_base(optax.adam(1e-3)),
        ),
        "full": (loss_fn, params, None, optax.adam(1e-3)),
    }
    info = {
        "size": args.size,
        "parameters": gpt2_param_count(config),
        "lora_parameters": sum(x.size for x in jax.tree.leaves(meta["lora"])),
    }
    rows = []
    for tasks in args.tasks:
        batch = make_tasks(config, tasks, args.support, args.query, args.seq)
        for adapt in args.adapt:
            fn, start, mask, optimizer = setups[adapt]
            for name in args.algorithms:
                algo = make_algorithm(name, fn, args.inner_steps, mask)
                row = {"tasks": tasks, "inner": adapt, "algorithm": name}
                t0 = time.perf_counter()
                row.update(
                    measure(algo, start, optimizer, batch, args.repeats, args.max_temp_gb * 2**30)
                )
                row["wall_s"] = time.perf_counter() - t0
                rows.append(row)
                print(row_line(row), flush=True)
                if args.out:
                    write(args.out, header, info, rows)
    return info, rows


def row_line(row: dict) -> str:
    time_s = f"{row['median_s']:.2f} s" if "median_s" in row else row.get("skipped", "-")
    return (
        f"{row['tasks']} task(s) {row['inner']:>4} {row['algorithm']:>7}: step {time_s}, "
        f"compile {row['compile_s']:.1f} s, {_gflop(row['flops'])} GFLOP, "
        f"temp {row['temp_bytes'] / 2**20:.0f} MiB"
    )


def _gflop(flops: float) -> str:
    return f"{flops / 1e9:.1f}" if flops >= 1e10 else f"{flops / 1e9:.3g}"


def _ratio(a: dict | None, b: dict | None, key: str) -> str:
    if a is None or b is None or key not in a or key not in b or not b[key] > 0:
        return "-"
    return f"{a[key] / b[key]:.2f}x"


def markdown(info: dict, rows: list[dict], header: dict) -> str:
    """The rows as a Markdown table, then the ratios within the run."""
    lines = [
        f"GPT-2 `{info['size']}` ({info['parameters']:,} parameters; LoRA factors "
        f"{info['lora_parameters']:,}), {header['shape']}, {header['inner_steps']} inner SGD "
        f"step(s); {header['machine']}; matmul peak {header['peak'] / 1e9:.1f} GFLOP/s; "
        f"load average {header['load_start']:.1f} at the start.",
        "",
        "| tasks | inner loop | algorithm | step time | compile | GFLOP | temp memory |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        step = f"{r['median_s']:.2f} s" if "median_s" in r else r.get("skipped", "-")
        lines.append(
            f"| {r['tasks']} | {r['inner']} | {r['algorithm']} | {step} | "
            f"{r['compile_s']:.1f} s | {_gflop(r['flops'])} | {r['temp_bytes'] / 2**20:,.0f} MiB |"
        )
    find = {(r["tasks"], r["inner"], r["algorithm"]): r for r in rows}
    lines += [
        "",
        "| tasks | ratio | step time | compile | FLOPs | temp memory |",
        "|---|---|---|---|---|---|",
    ]
    keys = ("median_s", "compile_s", "flops", "temp_bytes")
    for tasks in sorted({r["tasks"] for r in rows}):
        for inner in ADAPT:
            a, b = find.get((tasks, inner, "maml")), find.get((tasks, inner, "fomaml"))
            if a and b:
                cells = " | ".join(_ratio(a, b, k) for k in keys)
                lines.append(f"| {tasks} | MAML / FOMAML, {inner} | {cells} |")
        for algo in ALGORITHMS:
            a, b = find.get((tasks, "lora", algo)), find.get((tasks, "full", algo))
            if a and b:
                cells = " | ".join(_ratio(a, b, k) for k in keys)
                lines.append(f"| {tasks} | LoRA / full, {algo} | {cells} |")
    return "\n".join(lines) + "\n"


def write(out: str, header: dict, info: dict, rows: list[dict]) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpt2.json").write_text(json.dumps({**header, "info": info, "rows": rows}, indent=1))
    (out / "gpt2.md").write_text(markdown(info, rows, header))


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the tiny GPT-2: a smoke test")
    p.add_argument("--tasks", type=int, nargs="+", default=None, help="meta-batch sizes")
    p.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=list(ALGORITHMS))
    p.add_argument("--adapt", nargs="+", choices=ADAPT, default=list(ADAPT))
    p.add_argument("--support", type=int, default=4, help="support sequences per task")
    p.add_argument("--query", type=int, default=4, help="query sequences per task")
    p.add_argument("--seq", type=int, default=32, help="tokens the model sees per sequence")
    p.add_argument("--inner-steps", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="timed steps per row after warm-up")
    p.add_argument(
        "--max-temp-gb",
        type=float,
        default=8.0,
        help="compile but do not run programs with more temporary memory",
    )
    p.add_argument("--out", default=None, help="folder for gpt2.md and gpt2.json")
    args = p.parse_args(argv)
    args.size = "tiny" if args.quick else "gpt2"
    args.tasks = args.tasks or ([1, 2] if not args.quick else [2])
    if args.quick:
        args.seq = min(args.seq, 16)
    header = dict(
        command=" ".join(
            ["python -m benchmarks.gpt2", *(argv if argv is not None else sys.argv[1:])]
        ),
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__}, "
        f"{jax.devices()[0].platform}",
        shape=f"{args.support} support + {args.query} query sequences of {args.seq} tokens "
        "per task",
        inner_steps=args.inner_steps,
        started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        load_start=os.getloadavg()[0],
    )
    header["peak"] = matmul_peak_flops(256 if args.quick else 2048, repeats=3)
    info, rows = run_rows(args, header)
    header["load_end"] = os.getloadavg()[0]
    table = markdown(info, rows, header)
    if args.out:
        write(args.out, header, info, rows)
    print(table)
    return table


if __name__ == "__main__":
    main()

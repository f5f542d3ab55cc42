"""A pretrained decoder through LoRA: second against first order, all blocks against a frozen trunk.

    PYTHONPATH=. .venv/bin/python -m benchmarks.pretrained --out /tmp/pretrained_bench
    PYTHONPATH=. .venv/bin/python -m benchmarks.pretrained --quick      # a tiny random Llama

The model is what :func:`metajax.models.load_pretrained` gives for ``--model`` (default
``smollm2-135m``, the Q4_1 GGUF of SmolLM2-135M-Instruct dequantized to float32). A task is
``--support`` + ``--query`` sequences of ``--seq`` tokens drawn at random (the cost does not
depend on the text). Each row is one whole jitted training step (``mj.make_train_step``:
meta-gradient plus the outer Adam update on the factors only, state donated) for one
algorithm (second-order MAML, FOMAML, Reptile; ``--inner-steps`` SGD steps adapting the
LoRA factors) and one number of trainable blocks:

- ``all``: every block carries LoRA factors and runs in every inner and outer pass;
- ``k``: only the top ``k`` blocks carry factors; the bottom ``n - k`` blocks are a frozen
  trunk whose output (``method="trunk"``) is computed once per text, as the text families'
  ``task.trainable_blocks`` caches it on disk, so the step runs ``method="top"`` on those
  hidden states. The trunk's own cost is a separate row (``trunk``): one forward pass of
  the bottom blocks over a task's sequences, paid once per distinct text.

Measured as the other benchmarks (benchmarks/measure.py): compile time, FLOPs from
``cost_analysis()`` (the inner loop is unrolled so XLA counts every step), temporary bytes
from ``memory_analysis()``, the median step time after one warm-up call, and the step's
FLOP/s over a float32 matmul's measured in the same process. Prints a Markdown table;
``--out`` also writes it and a JSON file.
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
from metajax.models import LlamaConfig, LlamaLM, load_pretrained, next_token_loss

ALGORITHMS = ("maml", "fomaml", "reptile")
PROJECTIONS = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel"


def make_algorithm(name: str, loss_fn, inner_steps: int, mask) -> mj.MetaLearner:
    common = dict(inner_steps=inner_steps, inner_lr=0.1, mask=mask, unroll=True)
    if name == "maml":
        return mj.maml(loss_fn, **common)
    if name == "fomaml":
        return mj.maml(loss_fn, first_order=True, **common)
    if name == "reptile":
        return mj.reptile(loss_fn, **common)
    raise ValueError(f"unknown algorithm {name!r}; choose one of {ALGORITHMS}.")


def random_tokens(vocab: int, tasks: int, per_task: int, seq: int) -> np.ndarray:
    """Random ids ``(tasks, per_task, seq + 1)``: the model sees ``seq`` positions."""
    return np.random.default_rng(0).integers(0, vocab, (tasks, per_task, seq + 1), np.int32)


def top_params(params, first_trainable: int):
    """The parameters ``method="top"`` reads: every leaf but the frozen blocks'."""
    inner = params["params"]
    frozen = {f"layers_{i}" for i in range(first_trainable)}
    return {"params": {k: v for k, v in inner.items() if k not in frozen}}


def block_targets(first: int, last: int) -> str:
    """A LoRA target regex for the projections of blocks ``first..last - 1``."""
    blocks = "|".join(str(i) for i in range(first, last))
    return rf"layers_({blocks})/.*{PROJECTIONS}"


def setup_rows(model, params, n_layer: int, trainable: str, tasks: np.ndarray, support: int):
    """(loss_fn, meta_params, task batch, trunk fn) for one number of trainable blocks."""
    first = 0 if trainable == "all" else n_layer - int(trainable)
    lora = lora_lib.LoRA(rank=8, alpha=16.0, targets=block_targets(first, n_layer))
    mask = np.ones(tasks.shape, np.float32)
    if first == 0:
        meta = lora.init(params, jax.random.key(1))
        loss = lora.wrap(next_token_loss(model.apply))
        batch = mj.Task(
            support=(tasks[:, :support], mask[:, :support]),
            query=(tasks[:, support:], mask[:, support:]),
        )
        return loss, meta, batch, None

    @jax.jit
    def trunk(tokens):
        # The inputs of the top blocks: every position but the last, as the loss feeds them.
        return model.apply(params, tokens[:, :-1], method="trunk", blocks=first)

    flat = tasks.reshape(-1, tasks.shape[-1])
    hidden = np.asarray(trunk(flat)).reshape(*tasks.shape[:2], tasks.shape[-1] - 1, -1)
    meta = lora.init(top_params(params, first), jax.random.key(1))

    def top_loss(p, batch):
        states, tokens, weights = batch
        logits = model.apply(p, states, method="top", start=first).astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
        w = weights[:, 1:]
        return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)

    batch = mj.Task(
        support=(hidden[:, :support], tasks[:, :support], mask[:, :support]),
        query=(hidden[:, support:], tasks[:, support:], mask[:, support:]),
    )
    return lora.wrap(top_loss), meta, batch, (trunk, flat[: tasks.shape[1]])


def measure_step(algo, meta, tasks, repeats: int, peak: float) -> dict:
    optimizer = lora_lib.freeze_base(optax.adam(1e-3))
    step = mj.make_train_step(algo, optimizer)
    state = mj.train_state(algo, meta, optimizer)
    tasks = jax.device_put(tasks)
    compiled, stats = compile_stats(step, state, tasks)
    holder = [state, None]

    def run():
        holder[0], holder[1] = compiled(holder[0], tasks)
        return holder[1]

    stats.update(time_calls(run, warmup=1, repeats=repeats))
    stats["fraction_of_matmul_peak"] = stats["flops"] / stats["median_s"] / peak
    stats["loss_after"] = float(holder[1]["loss_after"])
    return stats


def measure_trunk(trunk, tokens, repeats: int) -> dict:
    compiled, stats = compile_stats(trunk, tokens)
    stats.update(time_calls(lambda: compiled(tokens), warmup=1, repeats=repeats))
    return stats


def run_rows(args, header: dict) -> tuple[dict, list[dict]]:
    if args.quick:
        config = LlamaConfig.named("tiny")
        model = LlamaLM(config)
        params = model.init(jax.random.key(0), jnp.zeros((1, args.seq), jnp.int32))
        load_s = 0.0
    else:
        t0 = time.perf_counter()
        model, params = load_pretrained(args.model)
        load_s = time.perf_counter() - t0
        config = model.config
    n_layer = config.num_hidden_layers
    info = {
        "model": "tiny" if args.quick else args.model,
        "parameters": sum(x.size for x in jax.tree.leaves(params)),
        "blocks": n_layer,
        "load_s": load_s,
    }
    tokens = random_tokens(config.vocab_size, args.tasks, args.support + args.query, args.seq)
    rows = []
    for trainable in args.trainable:
        if trainable != "all" and not 1 <= int(trainable) < n_layer:
            continue
        loss, meta, batch, trunk = setup_rows(
            model, params, n_layer, trainable, tokens, args.support
        )
        factors = sum(x.size for x in jax.tree.leaves(meta["lora"]))
        if trunk is not None:
            row = {"trainable": trainable, "algorithm": "trunk", "factors": 0}
            row.update(measure_trunk(trunk[0], trunk[1], args.repeats))
            rows.append(row)
            print(row_line(row), flush=True)
        for name in args.algorithms:
            algo = make_algorithm(name, loss, args.inner_steps, lora_lib.inner_mask(meta))
            row = {"trainable": trainable, "algorithm": name, "factors": factors}
            row.update(measure_step(algo, meta, batch, args.repeats, header["peak"]))
            rows.append(row)
            print(row_line(row), flush=True)
            if args.out:
                write(args.out, header, info, rows)
    return info, rows


def row_line(row: dict) -> str:
    return (
        f"{row['trainable']:>3} {row['algorithm']:>7}: {row['median_s']:.3f} s, compile "
        f"{row['compile_s']:.1f} s, {row['flops'] / 1e9:.1f} GFLOP, "
        f"temp {row['temp_bytes'] / 2**20:.0f} MiB"
    )


def markdown(info: dict, rows: list[dict], header: dict) -> str:
    """The rows, then each step's time as a ratio of the all-blocks step of its algorithm."""
    lines = [
        f"`{info['model']}` ({info['parameters']:,} parameters, {info['blocks']} blocks, "
        f"loaded in {info['load_s']:.1f} s); {header['shape']}; {header['tasks']} task(s) per "
        f"meta-batch; {header['inner_steps']} inner SGD step(s) on rank-8 LoRA factors; "
        f"{header['machine']}; matmul peak {header['peak'] / 1e9:.1f} GFLOP/s; load average "
        f"{header['load_start']:.1f} at the start, {header.get('load_end', float('nan')):.1f} "
        "at the end.",
        "",
        "| trainable blocks | algorithm | LoRA factors | step time | vs all blocks | compile | "
        "GFLOP | of matmul peak | temp memory |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    full = {r["algorithm"]: r for r in rows if r["trainable"] == "all"}
    for r in rows:
        base = full.get(r["algorithm"])
        ratio = f"{r['median_s'] / base['median_s']:.3f}x" if base else "-"
        peak = r.get("fraction_of_matmul_peak")
        lines.append(
            f"| {r['trainable']} | {r['algorithm']} | {r['factors']:,} | {r['median_s']:.3f} s"
            f" | {ratio} | {r['compile_s']:.1f} s | {r['flops'] / 1e9:.1f} | "
            f"{'-' if peak is None else f'{100 * peak:.0f} %'} | "
            f"{r['temp_bytes'] / 2**20:,.0f} MiB |"
        )
    return "\n".join(lines) + "\n"


def write(out: str, header: dict, info: dict, rows: list[dict]) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pretrained.json").write_text(json.dumps({**header, "info": info, "rows": rows}))
    (out / "pretrained.md").write_text(markdown(info, rows, header))


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="anything load_pretrained takes")
    p.add_argument("--quick", action="store_true", help="a tiny random Llama: a smoke test")
    p.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=list(ALGORITHMS))
    p.add_argument(
        "--trainable", nargs="+", default=["all", "8", "4", "2"], help="'all' or block counts"
    )
    p.add_argument("--tasks", type=int, default=1, help="tasks per meta-batch")
    p.add_argument("--support", type=int, default=4, help="support sequences per task")
    p.add_argument("--query", type=int, default=4, help="query sequences per task")
    p.add_argument("--seq", type=int, default=32, help="tokens the model sees per sequence")
    p.add_argument("--inner-steps", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed steps per row after warm-up")
    p.add_argument("--out", default=None, help="folder for pretrained.md and pretrained.json")
    args = p.parse_args(argv)
    if args.quick:
        args.seq, args.trainable = min(args.seq, 8), ["all", "1"]
    header = dict(
        command=" ".join(
            ["python -m benchmarks.pretrained", *(argv if argv is not None else sys.argv[1:])]
        ),
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__}, "
        f"{jax.devices()[0].platform}",
        shape=f"{args.support} support + {args.query} query sequences of {args.seq} tokens",
        tasks=args.tasks,
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

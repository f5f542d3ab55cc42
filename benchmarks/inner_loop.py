"""The inner loop's forms on the standard case: temp memory, compile time and step time.

    PYTHONPATH=. .venv/bin/python -m benchmarks.inner_loop               # the standard case
    PYTHONPATH=. .venv/bin/python -m benchmarks.inner_loop --smoke       # seconds: tiny sizes

Second-order MAML training steps (``benchmarks.run.measure_step``: meta-gradient plus outer
Adam) at few and many inner steps, remat on and off, the inner loop scanned (``lax.scan``,
``unroll=False``) and unrolled in Python (``unroll=True``); the default, which picks one by
the step count, is ``inner_loop_default.py``'s. The unrolled form compiles in time that grows
with the step count, so by default it is measured at 5 and 20 steps only (``--unrolled-steps``;
none: the scan alone).
Prints a Markdown table, then the ratios the targets are stated in.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import optax

import metajax as mj
from benchmarks import cases
from benchmarks.run import SMOKE, STANDARD, measure_step

INNER_OPTIMIZERS = {"sgd": None, "adam": optax.adam(1e-2, eps_root=1e-8)}


def measure(
    size: dict,
    *,
    form: str,
    remat: bool,
    steps: int,
    inner: str,
    task_batch: int | None,
    repeats: int,
) -> dict:
    case = cases.transformer_case(**{**size, "inner_steps": steps})
    rule = (
        {"inner_lr": case.inner_lr}
        if INNER_OPTIMIZERS[inner] is None
        else {"inner_optimizer": INNER_OPTIMIZERS[inner]}
    )
    algo = mj.maml(
        case.loss_fn,
        inner_steps=steps,
        remat=remat,
        unroll=form == "unrolled",
        task_batch=task_batch,
        **rule,
    )
    row = {"form": form, "inner": inner, "remat": remat, "inner_steps": steps}
    stats = measure_step(algo, case, repeats)
    row.update(
        temp_mb=stats["temp_bytes"] / 1e6,
        trace_lower_s=stats["trace_lower_s"],
        compile_s=stats["compile_s"],
        step_s=stats["median_s"],
    )
    row["ready_s"] = row["trace_lower_s"] + row["compile_s"]
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| form | inner | remat | inner steps | temp MB | trace+lower s | compile s | "
        "ready s | step s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['form']} | {r['inner']} | {r['remat']} | {r['inner_steps']} | "
            f"{r['temp_mb']:.1f} | {r['trace_lower_s']:.1f} | {r['compile_s']:.1f} | "
            f"{r['ready_s']:.1f} | {r['step_s']:.3f} |"
        )
    return "\n".join(lines)


def ratios(rows: list[dict]) -> list[str]:
    """Many-step over few-step memory and compile time; remat over no-remat step time."""
    by = {(r["form"], r["inner"], r["remat"], r["inner_steps"]): r for r in rows}
    out = []
    for (form, inner, remat, steps), r in sorted(by.items()):
        few = min(s for f, i, m, s in by if (f, i, m) == (form, inner, remat))
        if steps != few:
            base = by[(form, inner, remat, few)]
            out.append(
                f"{form} {inner} remat={remat}: {steps}/{few} steps: temp "
                f"{r['temp_mb'] / base['temp_mb']:.2f}x, ready "
                f"{r['ready_s'] / base['ready_s']:.2f}x"
            )
        if remat and (form, inner, False, steps) in by:
            plain = by[(form, inner, False, steps)]
            out.append(
                f"{form} {inner} {steps} steps: remat step time "
                f"{r['step_s'] / plain['step_s']:.2f}x of no remat"
            )
    scan5, unrolled5 = by.get(("scan", "sgd", False, 5)), by.get(("unrolled", "sgd", False, 5))
    if scan5 and unrolled5:
        out.append(
            f"5 steps, sgd: scan step {scan5['step_s'] / unrolled5['step_s']:.2f}x the "
            f"unrolled one, ready {scan5['ready_s'] / unrolled5['ready_s']:.2f}x"
        )
    return out


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scan-steps", type=int, nargs="*", default=[5, 50])
    parser.add_argument("--unrolled-steps", type=int, nargs="*", default=[5, 20])
    parser.add_argument("--inner", nargs="+", default=["sgd"], choices=list(INNER_OPTIMIZERS))
    parser.add_argument(
        "--task-batch", type=int, default=None, help="tasks vmapped at once (default: all 8)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per row")
    parser.add_argument("--out", default=None, help="folder for inner_loop.json")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks, not numbers")
    args = parser.parse_args(argv)
    size = SMOKE if args.smoke else STANDARD
    if args.smoke:
        args.scan_steps, args.unrolled_steps, args.repeats = [2, 4], [2], 1
    load_start = os.getloadavg()
    rows = []
    for inner in args.inner:
        for form, steps_list in (("scan", args.scan_steps), ("unrolled", args.unrolled_steps)):
            for remat in (False, True):
                for steps in steps_list:
                    row = measure(
                        size,
                        form=form,
                        remat=remat,
                        steps=steps,
                        inner=inner,
                        task_batch=args.task_batch,
                        repeats=args.repeats,
                    )
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    print(table(rows))
    print("\n".join(ratios(rows)))
    print(f"load average: {load_start[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "inner_loop.json").write_text(
            json.dumps(
                {
                    "command": "python -m benchmarks.inner_loop " + " ".join(argv or []),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                    "load_average": [load_start, os.getloadavg()],
                    "rows": rows,
                },
                indent=1,
            )
        )
    return rows


if __name__ == "__main__":
    main()

"""Benchmark output: one-line progress, markdown tables and PNG plots."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Columns shown in the tables, in order, with their formats; missing ones are left out.
COLUMNS = [
    ("case", "{}"),
    ("algorithm", "{}"),
    ("implementation", "{}"),
    ("task_batch", "{}"),
    ("task_loop", "{}"),
    ("tasks", "{}"),
    ("width", "{}"),
    ("inner_steps", "{}"),
    ("remat", "{}"),
    ("cache", "{}"),
    ("median_s", "{:.4f}"),
    ("ratio_to_metajax", "{:.2f}"),
    ("grad_rel_diff", "{:.1e}"),
    ("compile_s", "{:.1f}"),
    ("trace_lower_s", "{:.1f}"),
    ("flops", "{:.3g}"),
    ("fraction_of_matmul_peak", "{:.0%}"),
    ("temp_bytes", "{:,}"),
]


def _fmt(fmt: str, value) -> str:
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def row_line(row: dict) -> str:
    return "  ".join(f"{k}={_fmt(f, row[k])}" for k, f in COLUMNS if k in row)


def table(rows: list[dict]) -> str:
    cols = [(k, f) for k, f in COLUMNS if any(k in r for r in rows)]
    lines = ["| " + " | ".join(k for k, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(f, r.get(k)) if k in r else "" for k, f in cols) + " |")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    m = results["machine"]
    parts = [
        "# metajax benchmark results",
        "",
        f"Command: `{results['command']}`  ",
        f"Started: {results['started']}; machine: {m['platform']}, {m['cpus']} CPUs, "
        f"jax {m['jax']}, devices {', '.join(m['devices'])}; load average at start "
        f"{m['load_average_start'][0]:.1f}"
        + (f", at end {m['load_average_end'][0]:.1f}" if "load_average_end" in m else "")
        + ".  ",
        f"Measured float32 matmul peak: {results['matmul_peak_flops_per_s'] / 1e9:.1f} GFLOP/s.",
        "",
        "Times are medians of whole jitted training steps (meta-gradient + Adam) in seconds;",
        "compare rows of one run as ratios.",
        "",
    ]
    for name, rows in results["suites"].items():
        parts += [f"## {name}", "", table(rows), ""]
    return "\n".join(parts)


def plots(results: dict, out: str) -> None:
    """Time and memory against inner steps (first vs second order, remat), if measured."""
    rows = results["suites"].get("inner_steps")
    if not rows:
        return
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    series = {}
    for r in rows:
        label = r["algorithm"] + (" + remat" if r.get("remat") else "")
        series.setdefault(label, []).append(r)
    for label, rs in series.items():
        rs = sorted(rs, key=lambda r: r["inner_steps"])
        steps = [r["inner_steps"] for r in rs]
        ax_t.plot(steps, [r["median_s"] for r in rs], marker="o", label=label)
        ax_m.plot(steps, [r["temp_bytes"] / 2**20 for r in rs], marker="o", label=label)
    for ax, ylabel in ((ax_t, "step time (s, median)"), (ax_m, "compiled temp memory (MiB)")):
        ax.set_xlabel("inner steps")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Second- vs first-order MAML against inner steps (Transformer, width 64)")
    fig.tight_layout()
    fig.savefig(Path(out) / "inner_steps.png", dpi=110)
    plt.close(fig)

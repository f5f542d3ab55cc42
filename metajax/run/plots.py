"""PNG figures of a run: learning curves from metrics.jsonl and fitted sinusoids."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def learning_curves(metrics_path: Path, plots_dir: Path) -> list[Path]:
    """One figure per metric family (``loss``, ``accuracy``, ...): before vs after adaptation.

    Points carry markers when there are few of them: a line through one point draws nothing.
    """
    rows = read_metrics(metrics_path)
    if not rows:
        return []
    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    steps = np.array([r["step"] for r in rows])
    bases = sorted(
        {k.rsplit("_", 1)[0] for r in rows for k in r if k.endswith(("_before", "_after"))}
    )
    marker = "o" if len(rows) < 10 else None
    written = []
    for base in bases:
        fig, ax = plt.subplots(figsize=(6, 4))
        for suffix in ("before", "after"):
            key = f"{base}_{suffix}"
            values = np.array([r.get(key, np.nan) for r in rows], dtype=float)
            ax.plot(steps, values, marker=marker, label=f"query {base}, {suffix} adaptation")
        if base == "loss" and np.all(np.array([r.get("loss_after", 1.0) for r in rows]) > 0):
            ax.set_yscale("log")
        ax.set_xlabel("meta-train step")
        ax.set_ylabel(base)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = plots_dir / f"learning_curve_{base}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def sinusoid_fit(algo, meta_params, apply_fn, source, plots_dir, *, steps=(1, 10), task=0):
    """True curve, support points and the model before and after ``steps`` adaptation steps."""
    tasks, amplitude, phase = source.sample_with_params(0, task + 1)
    support = jax.tree.map(lambda x: x[task], tasks.support)
    meta_params = jax.device_get(meta_params)
    x = jnp.linspace(-5.0, 5.0, 200)[:, None]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x[:, 0], amplitude[task] * jnp.sin(x[:, 0] - phase[task]), "k-", lw=2, label="task")
    # The initialisation through algo.adapt: meta_params may hold more than the model's
    # parameters (Meta-SGD's rates, MAML++'s), which apply_fn cannot take.
    init = algo.adapt(meta_params, support, steps=0)
    ax.plot(x[:, 0], apply_fn(init, x)[:, 0], "--", label="meta-learned init (0 steps)")
    for k in steps:
        adapted = algo.adapt(meta_params, support, steps=k)
        ax.plot(x[:, 0], apply_fn(adapted, x)[:, 0], label=f"after {k} step{'s' * (k != 1)}")
    ax.plot(support[0][:, 0], support[1][:, 0], "o", color="C3", label="support points")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    path = plots_dir / "sinusoid_fit.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

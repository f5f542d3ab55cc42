"""Training logs: the metrics window, ``metrics.jsonl``, and progress on a terminal or a file.

On a terminal, progress is a tqdm bar with the query loss and accuracy; elsewhere (a log
file, ``--no-progress``) it is one plain line per log step, so logs stay readable.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import jax
import numpy as np


def now() -> float:
    """The clock that log rates are timed with (seconds)."""
    return time.perf_counter()


class NonFiniteError(RuntimeError):
    """A meta-train metric or the parameters became NaN or infinite."""


class MetricsWindow:
    """Metrics since the last log line; an entry may hold several meta-steps (metrics with a
    leading step axis, from a fused dispatch). Fetched lazily, once per log window, so steps
    stay asynchronous; a non-finite metric is named with its exact step.
    """

    def __init__(self, start: int, time: float | None = None):
        self.first = start + 1  # step number of the oldest metrics held
        self.pending, self.fetched, self.count = [], {}, 0
        self.time = now() if time is None else time

    def add(self, metrics: dict, count: int = 1) -> None:
        """``metrics`` of ``count`` meta-steps: scalars for one, else arrays ``(count,)``."""
        self.pending.append((metrics, count))

    def check(self) -> None:
        """Fetches pending metrics; raises :class:`NonFiniteError` naming a bad step."""
        host = jax.device_get([metrics for metrics, _ in self.pending])
        for metrics, (_, count) in zip(host, self.pending, strict=True):
            values = {name: np.reshape(v, (count,)) for name, v in metrics.items()}
            finite = np.all([np.isfinite(v) for v in values.values()], axis=0)
            if not finite.all():
                i = int(np.argmin(finite))
                name = next(n for n, v in values.items() if not np.isfinite(v[i]))
                raise NonFiniteError(
                    f"step {self.first + self.count + i}: meta-train metric "
                    f"{name!r} is {float(values[name][i])}; stopping."
                )
            for name, v in values.items():
                self.fetched.setdefault(name, []).append(v)
            self.count += count
        self.pending = []

    def flush(self, step: int, end: float | None = None) -> dict:
        """The mean of each metric since the last flush, and the steps per second over the
        window's whole interval: from its start to ``end`` (default: now), which starts
        the next window, so consecutive rows tile the run's time."""
        self.check()
        end = now() if end is None else end
        row = {"step": step}
        for name, parts in self.fetched.items():
            row[name] = float(np.mean(np.concatenate(parts).astype(np.float64)))
        row["steps_per_s"] = self.count / max(end - self.time, 1e-9)
        self.first, self.fetched, self.count, self.time = step + 1, {}, 0, end
        return row


def append_row(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def truncate_log(path: Path, step: int) -> None:
    """Drops log lines past the checkpoint a run resumes from (they will be logged again)."""
    if not path.exists():
        return
    keep = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line)["step"] <= step
    ]
    path.write_text("".join(line + "\n" for line in keep))


def summary(row: dict) -> dict[str, str]:
    """The metrics a person watches: query loss (and accuracy) after adaptation."""
    out = {"loss": f"{row.get('loss_after', math.nan):.4g}"}
    if "accuracy_after" in row:
        out["acc"] = f"{row['accuracy_after']:.3f}"
    if "steps_per_s" in row:
        out["steps/s"] = f"{row['steps_per_s']:.3g}"
    return out


class Progress:
    """A tqdm bar on a terminal; otherwise one line per :meth:`update` (``echo``)."""

    def __init__(
        self, name: str, total: int, initial: int, *, enabled: bool, bar: bool | None, echo=print
    ):
        self.name, self.total, self.echo, self.enabled = name, total, echo, enabled
        use_bar = sys.stderr.isatty() if bar is None else bar
        self.bar = None
        if enabled and use_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total, initial=initial, unit="step", dynamic_ncols=True, desc=name
            )

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(text)
        else:
            self.echo(f"{self.name}: {text}")

    def update(self, step: int, row: dict) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(summary(row), refresh=False)
        else:
            cells = " ".join(f"{k}={v}" for k, v in summary(row).items())
            self.echo(f"{self.name}: step {step}/{self.total} {cells}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

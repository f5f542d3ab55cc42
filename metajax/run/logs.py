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


class NonFiniteError(RuntimeError):
    """A meta-train metric or the parameters became NaN or infinite."""


class MetricsWindow:
    """Metrics since the last log line, fetched lazily so steps stay asynchronous."""

    def __init__(self, start: int):
        self.first = start + 1  # step number of the oldest metrics held
        self.pending, self.fetched = [], []
        self.time = time.perf_counter()

    def add(self, metrics) -> None:
        self.pending.append(metrics)

    def check(self) -> None:
        """Fetches pending metrics; raises :class:`NonFiniteError` naming a bad step."""
        host = jax.device_get(self.pending)
        for i, m in enumerate(host):
            for name, value in m.items():
                if not np.all(np.isfinite(value)):
                    raise NonFiniteError(
                        f"step {self.first + len(self.fetched) + i}: meta-train metric "
                        f"{name!r} is {float(value)}; stopping.")
        self.fetched += host
        self.pending = []

    def flush(self, step: int) -> dict:
        """The mean of each metric since the last flush, and the steps per second."""
        self.check()
        now = time.perf_counter()
        row = {"step": step}
        for name in self.fetched[0]:
            row[name] = float(np.mean([float(m[name]) for m in self.fetched]))
        row["steps_per_s"] = len(self.fetched) / max(now - self.time, 1e-9)
        self.first, self.fetched, self.time = step + 1, [], now
        return row


def append_row(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def truncate_log(path: Path, step: int) -> None:
    """Drops log lines past the checkpoint a run resumes from (they will be logged again)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
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

    def __init__(self, name: str, total: int, initial: int, *, enabled: bool, bar: bool | None,
                 echo=print):
        self.name, self.total, self.echo, self.enabled = name, total, echo, enabled
        use_bar = sys.stderr.isatty() if bar is None else bar
        self.bar = None
        if enabled and use_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                            desc=name)

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

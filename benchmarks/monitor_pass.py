"""What the before-adaptation monitoring pass costs the standard second-order step.

    PYTHONPATH=. .venv/bin/python -m benchmarks.monitor_pass

``monitor=True`` (the default) also evaluates each task's query set before adaptation, to
log ``loss_before``; the PyTorch peers do not. Compares the whole training step
(``benchmarks.run.measure_step``, unrolled, vmap over the 8 tasks) with and without it:
FLOPs (XLA's cost analysis, deterministic), temporary memory and median step time.
"""

from __future__ import annotations

import json

from benchmarks import cases
from benchmarks.run import STANDARD, algorithm, measure_step


def main() -> None:
    case = cases.transformer_case(**STANDARD)
    rows = {}
    for monitor in (True, False):
        stats = measure_step(algorithm("maml", case, monitor=monitor), case, repeats=3)
        rows[f"monitor={monitor}"] = {k: stats[k] for k in ("flops", "temp_bytes", "median_s")}
    off, on = rows["monitor=False"], rows["monitor=True"]
    rows["ratios, off / on"] = {k: off[k] / on[k] for k in on}
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

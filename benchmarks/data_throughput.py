"""Host-side episode throughput of the task sources (episodes per second, meta-batch 32).

    .venv/bin/python -m benchmarks.data_throughput --zip-dir ../shared/data/omniglot

Rows: Omniglot 5-way 1-shot (15 queries per class) and 20-way 1-shot (5 queries per class),
float32 and uint8 output, and the word tasks. "direct" is the median time of one
``sample(step, 32)`` call; "prefetch" is the rate at which a consumer that does nothing
receives meta-batches from :func:`metajax.tasks.prefetch` (one sampling thread); "overlap" is
the fraction of sampling time hidden behind a consumer that works (sleeps) as long as one
sampling call: 1.0 means the data costs the training step nothing. The machine is shared:
compare rows of one run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import tensorflow_datasets as tfds

from metajax.tasks import LanguageID, LanguageModeling, prefetch
from metajax.tasks.omniglot import Omniglot

META_BATCH = 32


def direct_seconds(source, repeats: int) -> float:
    source.sample(0, META_BATCH)  # warm-up: loads and caches the data
    times = []
    for step in range(1, repeats + 1):
        t = time.perf_counter()
        source.sample(step, META_BATCH)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def prefetch_seconds(source, repeats: int, work: float = 0.0) -> float:
    """Wall time per meta-batch seen by a consumer that spends ``work`` s on each."""
    with prefetch(source, 0, META_BATCH, depth=3, num_steps=repeats + 3) as it:
        for _ in range(3):  # let the queue fill once, as in a real run after warm-up
            next(it)
        t = time.perf_counter()
        for _ in it:
            time.sleep(work)
        return (time.perf_counter() - t) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument(
        "--zip-dir",
        default=os.environ.get(
            "METAJAX_OMNIGLOT_DIR", os.path.join(repo, "..", "shared", "data", "omniglot")
        ),
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="TFDS data dir (default: a temporary dir, built for this run and removed)",
    )
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    tfds.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="metajax_tfds_") as tmp:
        run(args, args.data_dir or tmp)


def run(args, data_dir: str) -> None:
    def omni(ways, queries, dtype):
        return Omniglot(
            ways=ways,
            shots=1,
            queries=queries,
            dtype=dtype,
            zip_dir=args.zip_dir,
            data_dir=data_dir,
        )

    t = time.perf_counter()
    omni(5, 15, "float32").classes()
    print(f"Omniglot prepare + load into memory: {time.perf_counter() - t:.1f} s ({data_dir})")
    rows = [
        ("Omniglot 5-way 1-shot, Q=15, float32", omni(5, 15, "float32")),
        ("Omniglot 5-way 1-shot, Q=15, uint8", omni(5, 15, "uint8")),
        ("Omniglot 20-way 1-shot, Q=5, float32", omni(20, 5, "float32")),
        ("Omniglot 20-way 1-shot, Q=5, uint8", omni(20, 5, "uint8")),
        ("LanguageID 5-way 1-shot, Q=15, L=32", LanguageID(ways=5, shots=1, queries=15)),
        ("LanguageModeling K=16, Q=16, L=32", LanguageModeling(shots=16, queries=16)),
    ]
    header = (
        f"{'source (meta-batch 32)':<40} {'direct ep/s':>12} {'prefetch ep/s':>14} {'overlap':>8}"
    )
    print(header)
    print("-" * len(header))
    for name, source in rows:
        direct = direct_seconds(source, args.repeats)
        fetched = prefetch_seconds(source, args.repeats)
        # A consumer working exactly one sampling time per step: perfect overlap keeps the
        # step at `direct`; no overlap doubles it.
        busy = prefetch_seconds(source, args.repeats, work=direct)
        overlap = min(1.0, max(0.0, 2.0 - busy / direct))
        print(
            f"{name:<40} {META_BATCH / direct:>12.0f} {META_BATCH / fetched:>14.0f} {overlap:>8.2f}"
        )


if __name__ == "__main__":
    main()

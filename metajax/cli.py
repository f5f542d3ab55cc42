"""``metajax``: the command-line runner.

    metajax train CONFIG [--workdir DIR] [--set key=value ...]
    metajax eval  CONFIG --workdir DIR [--set key=value ...]
    metajax list

CONFIG is an experiment name (``sinusoid``), a name with a variant
(``sinusoid:tiny``) or a config file path (``experiments/sinusoid.py[:tiny]``).
Several hosts: start one process per host with ``--coordinator HOST:PORT
--num-processes N --process-id I`` (or the ``METAJAX_COORDINATOR``,
``METAJAX_NUM_PROCESSES``, ``METAJAX_PROCESS_ID`` environment variables).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

DEFAULT_CACHE = os.path.join("~", ".cache", "metajax", "jax")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="metajax", description="Run metajax experiments.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("train", "train (or resume) an experiment, then evaluate it"),
                        ("eval", "evaluate the latest checkpoint of a workdir")):
        c = sub.add_parser(name, help=help_)
        c.add_argument("config", help="experiment name[:variant] or config file path")
        c.add_argument("--workdir", required=name == "eval",
                       help="run directory (default for train: runs/<config name>)")
        c.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[],
                       metavar="KEY=VALUE", help="override config fields, e.g. train.steps=100")
        c.add_argument("--no-progress", action="store_true", help="no progress bar")
        c.add_argument("--cache-dir", default=None,
                       help=f"persistent compilation cache (default $METAJAX_CACHE_DIR or "
                            f"{DEFAULT_CACHE}; 'none' disables)")
        if name == "train":
            c.add_argument("--no-eval", action="store_true", help="skip the evaluation at the end")
            g = c.add_argument_group("several processes (jax.distributed)")
            g.add_argument("--coordinator", help="HOST:PORT of process 0's coordinator")
            g.add_argument("--num-processes", type=int)
            g.add_argument("--process-id", type=int)
            g.add_argument("--heartbeat-timeout", type=int, default=30,
                           help="seconds before a silent process is declared dead and the "
                                "others stop (default 30)")
    sub.add_parser("list", help="list experiments, task families and algorithms")
    return p


def setup_compilation_cache(cache_dir: str | None) -> None:
    """Turns on JAX's persistent compilation cache unless something configured it already."""
    import jax

    if cache_dir is None:
        if jax.config.jax_compilation_cache_dir:  # e.g. set by a test harness
            return
        cache_dir = os.environ.get("METAJAX_CACHE_DIR", DEFAULT_CACHE)
    if cache_dir.lower() == "none":
        jax.config.update("jax_enable_compilation_cache", False)
        return
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from metajax import experiment

    if args.command == "list":
        experiment._import_builtin_families()
        print("experiments:", ", ".join(experiment.experiment_names()))
        print("task families:", ", ".join(sorted(experiment.FAMILIES)))
        print("algorithms:", ", ".join(experiment.algorithm_names()))
        return 0
    if args.command == "train":
        from metajax.parallel import init_distributed

        # Before anything touches a JAX backend.
        init_distributed(args.coordinator, args.num_processes, args.process_id,
                         heartbeat_timeout_s=args.heartbeat_timeout)
    setup_compilation_cache(args.cache_dir)
    from metajax import runner

    try:
        config = experiment.load_config(args.config, args.overrides)
        if args.command == "train":
            workdir = args.workdir or os.path.join("runs", config.name)
            runner.train(config, workdir, progress=not args.no_progress,
                         evaluate=False if args.no_eval else None)
        else:
            runner.evaluate_workdir(config, args.workdir)
    except experiment.ConfigError as e:
        print(f"metajax: config error: {e}", file=sys.stderr)
        return 2
    except (runner.NonFiniteError, runner.PeerFailedError) as e:
        print(f"metajax: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

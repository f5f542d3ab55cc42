"""``metajax``: the command-line runner.

    metajax train CONFIG [--workdir DIR] [--set key=value ...] [--allow-changes]
    metajax eval  [CONFIG] --workdir DIR [--step N] [--output FILE] [--set key=value ...]
    metajax show  CONFIG [--set key=value ...]  |  metajax show --workdir DIR
    metajax list

CONFIG is an experiment name (``sinusoid``), a name with a variant (``sinusoid:tiny``) or a
config file path (``my_configs/sinusoid.py[:tiny]``). Several hosts: start one process per
host with ``--coordinator HOST:PORT --num-processes N --process-id I`` (or the
``METAJAX_COORDINATOR``, ``METAJAX_NUM_PROCESSES``, ``METAJAX_PROCESS_ID`` variables).
Config errors (and a workdir another process writes to) print one line and exit 2; Ctrl-C
stops with one line saying where the run resumes and exits 130; a closed output pipe
(``metajax show ... | head``) ends quietly.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence

DEFAULT_CACHE = os.path.join("~", ".cache", "metajax", "jax")
# What train and eval import besides the primitives: the extra ``metajax[run]``.
RUN_MODULES = ("tqdm", "orbax.checkpoint", "matplotlib")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="metajax", description="Run metajax experiments.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (
        ("train", "train (or resume) an experiment, then evaluate it"),
        ("eval", "evaluate a checkpoint of a workdir (default: the latest)"),
        ("show", "print a resolved config, or a workdir's configs"),
    ):
        c = sub.add_parser(name, help=help_)
        c.add_argument("config", nargs="?", help="experiment name[:variant] or config file path")
        c.add_argument("--workdir", help="run directory (train default: runs/<config name>)")
        c.add_argument(
            "--set",
            dest="overrides",
            action="extend",
            nargs="+",
            default=[],
            metavar="KEY=VALUE",
            help="override config fields, e.g. train.steps=100",
        )
        if name == "show":
            continue
        c.add_argument(
            "--no-progress", action="store_true", help="no progress bar: one line per log step"
        )
        c.add_argument(
            "--cache-dir",
            default=None,
            help=f"persistent compilation cache (default $METAJAX_CACHE_DIR or "
            f"{DEFAULT_CACHE}; 'none' disables)",
        )
        if name == "eval":
            c.add_argument(
                "--step", type=int, help="the checkpoint evaluated (default: the latest)"
            )
            c.add_argument("--output", help="the JSON file written (default: WORKDIR/eval.json)")
        if name == "train":
            c.add_argument("--no-eval", action="store_true", help="skip the evaluation at the end")
            c.add_argument(
                "--allow-changes",
                action="store_true",
                help="resume a workdir although the model, algorithm, optimizer or "
                "data changed (the change is recorded)",
            )
            g = c.add_argument_group("several processes (jax.distributed)")
            g.add_argument("--coordinator", help="HOST:PORT of process 0's coordinator")
            g.add_argument("--num-processes", type=int)
            g.add_argument("--process-id", type=int)
            g.add_argument(
                "--heartbeat-timeout",
                type=int,
                default=30,
                help="seconds before a silent process is declared dead and the "
                "others stop (default 30)",
            )
    sub.add_parser("list", help="list experiments and their variants, families, algorithms")
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


def _split_config(args) -> None:
    """``--set a=1 sinusoid`` puts the config name among the overrides: take it back."""
    names = [item for item in args.overrides if "=" not in item]
    if args.config is None and len(names) == 1:
        args.config = names[0]
        args.overrides = [item for item in args.overrides if item != names[0]]


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # Called in-process, the command leaves the process's streams as it found them.
    args.restore_streams = argv is not None
    code = _guarded(args)
    if code == 130 and argv is None:
        # A Ctrl-C that lands inside XLA (tracing, compiling) can leave its threads in a
        # state in which the interpreter's teardown crashes (exit 139). Checkpoints are
        # complete on disk and the workdir lock is released: leave without the teardown.
        # Only as the command itself (argv from sys.argv), never when called in-process.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _guarded(args) -> int:
    try:
        return _main(args)
    except BrokenPipeError:
        # The reader went away (`metajax show ... | head`): what it read is complete for it.
        # Later writes, and the flush at exit, must not fail again on the closed pipe.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 0 if args.command in ("show", "list") else 1
    except KeyboardInterrupt:
        print(f"metajax: interrupted{_resume_note(args)}.", file=sys.stderr)
        return 130


def _main(args) -> int:
    from metajax import _extras
    from metajax.run.config import ConfigError
    from metajax.run.workdir import WorkdirBusyError

    if args.command == "list":
        return _list()
    _split_config(args)
    try:
        if args.command in ("train", "eval"):
            # Checked before anything is written: plots are drawn only after training.
            _extras.require(RUN_MODULES, f"metajax {args.command}")
        if args.command == "train" and args.config is not None and _lead(args):
            # Importing jax and the family takes seconds: say what is happening first.
            print(f"building {args.config} ...", flush=True)
        return _run(args)
    except WorkdirBusyError as e:
        print(f"metajax: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"metajax: config error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        # An optional package a family or a pretrained model needs; families list theirs
        # (Family.requires) and fail before building, pretrained readers import theirs on loading.
        message = str(e) if isinstance(e, _extras.MissingExtraError) else _extras.hint(e)
        if message is None:
            raise
        print(f"metajax: {message}", file=sys.stderr)
        return 2


def _lead(args) -> bool:
    """Whether this is process 0 of the run (the one that prints)."""
    pid = args.process_id if args.process_id is not None else os.environ.get("METAJAX_PROCESS_ID")
    return pid in (None, 0, "0", "")


def _resume_note(args) -> str:
    """Where an interrupted ``train`` resumes: the newest committed checkpoint on disk."""
    if args.command != "train" or args.config is None:
        return ""
    from metajax.run.config_files import load_config

    workdir = args.workdir
    if workdir is None:
        try:
            workdir = os.path.join("runs", load_config(args.config).name)
        except Exception:  # noqa: BLE001 - only a hint; the config may be what failed
            return ""
    directory = os.path.join(workdir, "checkpoints")
    names = os.listdir(directory) if os.path.isdir(directory) else []
    steps = [int(n) for n in names if n.isdigit()]
    where = f"resumes from step {max(steps)}" if steps else "starts from step 0"
    return f"; `metajax train` on {workdir} {where}"


def _run(args) -> int:
    from metajax.run.config import ConfigError
    from metajax.run.config_files import load_config

    bad = [item for item in args.overrides if "=" not in item]
    if bad:
        raise ConfigError(f"--set {bad[0]!r}: expected key=value.")
    if args.command == "show":
        return _show(args)
    if args.command == "train":
        if args.config is None:
            raise ConfigError(
                "train needs a CONFIG (e.g. sinusoid:tiny); `metajax list` lists them."
            )
        config = load_config(args.config, args.overrides)  # checked before any backend starts
        from metajax.parallel import init_distributed

        init_distributed(
            args.coordinator,
            args.num_processes,
            args.process_id,
            heartbeat_timeout_s=args.heartbeat_timeout,
        )
    elif args.workdir is None:
        raise ConfigError("eval needs --workdir DIR (a metajax train run directory).")
    setup_compilation_cache(args.cache_dir)
    from metajax.run import loop
    from metajax.run.checkpoint import quiet_abandoned_reads
    from metajax.run.logs import NonFiniteError

    # The process's stderr is the command's to filter, not the library's. Abandoned reads
    # may report after the command has returned: a process that is the command keeps the
    # filter until it exits.
    restore_streams = quiet_abandoned_reads()
    try:
        if args.command == "train":
            workdir = args.workdir or os.path.join("runs", config.name)
            loop.train(
                config,
                workdir,
                progress=True,
                bar=False if args.no_progress else None,
                evaluate=False if args.no_eval else None,
                allow_changes=args.allow_changes,
            )
        else:
            from metajax.run.evaluate import evaluate_workdir

            name = None if args.config is None else load_config(args.config).name
            evaluate_workdir(
                args.workdir, args.overrides, name=name, step=args.step, output=args.output
            )
    except (NonFiniteError, loop.PeerFailedError) as e:
        print(f"metajax: {e}", file=sys.stderr)
        return 1
    except loop.Interrupted as e:
        print(f"metajax: {e}", file=sys.stderr)
        return 130
    finally:
        if args.restore_streams:
            restore_streams()
    return 0


def _show(args) -> int:
    from metajax.run.config import ConfigError, describe
    from metajax.run.config_files import load_config

    if args.workdir is not None:
        if args.config is not None or args.overrides:
            raise ConfigError("show --workdir DIR takes no CONFIG or --set.")
        from metajax.run.workdir import history, read_config

        current = read_config(args.workdir)
        if current is None:
            raise ConfigError(f"{args.workdir} holds no config.json: not a metajax train workdir.")
        for entry in history(args.workdir):
            changes = ", ".join(entry["changes"]) or "none"
            print(f"# from step {entry['start_step']}: changed keys: {changes}")
        print(describe(current))
        return 0
    if args.config is None:
        raise ConfigError("show needs a CONFIG or --workdir DIR.")
    print(describe(load_config(args.config, args.overrides)))
    return 0


def _list() -> int:
    from metajax.run import families
    from metajax.run.build import ALGORITHMS
    from metajax.run.config_files import experiment_names, variants

    print("experiments (name: variants):")
    for name in experiment_names():
        print(f"  {name}: {', '.join(variants(name)) or '(default only)'}")
    print("task families:", ", ".join(families.names()))
    print("algorithms:", ", ".join(ALGORITHMS))
    return 0


if __name__ == "__main__":
    sys.exit(main())

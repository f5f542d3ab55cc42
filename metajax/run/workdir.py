"""A workdir's record of its configs and who is writing to it.

``config.json`` is the config the run is trained with now; ``config_history.jsonl`` has one
line per start or resume (the step it started from, the keys it changed, the full config),
so a run resumed with other settings keeps the record of both. ``.metajax.lock`` names the
process that writes to the workdir while it runs (:func:`lock`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import socket
import sys
import time
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from metajax.run import families
from metajax.run.config import Config, ConfigError, flat_keys, from_dict, to_dict

LOCK_NAME = ".metajax.lock"


class WorkdirBusyError(ConfigError):
    """Another live process holds the workdir's lock."""


def read_config(workdir: Path) -> Config | None:
    """The config in ``workdir/config.json``, or None when there is none.

    Raises:
      ConfigError: the file is not JSON, not a metajax config, or holds a value of the
        wrong type; one line naming the file and the key.
    """
    path = Path(workdir) / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read ({e}).") from None
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})."
        ) from None
    return config_from_json(data, path)


def config_from_json(data: Any, where: Path | str = "config.json") -> Config:
    """A :class:`Config` from its JSON form, its task built by the family's ``task_config``,
    every value checked against its field's type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: not a metajax config (a JSON {type(data).__name__}).")
    for key in ("name", "family", "task"):
        if key not in data:
            raise ConfigError(f"{where}: not a metajax config (no {key!r} key).")
    if not isinstance(data["family"], str):
        raise ConfigError(f"{where}: family is {data['family']!r}, expected a family name.")
    for section in ("task", "algorithm", "optimizer", "train", "eval"):
        if not isinstance(data.get(section, {}), dict):
            raise ConfigError(f"{where}: {section} is {data[section]!r:.60}, expected an object.")
    try:
        family = families.load(data["family"])
        config = from_dict(data, family.task_config)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{where}: not a metajax config ({e}).") from None
    check_types(config, where)
    return config


def check_types(config: Config, where: Path | str = "config") -> None:
    """Raises :class:`ConfigError` naming the first key whose value does not have its
    field's type (a hand-edited or damaged file: ``"train.steps": "abc"``)."""
    if not isinstance(config.name, str):
        raise ConfigError(f"{where}: name is {config.name!r}, expected str.")
    for key in flat_keys(config):
        if "." not in key:
            continue
        owner_key, field = key.rsplit(".", 1)
        owner = config
        for part in owner_key.split("."):
            owner = getattr(owner, part)
        hint = typing.get_type_hints(type(owner))[field]
        value = getattr(owner, field)
        if not _has_type(value, hint):
            raise ConfigError(f"{where}: {key} is {value!r:.60}, expected {_type_name(hint)}.")


def _has_type(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # JSON writes 1.0 as 1.0, but a hand-written 1 means the same
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is tuple or origin is tuple:
        if not isinstance(value, tuple):
            return False
        if not args:
            return True
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_has_type(v, args[0]) for v in value)
        return len(value) == len(args) and all(map(_has_type, value, args))
    if dataclasses.is_dataclass(hint) or isinstance(hint, type):
        return isinstance(value, hint)
    return True  # a hint this check does not know: the family's build checks the value


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is None and hasattr(hint, "__name__"):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("NoneType", "None")


def has_checkpoint(workdir: Path) -> bool:
    """Whether ``workdir/checkpoints`` holds a committed step (orbax names a complete one by
    its step alone; an interrupted write keeps a ``.orbax-checkpoint-tmp`` suffix)."""
    directory = Path(workdir) / "checkpoints"
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def record_start(workdir: Path, config: Config, start: int, changes: list[str]) -> None:
    """Writes ``config.json`` and appends this start to ``config_history.jsonl``; a start
    from step 0 begins the history anew (an earlier start that wrote no checkpoint trained
    nothing that the record must keep)."""
    workdir = Path(workdir)
    data = to_dict(config)
    (workdir / "config.json").write_text(json.dumps(data, indent=2) + "\n")
    entry = {"start_step": start, "changes": changes, "config": data}
    with (workdir / "config_history.jsonl").open("a" if start else "w") as f:
        f.write(json.dumps(entry) + "\n")


def history(workdir: Path) -> list[dict]:
    """The starts and resumes of a workdir, oldest first."""
    path = Path(workdir) / "config_history.jsonl"
    if not path.is_file():
        return []
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: line {e.lineno} is not valid JSON ({e.msg}).") from None


@contextlib.contextmanager
def lock(workdir: Path, what: str, echo=print) -> Iterator[None]:
    """Holds ``workdir/.metajax.lock`` while the body runs; creates ``workdir``.

    The lock is ``fcntl.flock`` on that file, not an ``O_EXCL`` pid file: the kernel drops
    a flock when its process dies, SIGKILL and the OOM killer included, so a lock is never
    stale and no guess about whether a pid is alive is needed (a pid cannot be checked
    from another host sharing the folder, and pids are reused). The file records the pid,
    host and command for the message a second process gets; a file left by a dead
    process holds no flock and is taken over. On NFS, Linux maps flock to byte-range
    locks that the server arbitrates across hosts; a file system without locks is warned
    about and the run goes on unlocked.

    Raises:
      WorkdirBusyError: another live process holds the lock; one line naming it.
    """
    import fcntl

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = _describe(path)
            os.close(fd)
            raise WorkdirBusyError(
                f"{workdir} is in use by {other}; wait for it to end, or use another --workdir."
            ) from None
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            print(
                f"metajax: warning: {workdir} cannot be locked here ({e.strerror}); "
                "make sure no other run writes to it.",
                file=sys.stderr,
            )
            yield
            return
        # A holder that just ended removed the file we opened: lock the file now at `path`.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        previous = os.read(fd, 4096).decode(errors="replace").strip()
        if previous:
            echo(f"taking over the lock of {_describe_text(previous)}, which is no longer running")
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_text(what).encode(), 0)
        yield
    finally:
        # Removed while still held: a process that opened it meanwhile sees another inode.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def _holder_text(what: str) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    return json.dumps(
        {"pid": os.getpid(), "host": socket.gethostname(), "command": what, "since": since}
    )


def _describe(path: Path) -> str:
    try:
        return _describe_text(path.read_text())
    except OSError:
        return "another process"


def _describe_text(text: str) -> str:
    try:
        info = json.loads(text)
        what = f"metajax {info['command']}, since {info['since']}"
        return f"pid {info['pid']} on {info['host']} ({what})"
    except (ValueError, KeyError, TypeError):
        return "another process"

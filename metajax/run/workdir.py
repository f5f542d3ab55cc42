"""A workdir's record of its configs: ``config.json`` and ``config_history.jsonl``.

``config.json`` is the config the run is trained with now; ``config_history.jsonl`` has one
line per start or resume (the step it started from, the keys it changed, the full config),
so a run resumed with other settings keeps the record of both.
"""

from __future__ import annotations

import json
from pathlib import Path

from metajax.run import families
from metajax.run.config import Config, ConfigError, from_dict, to_dict


def read_config(workdir: Path) -> Config | None:
    """The config in ``workdir/config.json``, or None when there is none."""
    path = Path(workdir) / "config.json"
    if not path.is_file():
        return None
    return config_from_json(json.loads(path.read_text()), path)


def config_from_json(data: dict, where: Path | str = "config.json") -> Config:
    """A :class:`Config` from its JSON form, its task built by the family's ``TaskConfig``."""
    try:
        family = families.load(data["family"])
        return from_dict(data, family.TaskConfig)
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{where}: not a metajax config ({e}).") from None
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def record_start(workdir: Path, config: Config, start: int, changes: list[str]) -> None:
    """Writes ``config.json`` and appends this start to ``config_history.jsonl``."""
    workdir = Path(workdir)
    data = to_dict(config)
    (workdir / "config.json").write_text(json.dumps(data, indent=2) + "\n")
    entry = {"start_step": start, "changes": changes, "config": data}
    with (workdir / "config_history.jsonl").open("a") as f:
        f.write(json.dumps(entry) + "\n")


def history(workdir: Path) -> list[dict]:
    """The starts and resumes of a workdir, oldest first."""
    path = Path(workdir) / "config_history.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

"""Faults of a workdir: failed first starts, data that cannot give the task, damaged
config.json and checkpoints, two processes on one workdir. Each error is one line."""

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import needs_data

from metajax.run import cli
from metajax.run import loop as runner
from metajax.run.checkpoint import Checkpointer
from metajax.run.config import ConfigError
from metajax.run.config_files import load_config
from metajax.run.workdir import LOCK_NAME, history, lock

QUIET = ["--no-progress", "--set", "train.log_every=2", "train.checkpoint_every=2"]


def _train(workdir, *sets, config="sinusoid:tiny"):
    return cli.main(["train", config, "--workdir", str(workdir), *QUIET, *sets])


def _eval(workdir, *args):
    return cli.main(["eval", "--workdir", str(workdir), *args])


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A sinusoid:tiny workdir with checkpoints at steps 2 and 4."""
    workdir = tmp_path_factory.mktemp("faults") / "run"
    assert _train(workdir, "train.steps=4", "eval.after_train=false") == 0
    return workdir


@pytest.fixture
def run(trained, tmp_path):
    """A copy of ``trained`` to damage."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


def test_a_start_that_fails_before_its_first_checkpoint_leaves_a_new_workdir(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert _train(workdir, "train.steps=4", "optimizer.lr=1e6", "train.checkpoint_every=4") == 1
    assert "No checkpoint was written" in capsys.readouterr().err
    # The fixed command is a new run, not a resume refused for "other settings".
    assert _train(workdir, "train.steps=2", "eval.after_train=false") == 0
    out = capsys.readouterr().out
    assert out.startswith("building sinusoid:tiny ...") and "resuming" not in out
    assert [(h["start_step"], h["changes"]) for h in history(workdir)] == [(0, [])]
    assert not (workdir / LOCK_NAME).exists()


@pytest.mark.parametrize(
    ("config", "variable", "message"),
    [
        ("omniglot:tiny", "METAJAX_OMNIGLOT_DIR", "no Omniglot data: set task.zip_dir or"),
        ("fewrel:tiny", "METAJAX_FEWREL_DIR", "no FewRel data folder for val_wiki.json"),
    ],
)
def test_data_named_by_neither_config_nor_variable_is_one_line(
    tmp_path, capsys, monkeypatch, config, variable, message
):
    monkeypatch.delenv(variable, raising=False)
    workdir = tmp_path / "run"
    assert _train(workdir, config=config) == 2
    line = _one_line(capsys)
    assert message in line and f"${variable}" in line
    assert not workdir.exists()


@needs_data("omniglot")
@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["task.shots=19"], "19-shot 2-query tasks need 21 drawings of a character"),
        (["task.ways=5000"], "5000-way tasks need 5000 classes; the train split has"),
        (["task.eval_split=validation", "task.ways=200"], "(validation split): 200-way tasks"),
    ],
)
def test_tasks_the_data_cannot_give_are_one_line_before_anything_is_written(
    tmp_path, capsys, sets, message
):
    workdir = tmp_path / "run"
    assert _train(workdir, *sets, config="omniglot:tiny") == 2
    assert message in _one_line(capsys)
    assert not workdir.exists()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: "garbage{", "config.json: not valid JSON (line 1, column 1"),
        (lambda d: {**d, "train": {**d["train"], "steps": "abc"}}, "train.steps is 'abc', exp"),
        (lambda d: {**d, "task": {**d["task"], "hidden": "lots"}}, "task.hidden is 'lots', exp"),
        (lambda d: [d], "config.json: not a metajax config (a JSON list)"),
        (lambda d: {k: v for k, v in d.items() if k != "family"}, "(no 'family' key)"),
    ],
)
def test_a_damaged_config_json_is_one_line_naming_file_and_key(run, capsys, damage, message):
    path = run / "config.json"
    data = damage(json.loads(path.read_text()))
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    for command in (
        ["train", "sinusoid:tiny", "--workdir", str(run), "--no-progress"],
        ["eval", "--workdir", str(run)],
        ["show", "--workdir", str(run)],
    ):
        assert cli.main(command) == 2, command
        err = _one_line(capsys)
        assert str(path) in err and message in err


def _overwrite_data(step_dir: Path) -> None:
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"garbage")


def test_eval_and_train_fall_back_to_the_newest_checkpoint_that_reads(run, capsys):
    _overwrite_data(run / "checkpoints" / "4")
    assert _eval(run, "--output", str(run / "e.json")) == 0
    out = capsys.readouterr().out
    assert "the checkpoint at step 4 in" in out and "does not read (ValueError" in out
    assert "evaluating" in out and "at step 2" in out
    assert json.loads((run / "e.json").read_text())["checkpoint_step"] == 2
    # Training moves the damaged one aside and writes that step again.
    assert _train(run, "train.steps=4", "eval.after_train=false") == 0
    out = capsys.readouterr().out
    assert f"resuming {run} from step 2" in out and "checkpoints_unreadable" in out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4"]
    assert (run / "checkpoints_unreadable" / "4").is_dir()
    ckpt = Checkpointer(run / "checkpoints", create=False)
    try:
        assert ckpt.config(4)["train"]["steps"] == 4
    finally:
        ckpt.close()


@pytest.mark.parametrize("part", ["data", "metadata"])
def test_no_checkpoint_that_reads_is_one_line(run, capsys, part):
    for step in ("2", "4"):
        if part == "data":
            _overwrite_data(run / "checkpoints" / step)
        else:
            (run / "checkpoints" / step / "state" / "_METADATA").write_text("garbage")
    for command in (_eval, _train):
        assert command(run) == 2
        assert "reads (steps [2, 4]; " in _one_line(capsys)
    assert capsys.readouterr().err == ""


def test_a_workdir_in_use_is_refused_in_one_line_and_a_stale_lock_taken_over(run, capsys):
    with lock(run, "train"):
        assert _train(run, "train.steps=6") == 2
        err = _one_line(capsys)
        assert f"{run} is in use by pid {os.getpid()} on " in err and "metajax train" in err
        assert _eval(run) == 2  # it would write eval.json
        assert "is in use by pid" in _one_line(capsys)
        # Another output file does not touch the workdir's results: allowed.
        assert _eval(run, "--output", str(run / "other.json")) == 0
        capsys.readouterr()
    assert not (run / LOCK_NAME).exists()
    # A lock file left by a process that died (no flock held on it) is taken over.
    dead = {"pid": 999999, "host": "elsewhere", "command": "train", "since": "then"}
    (run / LOCK_NAME).write_text(json.dumps(dead))
    assert _train(run, "train.steps=6", "eval.after_train=false") == 0
    out = capsys.readouterr().out
    assert "taking over the lock of pid 999999 on elsewhere" in out
    assert not (run / LOCK_NAME).exists()


def test_refused_resume_names_each_change_once(run):
    config = load_config("sinusoid:tiny", ["train.steps=6", "optimizer.lr=0.5"])
    with pytest.raises(ConfigError) as err:
        runner.train(dataclasses.replace(config, name="renamed"), run, progress=False)
    message = str(err.value)
    assert message.count("name sinusoid_tiny -> renamed") == 1 and message.count("name ") == 1
    assert message.count("optimizer.lr") == 1

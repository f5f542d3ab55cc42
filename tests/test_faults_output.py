"""What the runner prints and draws says what happened: rates, splits, refused settings,
file errors, single-point plots, long silent stretches."""

import itertools
import json

import pytest
from conftest import needs_data

from metajax.run import cli, logs, plots
from metajax.run import loop as runner
from metajax.run.config import ConfigError, to_dict
from metajax.run.config_files import load_config
from metajax.run.evaluate import evaluate_workdir


def test_logged_rates_cover_whole_log_intervals(tmp_path, monkeypatch):
    # A clock that ticks once per reading: every log interval, checkpoints included, is one
    # tick from the previous row's reading, so each row is log_every steps per tick.
    ticks = itertools.count()
    monkeypatch.setattr(logs, "now", lambda: float(next(ticks)))
    config = load_config(
        "sinusoid:tiny",
        ["train.steps=20", "train.log_every=5", "train.checkpoint_every=10", "eval.after_train=0"],
    )
    runner.train(config, tmp_path / "run", progress=False, echo=lambda *_: None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert [r["steps_per_s"] for r in rows] == [5.0] * 4


def test_table_steps_past_the_evaluated_steps_are_a_config_error(tmp_path, capsys):
    workdir = tmp_path / "run"
    args = ["train", "sinusoid:tiny", "--workdir", str(workdir), "--set"]
    assert cli.main([*args, "eval.table_steps=(0, 1, 5)"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and not workdir.exists()
    assert "eval.table_steps=(0, 1, 5): 5 is outside 0..eval.inner_steps = 2" in err
    # `metajax eval` checks the same, before it reads a checkpoint.
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps(to_dict(load_config("sinusoid:tiny"))))
    with pytest.raises(ConfigError, match="eval.table_steps=\\(0, 1, 2\\): 2 is outside"):
        evaluate_workdir(workdir, ["eval.inner_steps=1"])


def test_the_table_names_the_evaluated_split(tmp_path):
    from metajax.run.build import build
    from metajax.run.evaluate import run_eval

    sets = ["task.eval_split=validation", "eval.num_tasks=2", "eval.chunk=2"]
    sets += ["eval.inner_steps=1", "eval.table_steps=(0, 1)"]
    exp = build(load_config("words_lm:tiny", sets))
    lines = []
    result = run_eval(exp, exp.algo.init(exp.params), tmp_path, echo=lines.append)
    assert result["split"] == "validation"
    assert lines[0].startswith("Held-out evaluation on 2 validation tasks")


@needs_data("fewrel")  # the other splits' files come from the data folder
def test_fewrel_missing_absolute_file_suggests_no_data_folder(tmp_path):
    from metajax.run.families import fewrel as family

    missing = tmp_path / "mine.json"
    task = family.FewRelTask(test_files=(str(missing),))
    with pytest.raises(ConfigError) as err:
        family.sources(task, 0)
    message = str(err.value)
    assert f"{missing}: no such FewRel JSON file." in message and "data_dir" not in message


def test_a_run_with_one_logged_point_draws_it(tmp_path, monkeypatch):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 2, "loss_before": 3.0, "loss_after": 2.0}) + "\n")
    axes = []
    subplots = plots.plt.subplots

    def recording(*args, **kwargs):
        fig, ax = subplots(*args, **kwargs)
        axes.append(ax)
        return fig, ax

    monkeypatch.setattr(plots.plt, "subplots", recording)
    (path,) = plots.learning_curves(metrics, tmp_path / "plots")
    assert path.is_file()
    (ax,) = axes
    assert [line.get_marker() for line in ax.lines] == ["o", "o"]
    assert [list(line.get_ydata()) for line in ax.lines] == [[3.0], [2.0]]


def test_train_says_what_it_builds_first(tmp_path, capsys):
    assert cli.main(["train", "sinusoid:tiny", "--workdir", str(tmp_path), "--set", "x=1"]) == 2
    assert capsys.readouterr().out == "building sinusoid:tiny ...\n"


def test_the_first_omniglot_use_says_it_prepares_the_dataset(tmp_path, monkeypatch, capsys):
    from metajax.tasks import omniglot, omniglot_builder

    class Stop(Exception):
        pass

    def prepare(*args):
        raise Stop

    monkeypatch.setattr(omniglot_builder.MetajaxOmniglot, "is_prepared", lambda self: False)
    monkeypatch.setattr(omniglot_builder, "prepare", prepare)
    with pytest.raises(Stop):
        omniglot._load_all("zips", str(tmp_path / "zips"), str(tmp_path / "data"), None, False)
    err = capsys.readouterr().err
    assert f"preparing Omniglot from {tmp_path / 'zips'} into {tmp_path / 'data'}" in err
    assert err.count("\n") == 1


def test_list_shows_the_variants_the_readme_uses(capsys):
    from metajax.run.config_files import variants

    assert cli.main(["list"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("  sinusoid:"))
    assert "fomaml" in line.split(": ", 1)[1].split(", ")
    for variant in variants("sinusoid"):
        assert load_config(f"sinusoid:{variant}").family == "sinusoid"

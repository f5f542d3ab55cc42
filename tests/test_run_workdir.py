"""Workdirs: provenance of resumed runs, what a resume or an eval may change, config errors
that write nothing, an interrupted checkpoint, another device count, readable logs."""

import json
import shutil

import chex
import numpy as np
import pytest

from metajax.run import cli, predict
from metajax.run.checkpoint import Checkpointer
from metajax.run.workdir import history

RUN = [
    "--no-progress",
    "--set",
    "train.log_every=2",
    "train.checkpoint_every=2",
    "eval.num_tasks=8",
    "eval.chunk=8",
]


def _train(workdir, *sets, extra=()):
    return cli.main(["train", "sinusoid:tiny", "--workdir", str(workdir), *extra, *RUN, *sets])


def test_resume_refuses_changes_unless_allowed_and_records_them(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert _train(workdir, "train.steps=4", "eval.after_train=false") == 0
    capsys.readouterr()
    # A negative rate is a config error; a changed rate needs --allow-changes.
    assert _train(workdir, "train.steps=6", "optimizer.lr=-0.01") == 2
    assert "optimizer.lr=-0.01 must be > 0" in capsys.readouterr().err
    assert _train(workdir, "train.steps=6", "optimizer.lr=0.002") == 2
    err = capsys.readouterr().err
    assert "optimizer.lr 0.01 -> 0.002" in err and "--allow-changes" in err
    assert len(history(workdir)) == 1  # refused before anything was written
    # More steps alone is a plain resume; with --allow-changes the rate change is recorded.
    assert (
        _train(
            workdir,
            "train.steps=6",
            "optimizer.lr=0.002",
            "eval.after_train=false",
            extra=["--allow-changes"],
        )
        == 0
    )
    starts = history(workdir)
    assert [s["start_step"] for s in starts] == [0, 4]
    assert starts[1]["changes"] == ["optimizer.lr", "train.steps"]
    ckpt = Checkpointer(workdir / "checkpoints")
    try:
        assert ckpt.config(4)["optimizer"]["lr"] == 0.01  # each checkpoint keeps its own
        assert ckpt.config(6)["optimizer"]["lr"] == 0.002
    finally:
        ckpt.close()
    assert cli.main(["show", "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert "# from step 4: changed keys: optimizer.lr, train.steps" in out
    assert "optimizer.lr: float = 0.002" in out


def test_eval_reads_the_workdir_config(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert _train(workdir, "train.steps=2", "task.shots=3") == 0
    first = json.loads((workdir / "eval.json").read_text())
    assert first["config"]["task"]["shots"] == 3
    capsys.readouterr()
    # Without a name, with the right one, with more tasks: the trained shots are kept.
    assert cli.main(["eval", "--workdir", str(workdir), "--set", "eval.num_tasks=12"]) == 0
    again = json.loads((workdir / "eval.json").read_text())
    assert again["num_tasks"] == 12 and again["config"]["task"]["shots"] == 3
    assert cli.main(["eval", "sinusoid:fomaml", "--workdir", str(workdir)]) == 2
    assert "holds a 'sinusoid_tiny' run, not 'sinusoid_fomaml'" in capsys.readouterr().err
    assert cli.main(["eval", "--workdir", str(workdir), "--set", "task.shots=10"]) == 2
    assert "--set task.shots: evaluation can change only" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "eval",
                "--workdir",
                str(workdir),
                "--set",
                "algorithm.inner_lr=0.02",
                "eval.after_train=true",
            ]
        )
        == 0
    )


def test_eval_of_a_chosen_checkpoint_into_another_file(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert _train(workdir, "train.steps=4") == 0
    test_eval = (workdir / "eval.json").read_text()
    out = tmp_path / "step2.json"
    assert cli.main(["eval", "--workdir", str(workdir), "--step", "2", "--output", str(out)]) == 0
    early = json.loads(out.read_text())
    assert early["checkpoint_step"] == 2 and (workdir / "eval.json").read_text() == test_eval
    # Two meta-steps fewer give another held-out loss: the older parameters were restored.
    later = json.loads(test_eval)["metrics"]["loss"]["mean"]
    assert early["metrics"]["loss"]["mean"] != pytest.approx(later, rel=1e-6)
    capsys.readouterr()
    assert cli.main(["eval", "--workdir", str(workdir), "--step", "3"]) == 2
    assert "no checkpoint at step 3" in capsys.readouterr().err
    missing = tmp_path / "nowhere" / "e.json"
    assert cli.main(["eval", "--workdir", str(workdir), "--output", str(missing)]) == 2
    assert "not a file in an existing folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["algorithm.inner_lr=-0.4"], "algorithm.inner_lr=-0.4 must be > 0"),
        (["task.shots=0"], "task.shots=0 must be >= 1"),
        (["algorithm.inner_steps=-1"], "algorithm.inner_steps=-1 must be >= 1"),
        (["train.devices=64"], "train.devices asks for 64 devices, but only 8 device(s)"),
        (["train.mesh=(4, 4)"], "train.mesh asks for 16 devices"),
        (["train.mesh=(2, 4)", "train.parallel=pmap"], "use train.parallel=sharding"),
        (["train.meta_batch=12"], "12 tasks does not divide over 8 devices"),
        (["algorithm.inner_optimizer=adamm"], "is not an optax optimizer"),
        (["algorithm.name=mamll"], "did you mean maml"),
        (["algorithm.distance=cosine"], "did you mean centered_cosine"),
        (["algorithm.cosine_scale=-1"], "algorithm.cosine_scale=-1.0 must be > 0"),
        (["algorithm.cosine_scale=5"], "scales centered_cosine only"),
    ],
)
def test_config_errors_are_one_line_and_write_nothing(tmp_path, capsys, sets, message):
    workdir = tmp_path / "run"
    assert _train(workdir, *sets) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not workdir.exists()


def test_workdir_that_is_a_file_and_missing_omniglot_folder(tmp_path, capsys):
    path = tmp_path / "file"
    path.write_text("x")
    assert _train(path) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    code = cli.main(
        [
            "train",
            "omniglot:tiny",
            "--workdir",
            str(tmp_path / "o"),
            "--set",
            f"task.zip_dir={tmp_path / 'nowhere'}",
        ]
    )
    assert code == 2
    assert "holds none of the official zips" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_set_before_the_config_name_and_none_for_optional_keys(tmp_path, capsys):
    code = cli.main(
        ["show", "--set", "algorithm.task_batch=none", "train.steps=7", "sinusoid:tiny"]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "algorithm.task_batch: int | None = none" in out and "train.steps: int = 7" in out
    assert cli.main(["show", "sinusoid:tiny", "--set", "algorithm.name=none"]) == 2
    assert "algorithm.name=none: expected str" in capsys.readouterr().err


def test_interrupted_checkpoint_write_resumes_from_the_last_complete(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert _train(workdir, "train.steps=4", "eval.after_train=false") == 0
    # A write killed midway leaves orbax's temporary folder, never a committed step.
    partial = workdir / "checkpoints" / "6.orbax-checkpoint-tmp-1234"
    shutil.copytree(workdir / "checkpoints" / "4", partial)
    capsys.readouterr()
    assert _train(workdir, "train.steps=6", "eval.after_train=false") == 0
    assert f"resuming {workdir} from step 4" in capsys.readouterr().out


def test_resume_on_another_device_count(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _train(a, "train.steps=4", "eval.after_train=false") == 0
    assert _train(a, "train.steps=6", "train.devices=2", "eval.after_train=false") == 0
    assert _train(b, "train.steps=6", "eval.after_train=false") == 0
    pa, pb = predict.load(a).meta_params, predict.load(b).meta_params
    chex.assert_trees_all_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_progress_in_a_log_is_one_line_per_log_step(tmp_path, capsys):
    assert _train(tmp_path / "run", "train.steps=4", "eval.after_train=false") == 0
    out = capsys.readouterr().out
    assert "\r" not in out
    lines = [line for line in out.splitlines() if ": step " in line]
    assert [line.split(": step ")[1].split()[0] for line in lines] == ["2/4", "4/4"]


def test_adapt_and_predict_takes_a_flat_sinusoid_array(tmp_path):
    assert _train(tmp_path / "run", "train.steps=2", "eval.after_train=false") == 0
    model = predict.load(tmp_path / "run")
    x = np.linspace(-3.0, 3.0, 5, dtype=np.float32)
    flat = model.adapt_and_predict(x, np.sin(x), x, steps=2)
    column = model.adapt_and_predict(x[:, None], np.sin(x)[:, None], x[:, None], steps=2)
    assert flat.shape == (5, 1)
    np.testing.assert_allclose(flat, column, rtol=1e-6)
    with pytest.raises(ValueError, match="5 support inputs but 4 targets"):
        model.adapt_and_predict(x, np.sin(x)[:4], x)


def test_a_model_mesh_trains_like_one_device_and_resumes(tmp_path):
    a, b = tmp_path / "mesh", tmp_path / "flat"
    assert _train(a, "train.steps=2", "train.mesh=(2, 4)", "eval.after_train=false") == 0
    assert _train(a, "train.steps=4", "train.mesh=(2, 4)", "eval.after_train=false") == 0
    assert _train(b, "train.steps=4", "train.devices=1", "eval.after_train=false") == 0
    pa, pb = predict.load(a).meta_params, predict.load(b).meta_params
    chex.assert_trees_all_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_an_allowed_change_that_no_longer_fits_the_checkpoint_is_one_line(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert _train(workdir, "train.steps=2", "eval.after_train=false") == 0
    capsys.readouterr()
    code = _train(workdir, "train.steps=4", "task.hidden=(16,)", extra=["--allow-changes"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "Dense_0/bias has shape (8,) there, (16,) here" in err

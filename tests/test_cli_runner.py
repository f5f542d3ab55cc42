"""The runner through ``metajax.run.cli.main``, in-process (8 fake devices): end to end, errors."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from metajax.run import build as experiment
from metajax.run import cli
from metajax.run import loop as runner
from metajax.run.checkpoint import Checkpointer
from metajax.run.config import ConfigError, apply_overrides, validate
from metajax.run.config_files import load_config
from metajax.train import train_state

TINY = ["--no-progress", "--set", "train.steps=10", "train.log_every=5", "train.checkpoint_every=5"]


def test_tiny_train_then_eval_end_to_end(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert cli.main(["train", "sinusoid:tiny", "--workdir", str(workdir), *TINY]) == 0
    out = capsys.readouterr().out
    assert "Held-out evaluation on 16 test tasks" in out and "sinusoid_fit.png" in out

    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10]
    assert all(np.isfinite(r["loss_after"]) and r["steps_per_s"] > 0 for r in rows)
    config = json.loads((workdir / "config.json").read_text())
    assert config["train"]["steps"] == 10 and config["task"]["type"] == "SinusoidTask"
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["10", "5"]
    assert (workdir / "plots" / "learning_curve_loss.png").stat().st_size > 1000
    assert (workdir / "plots" / "sinusoid_fit.png").stat().st_size > 1000

    result = json.loads((workdir / "eval.json").read_text())
    assert result["num_tasks"] == 16 and result["adaptation_steps"] == [0, 1, 2]
    assert result["checkpoint_step"] == 10
    loss = result["metrics"]["loss"]
    assert len(loss["mean"]) == len(loss["ci95"]) == 3
    assert all(c > 0 for c in loss["ci95"])

    # Step 0 of the evaluation is the meta-learned model's plain query loss on the test tasks.
    exp = experiment.build(load_config("sinusoid:tiny"))
    state = Checkpointer(workdir / "checkpoints").restore(
        train_state(exp.algo, exp.params, exp.optimizer)
    )
    tasks = exp.setup.eval_source.sample(0, 16)
    losses = jax.vmap(exp.setup.loss_fn, in_axes=(None, 0))(state.meta_params, tasks.query)
    np.testing.assert_allclose(loss["mean"][0], np.mean(losses), rtol=1e-5)
    np.testing.assert_allclose(loss["ci95"][0], 1.96 * np.std(losses, ddof=1) / 4.0, rtol=1e-4)

    # `metajax eval` on the workdir reproduces the numbers, with more tasks when asked.
    assert (
        cli.main(
            [
                "eval",
                "sinusoid:tiny",
                "--workdir",
                str(workdir),
                "--set",
                "eval.num_tasks=24",
                "eval.chunk=10",
            ]
        )
        == 0
    )
    again = json.loads((workdir / "eval.json").read_text())
    assert again["num_tasks"] == 24
    assert "Held-out evaluation on 24 test tasks" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.step=5", "unknown config key (did you mean train.steps"),
        ("steps=5", "did you mean train.steps"),
        ("train.steps=five", "--set train.steps=five: expected int"),
        ("algorithm.first_order=maybe", "expected bool"),
        ("eval.table_steps=(0, 'a')", "expected tuple"),
        ("train", "expected key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("sinusoid:tiny", [override])
    assert message in str(err.value)


def test_overrides_parse_by_type_and_cli_reports_errors(tmp_path, capsys):
    config = load_config(
        "sinusoid",
        ["task.shots=5", "algorithm.first_order=true", "optimizer.lr=3e-4", "task.hidden=(64, 64)"],
    )
    assert (config.task.shots, config.algorithm.first_order) == (5, True)
    assert config.optimizer.lr == 3e-4 and config.task.hidden == (64, 64)
    with pytest.raises(ConfigError, match="no variant 'huge'"):
        load_config("sinusoid:huge")
    with pytest.raises(ConfigError, match="did you mean sinusoid"):
        load_config("sinusiod")
    with pytest.raises(ConfigError, match="reptile takes no 'first_order'"):
        experiment.build(load_config("sinusoid:reptile", ["algorithm.first_order=true"]))
    with pytest.raises(ConfigError, match="algorithm.name='mamll': unknown \\(did you mean maml"):
        experiment.build(apply_overrides(load_config("sinusoid:tiny"), ["algorithm.name=mamll"]))
    run = ["train", "sinusoid:tiny", "--workdir", str(tmp_path), "--set"]
    code = cli.main([*run, "train.stepz=1"])
    assert code == 2
    assert "train.stepz" in capsys.readouterr().err
    code = cli.main([*run, "train.meta_batch=12"])
    assert code == 2
    assert "12 tasks does not divide over 8 devices" in capsys.readouterr().err


def test_nan_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, capsys):
    # Fine for 4 steps, then (resumed) an outer learning rate that blows the parameters up.
    workdir = tmp_path / "run"
    base = [
        "train",
        "sinusoid:tiny",
        "--workdir",
        str(workdir),
        "--no-progress",
        "--set",
        "train.log_every=1",
        "train.checkpoint_every=4",
    ]
    assert cli.main([*base, "train.steps=4", "eval.after_train=false"]) == 0
    code = cli.main([*base, "train.steps=12", "optimizer.lr=1e30", "--allow-changes"])
    err = capsys.readouterr().err
    assert code == 1
    assert "step 6: meta-train metric" in err and ("is inf" in err or "is nan" in err)
    assert "last good checkpoint (step 4)" in err
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["4"]
    assert not (workdir / "eval.json").exists()


def test_fomaml_and_reptile_variants_build_and_step(tmp_path):
    for variant in ("fomaml", "reptile"):
        config = load_config(
            f"sinusoid:{variant}",
            ["train.steps=2", "train.meta_batch=8", "task.hidden=(8,)", "eval.after_train=false"],
        )
        state = runner.train(config, tmp_path / variant, progress=False, echo=lambda *_: None)
        assert int(state.step) == 2
        assert np.isfinite(jax.tree.leaves(jax.device_get(state.meta_params))[0]).all()


def test_runner_pmap_path_matches_sharding(tmp_path):
    sets = ["train.steps=3", "eval.after_train=false"]
    states = [
        jax.device_get(
            runner.train(
                load_config("sinusoid:tiny", [*sets, f"train.parallel={mode}"]),
                tmp_path / mode,
                progress=False,
                echo=lambda *_: None,
            )
        )
        for mode in ("sharding", "pmap")
    ]
    assert int(states[1].step) == 3
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *states)


def _toy_setup():
    from toy import mlp_init, mse_loss

    from metajax.run.setup import Setup

    return Setup(mlp_init(jax.random.key(0)), mse_loss, None, None, None, None)


def test_algorithm_table_declares_the_settings_each_function_takes():
    import inspect

    settings = {f.name for f in dataclasses.fields(experiment.AlgorithmConfig)}
    for name, spec in experiment.ALGORITHMS.items():
        keywords = set(inspect.signature(spec.fn).parameters)
        assert set(spec.takes) | set(spec.fixed) == keywords & settings, name
        assert spec.masks == ("mask" in keywords) and "metric_fn" in keywords, name
    # What the table says is what a config may set: imaml has no remat, reptile alone takes
    # inner_batch, protonets has no inner loop.
    refused = [
        ("imaml", "remat", True, "imaml takes no 'remat'"),
        ("maml", "inner_batch", 4, "maml takes no 'inner_batch'"),
        ("protonets", "inner_steps", 3, "protonets takes no 'inner_steps'"),
        ("maml", "distance", "centered_cosine", "maml takes no 'distance'"),
    ]
    for name, field, value, message in refused:
        cfg = experiment.AlgorithmConfig(name=name, **{field: value})
        with pytest.raises(ConfigError, match=message):
            experiment.make_algorithm(cfg, _toy_setup())


def test_inner_optimizer_and_outer_schedule_from_config():
    base = experiment.AlgorithmConfig(
        name="reptile",
        inner_steps=2,
        inner_lr=0.01,
        inner_optimizer="adam",
        inner_optimizer_args=(("b1", 0.0),),
    )
    rule = experiment.inner_rule(base)
    assert rule["inner_lr"] is None and rule["inner_optimizer"] is not None
    bad = [
        ({"inner_optimizer": "adamm"}, "is not an optax optimizer"),
        ({"inner_optimizer_args": (("beta1", 0.0),)}, "inner_optimizer_args"),
        ({"name": "protonets", "inner_steps": 1}, "takes no inner optimizer"),
    ]
    for change, message in bad:
        cfg = dataclasses.replace(base, **change)
        with pytest.raises(ConfigError, match=message):
            experiment.make_algorithm(cfg, _toy_setup())
    # A linear schedule takes the full step first and none at the last step.
    opt = experiment.make_optimizer(
        experiment.OptimizerConfig(name="sgd", lr=1.0, schedule="linear"), 4
    )
    params, sizes = np.zeros((), np.float32), []
    state = opt.init(params)
    for _ in range(4):
        updates, state = opt.update(np.ones((), np.float32), state, params)
        sizes.append(float(-updates))
    np.testing.assert_allclose(sizes, [1.0, 0.75, 0.5, 0.25])
    with pytest.raises(ConfigError, match="optimizer.schedule='step'"):
        validate(load_config("sinusoid:tiny", ["optimizer.schedule=step"]))


def test_fomaml_config_uses_its_inner_optimizer():
    from toy import sine_tasks

    setup = _toy_setup()
    tasks = sine_tasks(jax.random.key(1))
    sgd = experiment.AlgorithmConfig(name="fomaml", inner_steps=2, inner_lr=0.05)
    adam = dataclasses.replace(sgd, inner_optimizer="adam")
    g_sgd = experiment.make_algorithm(sgd, setup).meta_grad(setup.params, tasks)[0]
    g_adam = experiment.make_algorithm(adam, setup).meta_grad(setup.params, tasks)[0]
    diff = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), g_sgd, g_adam))
    assert max(diff) > 1e-3
    # The runner's Adam gets eps_root, so its meta-gradient (second order) is finite.
    maml_adam = dataclasses.replace(adam, name="maml")
    g = experiment.make_algorithm(maml_adam, setup).meta_grad(setup.params, tasks)[0]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(g))


def test_config_names_resolve_in_order_env_then_cwd_experiments_then_packaged(
    tmp_path, monkeypatch
):
    from metajax.run import config_files

    packaged = config_files.find("sinusoid")
    assert packaged.parent.name == "configs" and packaged.parent.parent.name == "metajax"
    # A user's ./experiments/sinusoid.py overrides the shipped one; $METAJAX_EXPERIMENTS
    # overrides both. Each copy trains its own number of steps.
    mine, env = tmp_path / "experiments", tmp_path / "env"
    for folder, steps in ((mine, 7), (env, 9)):
        folder.mkdir()
        (folder / "sinusoid.py").write_text(
            "import dataclasses\n"
            "from metajax.configs import sinusoid\n\n"
            "def get_config(variant=''):\n"
            "    c = sinusoid.get_config(variant)\n"
            f"    train = dataclasses.replace(c.train, steps={steps})\n"
            "    return dataclasses.replace(c, train=train)\n"
        )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("METAJAX_EXPERIMENTS", raising=False)
    assert load_config("sinusoid:tiny").train.steps == 7
    monkeypatch.setenv("METAJAX_EXPERIMENTS", str(env))
    assert load_config("sinusoid:tiny").train.steps == 9
    monkeypatch.delenv("METAJAX_EXPERIMENTS")
    monkeypatch.chdir(env)  # no experiments/ here: the shipped file
    assert config_files.find("sinusoid") == packaged
    assert load_config("sinusoid:tiny").train.steps == 20

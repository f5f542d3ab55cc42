"""Every algorithm trains from the CLI (``--set algorithm.name=NAME``), and does what makes it
that algorithm: MAML++'s weights anneal and its order switches, Meta-SGD's rates move,
ANIL's body stays put in the inner loop, iMAML solves its linear system."""

import json

import jax
import numpy as np
import pytest
from conftest import data_dir, needs_data

from metajax.run import cli, predict
from metajax.run.build import ALGORITHMS, build
from metajax.run.workdir import read_config

BASE = [
    "--no-progress",
    "--set",
    "train.steps=6",
    "train.log_every=1",
    "train.checkpoint_every=3",
    "eval.num_tasks=8",
    "eval.chunk=8",
]


def _train(tmp_path, name, *sets):
    workdir = tmp_path / name
    code = cli.main(
        [
            "train",
            "sinusoid:tiny",
            "--workdir",
            str(workdir),
            *BASE,
            f"algorithm.name={name}",
            *sets,
        ]
    )
    return code, workdir


def _rows(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", [n for n in ALGORITHMS if not ALGORITHMS[n].on_embedding])
def test_every_gradient_algorithm_trains_and_evaluates(tmp_path, name):
    code, workdir = _train(tmp_path, name)
    assert code == 0
    rows = _rows(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r["loss_after"]) and np.isfinite(r["grad_norm"]) for r in rows)
    result = json.loads((workdir / "eval.json").read_text())
    assert result["config"]["algorithm"]["name"] == name
    # Evaluation adapts for 2 steps: the held-out query loss must change with adaptation.
    loss = result["metrics"]["loss"]["mean"]
    assert len(loss) == 3 and loss[0] != loss[2]


def test_mamlpp_anneals_its_weights_and_switches_order(tmp_path):
    code, workdir = _train(
        tmp_path,
        "mamlpp",
        "algorithm.inner_steps=2",
        "algorithm.anneal_iters=4",
        "algorithm.first_order_until=3",
    )
    assert code == 0
    rows = _rows(workdir)
    weights = [r["msl_last_weight"] for r in rows]
    # Weight of the last step's loss at outer steps 0..5: 1/2 growing to 1 - 0.03/2 by step 4.
    np.testing.assert_allclose(weights, [0.5, 0.625, 0.75, 0.875, 0.985, 0.985], rtol=1e-5)
    assert [r["second_order"] for r in rows] == [0, 0, 0, 1, 1, 1]


def test_meta_sgd_learns_its_rates(tmp_path):
    code, workdir = _train(tmp_path, "meta_sgd", "optimizer.lr=0.05")
    assert code == 0
    rates = jax.tree.leaves(predict.load(workdir).meta_params["lr"])
    moved = max(float(np.abs(np.asarray(r) - 0.01).max()) for r in rates)
    assert moved > 1e-3  # initialised at inner_lr = 0.01, then meta-learned


def test_anil_adapts_only_the_head(tmp_path):
    code, workdir = _train(tmp_path, "anil")
    assert code == 0
    model = predict.load(workdir)
    x = np.linspace(-4.0, 4.0, 5, dtype=np.float32)
    adapted = model.adapt(x, np.sin(x), steps=3)
    before = model.meta_params["params"]
    after = adapted["params"]
    # The sinusoid family's head is the last Dense layer; the body keeps its values.
    np.testing.assert_array_equal(after["Dense_0"]["kernel"], before["Dense_0"]["kernel"])
    assert np.abs(after["Dense_1"]["kernel"] - before["Dense_1"]["kernel"]).max() > 1e-6


def test_imaml_solves_its_linear_system(tmp_path):
    # A strong proximal term makes I + H / reg well conditioned: 8 CG steps solve it, 1 not.
    sets = ("algorithm.inner_steps=3", "algorithm.reg=10", "train.steps=3")
    assert _train(tmp_path / "a", "imaml", *sets, "algorithm.cg_steps=8")[0] == 0
    assert _train(tmp_path / "b", "imaml", *sets, "algorithm.cg_steps=1")[0] == 0
    solved = [r["cg_residual"] for r in _rows(tmp_path / "a" / "imaml")]
    rough = [r["cg_residual"] for r in _rows(tmp_path / "b" / "imaml")]
    assert max(solved) < 1e-3 < min(rough)


@pytest.mark.parametrize("name", ["protonets", "proto_maml"])
def test_embedding_algorithms_on_a_regression_family_say_why(tmp_path, capsys, name):
    code, workdir = _train(tmp_path, name)
    assert code == 2
    err = capsys.readouterr().err
    assert name in err and "not a classification family" in err
    assert not workdir.exists()


@pytest.mark.parametrize("name", ["fomaml", "reptile", "anil", "imaml"])
def test_zero_head_starts_every_task_at_zero_and_meta_learns_the_body(tmp_path, name):
    code, workdir = _train(tmp_path, name, "algorithm.zero_head=true", "algorithm.inner_steps=2")
    assert code == 0
    model = predict.load(workdir)
    params = model.meta_params["params"]
    # The sinusoid family's head is its last Dense layer (one hidden layer in sinusoid:tiny).
    assert all(np.all(np.asarray(p) == 0) for p in jax.tree.leaves(params["Dense_1"]))
    x = np.linspace(-4.0, 4.0, 5, dtype=np.float32)
    zero_head = jax.tree.map(np.zeros_like, params["Dense_1"])
    start = model.adapt(x, np.sin(x), steps=0)["params"]
    np.testing.assert_array_equal(start["Dense_1"]["kernel"], zero_head["kernel"])
    adapted = model.adapt(x, np.sin(x), steps=1)["params"]
    assert np.abs(np.asarray(adapted["Dense_1"]["kernel"])).max() > 0
    # The body was meta-learned: it left its initialisation.
    init = build(read_config(workdir)).params["params"]
    moved = np.abs(np.asarray(params["Dense_0"]["kernel"] - init["Dense_0"]["kernel"])).max()
    assert moved > 1e-4


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("meta_sgd", "algorithm.zero_head=True: meta_sgd takes no 'zero_head'"),
        ("reptile", "reptile with inner_steps=1 never moves the body"),
    ],
)
def test_zero_head_is_refused_where_it_cannot_work(tmp_path, capsys, name, message):
    code, workdir = _train(tmp_path, name, "algorithm.zero_head=true", "algorithm.inner_steps=1")
    assert code == 2
    assert message in capsys.readouterr().err
    assert not workdir.exists()


def test_a_setting_the_algorithm_lacks_is_refused(tmp_path, capsys):
    code, workdir = _train(tmp_path, "reptile", "algorithm.reg=2.0")
    assert code == 2
    assert "algorithm.reg=2.0: reptile takes no 'reg'" in capsys.readouterr().err
    assert not workdir.exists()


OMNIGLOT = data_dir("omniglot")
# One meta-step of a small meta-batch per family, no evaluation: that the algorithm builds,
# compiles and takes a finite step on the family's model is what is checked.
FAMILIES = {
    "sinusoid:tiny": ["train.meta_batch=2"],
    "omniglot:tiny": [f"task.zip_dir={OMNIGLOT}", "train.meta_batch=1"],
    "words_lm:tiny": ["train.meta_batch=1"],
}


def _applies(spec: str, name: str) -> bool:
    """ProtoNets and Proto-MAML need a classification family with an embedding: of these,
    Omniglot."""
    return not ALGORITHMS[name].on_embedding or spec.startswith("omniglot")


@pytest.mark.parametrize(
    ("spec", "name"),
    [
        pytest.param(
            spec,
            name,
            marks=needs_data("omniglot") if spec.startswith("omniglot") else (),
        )
        for spec in FAMILIES
        for name in ALGORITHMS
        if _applies(spec, name)
    ],
)
def test_every_listed_algorithm_trains_on_every_family_it_applies_to(tmp_path, capsys, spec, name):
    # The configs set what their own algorithm takes (an inner rate, a task loop); naming
    # another algorithm drops those it does not take, one line saying which.
    workdir = tmp_path / name
    sets = ["train.steps=1", "train.log_every=1", "train.checkpoint_every=1", "train.devices=1"]
    argv = ["train", spec, "--workdir", str(workdir), "--no-progress", "--no-eval", "--set"]
    code = cli.main([*argv, *sets, *FAMILIES[spec], f"algorithm.name={name}"])
    err = capsys.readouterr().err
    assert code == 0, err
    (row,) = _rows(workdir)
    assert row["step"] == 1 and np.isfinite(row["loss_after"]) and row["grad_norm"] > 0
    config = json.loads((workdir / "config.json").read_text())["algorithm"]
    assert config["name"] == name
    if name == "protonets":  # omniglot:tiny is a MAML config: its rate and loop forms go
        dropped = (
            "algorithm.inner_lr, algorithm.unroll, algorithm.task_batch, algorithm.unroll_tasks"
        )
        assert f"protonets takes no {dropped}: dropped from omniglot:tiny." in err
        assert (config["inner_lr"], config["unroll"], config["task_batch"]) == (0.01, 8, None)
    elif name == "maml":
        assert "dropped" not in err


def test_a_setting_given_on_the_command_line_is_still_refused(tmp_path, capsys):
    workdir = tmp_path / "p"
    argv = ["train", "sinusoid:tiny", "--workdir", str(workdir), "--no-progress", "--set"]
    code = cli.main([*argv, "algorithm.name=reptile", "algorithm.first_order=true"])
    assert code == 2
    err = capsys.readouterr().err
    assert "algorithm.first_order=True: reptile takes no 'first_order'" in err
    assert not workdir.exists()


@needs_data("omniglot")
@pytest.mark.parametrize("name", ["meta_sgd", "mamlpp"])
def test_learned_rate_algorithms_train_on_omniglot(tmp_path, name):
    # Their meta-parameters are more than the ConvNet's: evaluation and plots must cope.
    workdir = tmp_path / name
    code = cli.main(
        [
            "train",
            "omniglot:tiny",
            "--workdir",
            str(workdir),
            "--no-progress",
            "--set",
            f"algorithm.name={name}",
            f"task.zip_dir={OMNIGLOT}",
        ]
    )
    assert code == 0
    result = json.loads((workdir / "eval.json").read_text())
    accuracy = result["metrics"]["accuracy"]["mean"]
    # Whole numbers of right answers out of 8 tasks x 5 ways x 2 queries.
    assert len(accuracy) == 3
    assert all(abs(a * 80 - round(a * 80)) < 1e-3 for a in accuracy), accuracy

"""The ``words_gpt2`` family through the CLI on the committed tiny GPT-2: LoRA meta-learning
with a frozen base, prediction from the workdir, and config errors that name the problem."""

import json
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metajax.models import load_gpt2
from metajax.run import cli, predict
from metajax.run.config import ConfigError
from metajax.run.config_files import load_config
from metajax.run.families import words_gpt2

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "gpt2_tiny"
QUIET = ["--no-progress"]


def _train(spec, workdir, *args):
    assert cli.main(["train", spec, "--workdir", str(workdir), *QUIET, *args]) == 0
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3]
    for key in ("loss_before", "loss_after", "bits_per_token_after", "grad_norm"):
        assert math.isfinite(rows[0][key]) and rows[0][key] > 0, key
    return rows[0]


def _check_frozen_base_and_moved_factors(workdir):
    model = predict.load(workdir)
    assert model.step == 3
    _, pretrained = load_gpt2(FIXTURE)
    same = jax.tree.map(np.array_equal, model.meta_params["base"], pretrained)
    assert all(jax.tree.leaves(same))
    # LoRA.init sets every b to zero; meta-training moved every one of them.
    bs = [
        np.abs(np.asarray(leaf)).max()
        for path, leaf in jax.tree_util.tree_leaves_with_path(model.meta_params["lora"])
        if path[-1].key == "b"
    ]
    assert len(bs) == 8 and min(bs) > 1e-4
    return model


def test_tiny_maml_trains_lora_only_and_predicts(tmp_path):
    workdir = tmp_path / "maml"
    row = _train("words_gpt2:tiny", workdir)
    # The query loss after the inner LoRA step is below the loss before it.
    assert row["loss_after"] < row["loss_before"]
    result = json.loads((workdir / "eval.json").read_text())
    bits = result["metrics"]["bits_per_token"]["mean"]
    assert len(bits) == 2 and all(math.isfinite(b) for b in bits)

    model = _check_frozen_base_and_moved_factors(workdir)
    logits = model.adapt_and_predict(["kala", "talo"], None, ["kirja"])
    assert logits.shape == (1, 12, 320) and np.isfinite(logits).all()
    # The adapted model differs from the meta-learned one on the query.
    unadapted = model.adapt_and_predict(["kala", "talo"], None, ["kirja"], steps=0)
    assert np.abs(logits - unadapted).max() > 1e-4


def test_tiny_fomaml_trains_lora_only(tmp_path):
    workdir = tmp_path / "fomaml"
    _train("words_gpt2:tiny_fomaml", workdir, "--no-eval")
    _check_frozen_base_and_moved_factors(workdir)


def test_sequences_are_end_word_end_with_a_target_mask():
    setup = words_gpt2.build(load_config("words_gpt2:tiny"))
    tokens, mask = setup.batch_fn(["kala", "talo"])
    assert tokens.shape == mask.shape == (2, 12)
    # <|endoftext|> (id 0) opens and closes the word and pads; the word and its end are targets.
    length = int(mask[0].sum())
    assert tokens[0, 0] == 0 and tokens[0, length] == 0 and mask[0, 0] == 0
    assert np.asarray(mask[0, 1 : length + 1]).all() and not np.asarray(mask[0, length + 1 :]).any()
    # Task sampling is a pure function of (step, task index), in GPT-2 tokens.
    a = setup.train_source.sample(5, 3)
    b = setup.train_source.sample(5, 1, first_task=2)
    np.testing.assert_array_equal(a.query[0][2:], b.query[0])
    assert a.support[0].shape == (3, 2, 12) and a.query[1].shape == (3, 2, 12)


def test_missing_checkpoint_folder_exits_2_with_its_name(tmp_path, capsys):
    missing = tmp_path / "no_gpt2_here"
    code = cli.main(
        [
            "train",
            "words_gpt2:tiny",
            "--workdir",
            str(tmp_path / "run"),
            *QUIET,
            "--set",
            f"task.checkpoint={missing}",
        ]
    )
    assert code == 2
    assert str(missing) in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("task.size=gpt3", "task.size='gpt3': unknown"),
        ("task.lora_rank=0", "task.lora_rank=0 must be"),
        ("task.lora_alpha=-1", "task.lora_alpha=-1.0 must be"),
        ("task.lora_targets=wte/nothing", "task.lora_targets='wte/nothing'"),
        ("task.lora_targets=(", "is not a regex"),
        ("task.adapt=bias", "task.adapt='bias'"),
        ("task.dtype=float16", "task.dtype='float16'"),
        ("task.max_len=100", "task.max_len=100 > the model's n_positions 64"),
    ],
)
def test_bad_task_values_name_the_field(override, message):
    with pytest.raises(ConfigError, match=None) as err:
        words_gpt2.build(load_config("words_gpt2:tiny", [override]))
    assert message in str(err.value)


def test_checkpoint_folder_without_weights_names_the_file(tmp_path):
    folder = tmp_path / "gpt2_no_weights"
    folder.mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        words_gpt2.checkpoint_folder(str(folder))
    shutil.copy(FIXTURE / "config.json", folder)
    with pytest.raises(ConfigError, match="no model.safetensors"):
        words_gpt2.checkpoint_folder(str(folder))


def test_freeze_base_trains_the_layer_norms_too_for_lora_plus_norm():
    setup = words_gpt2.build(load_config("words_gpt2:tiny", ["task.adapt=lora+norm"]))
    meta = setup.params
    tx = setup.wrap_optimizer(optax.sgd(1.0))
    grads = jax.tree.map(jnp.ones_like, meta)
    updates, _ = tx.update(grads, tx.init(meta), meta)
    base = updates["base"]["params"]
    assert np.all(np.asarray(base["h_0"]["ln_1"]["scale"]) == -1.0)
    assert np.all(np.asarray(base["ln_f"]["bias"]) == -1.0)
    assert not np.asarray(base["h_0"]["attn"]["c_attn"]["kernel"]).any()
    assert not np.asarray(base["wte"]["embedding"]).any()
    assert np.all(np.asarray(updates["lora"]["params"]["h_1"]["mlp"]["c_fc"]["kernel"]["b"]) == -1)
    # The inner loop adapts the same leaves: the factors and the LayerNorms.
    assert setup.inner_mask["base"]["params"]["h_1"]["ln_2"]["bias"] is True
    assert setup.inner_mask["base"]["params"]["h_1"]["mlp"]["c_fc"]["kernel"] is False

"""``words_lm`` with a pretrained model (``task.model``), on the committed tiny GPT-2 and tiny
Llama: LoRA meta-learning with a frozen base through the CLI, prediction from the workdir, the
frozen trunk, bits per byte from the tokenizer's byte table, and config errors that name the
problem."""

import json
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metajax.lora import LoRA
from metajax.models import load_gpt2
from metajax.models.pretrained import load_tokenizer
from metajax.run import cli, predict
from metajax.run.config import ConfigError
from metajax.run.config_files import load_config
from metajax.run.families import words_lm
from metajax.run.pretrained_choice import token_byte_lengths

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "gpt2_tiny"
LLAMA_GGUF = FIXTURE.parent / "llama_tiny" / "llama.q8_0.gguf"
# Latin with accents, Cyrillic, Thai, Korean, Greek, Hebrew: 1- to 3-byte characters.
WORDS = ["kala", "naïve", "żółć", "привет", "สวัสดี", "한국어", "ελληνικά", "עברית"]
QUIET = ["--no-progress"]


@pytest.fixture(autouse=True)
def trunk_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METAJAX_TRUNK_CACHE", str(tmp_path / "trunk"))
    return tmp_path / "trunk"


def _train(spec, workdir, *args):
    assert cli.main(["train", spec, "--workdir", str(workdir), *QUIET, *args]) == 0
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3]
    for key in ("loss_before", "loss_after", "bits_per_token_after", "grad_norm"):
        assert math.isfinite(rows[0][key]) and rows[0][key] > 0, key
    return rows[0]


def _check_frozen_base_and_moved_factors(workdir, blocks=("h_0", "h_1")):
    model = predict.load(workdir)
    assert model.step == 3
    _, pretrained = load_gpt2(FIXTURE)
    base = model.meta_params["base"]["params"]
    # With a frozen trunk the base holds only the top: its blocks, ln_f and the tied head.
    assert sorted(base) == sorted([*blocks, "ln_f", "wte"] + (["wpe"] if len(blocks) == 2 else []))
    same = jax.tree.map(np.array_equal, base, {k: pretrained["params"][k] for k in base})
    assert all(jax.tree.leaves(same))
    # LoRA.init sets every b to zero; meta-training moved every one of them.
    bs = [
        np.abs(np.asarray(leaf)).max()
        for path, leaf in jax.tree_util.tree_leaves_with_path(model.meta_params["lora"])
        if path[-1].key == "b"
    ]
    assert len(bs) == 4 * len(blocks) and min(bs) > 1e-4
    return model


def test_tiny_maml_trains_lora_only_and_predicts(tmp_path):
    workdir = tmp_path / "maml"
    row = _train("words_lm:gpt2_tiny", workdir)
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


def test_tiny_fomaml_with_a_frozen_trunk_trains_the_top_and_predicts(tmp_path, trunk_cache):
    workdir = tmp_path / "fomaml"
    _train("words_lm:gpt2_tiny_fomaml", workdir, "--no-eval", "--set", "task.trainable_blocks=1")
    model = _check_frozen_base_and_moved_factors(workdir, blocks=("h_1",))
    assert any(trunk_cache.rglob("*.npy"))
    logits = model.adapt_and_predict(["kala", "talo"], None, ["kirja"])
    assert logits.shape == (1, 12, 320) and np.isfinite(logits).all()
    # Unadapted, it is the whole GPT-2 with the meta-learned top: trunk (h_0), then h_1.
    gpt2, pretrained = load_gpt2(FIXTURE)
    lora = LoRA(rank=2, alpha=4.0, targets=r"(c_attn|c_proj|c_fc)/kernel")
    top = lora.merge(jax.tree.map(np.asarray, model.meta_params))["params"]
    tokens, _ = model._exp.evaluator.batch_fn(["kirja"])[0]  # (tokens, trunk states)
    want = gpt2.apply({"params": {**pretrained["params"], **top}}, tokens)
    unadapted = model.adapt_and_predict(["kala"], None, ["kirja"], steps=0)
    np.testing.assert_allclose(unadapted, want, rtol=1e-5, atol=1e-5)


def test_sequences_are_end_word_end_with_a_target_mask():
    setup = words_lm.build(load_config("words_lm:gpt2_tiny"))
    tokens, mask = setup.evaluator.batch_fn(["kala", "talo"])
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
    # The same languages and words as the byte-level family draws.
    scratch = words_lm.build(load_config("words_lm:tiny", ["task.shots=2", "task.queries=2"]))
    assert setup.train_source.sample_languages(5, 3) == scratch.train_source.sample_languages(5, 3)


def test_missing_model_exits_2_with_its_name(tmp_path, capsys):
    missing = tmp_path / "no_gpt2_here"
    args = ["train", "words_lm:gpt2_tiny", "--workdir", str(tmp_path / "run"), *QUIET]
    assert cli.main([*args, "--set", f"task.model={missing}"]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("task.lora_rank=0", "task.lora_rank=0 must be"),
        ("task.lora_alpha=-1", "task.lora_alpha=-1.0 must be"),
        ("task.lora_targets=wte/nothing", "task.lora_targets='wte/nothing'"),
        ("task.lora_targets=(", "is not a regex"),
        ("task.adapt=bias", "task.adapt='bias'"),
        ("task.dtype=float16", "task.dtype='float16'"),
        ("task.max_len=100", "task.max_len=100 > the model's n_positions 64"),
        ("task.trainable_blocks=3", "task.trainable_blocks=3 must be in [1, 2]"),
        ("task.trainable_blocks=0", "task.trainable_blocks=0 must be >= 1"),
        ("task.num_blocks=1", "task.num_blocks=1: this family reads the LM head"),
        ("task.model=smollm-9000", "task.model='smollm-9000'"),
    ],
)
def test_bad_task_values_name_the_field(override, message):
    with pytest.raises(ConfigError) as err:
        words_lm.build(load_config("words_lm:gpt2_tiny", [override]))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "override", ["task.lora_rank=4", "task.trainable_blocks=1", "task.adapt=all", "task.remat=true"]
)
def test_pretrained_settings_with_the_scratch_model_are_refused(override):
    with pytest.raises(ConfigError, match="task.model=scratch trains the family's own"):
        words_lm.build(load_config("words_lm:tiny", [override]))


def test_model_folder_without_weights_names_the_file(tmp_path):
    folder = tmp_path / "gpt2_no_weights"
    folder.mkdir()
    shutil.copy(FIXTURE / "config.json", folder)
    with pytest.raises(ConfigError, match="model.safetensors"):
        words_lm.build(load_config("words_lm:gpt2_tiny", [f"task.model={folder}"]))


def test_freeze_base_trains_the_layer_norms_too_for_lora_plus_norm():
    setup = words_lm.build(load_config("words_lm:gpt2_tiny", ["task.adapt=lora+norm"]))
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


@pytest.mark.parametrize("fixture", [FIXTURE, LLAMA_GGUF], ids=["gpt2_folder", "llama_gguf"])
def test_byte_table_spells_each_words_utf8_bytes(fixture):
    tokenizer = load_tokenizer(fixture)
    table = token_byte_lengths(tokenizer)
    assert table.shape == (tokenizer.vocab_size,)
    for word in WORDS:
        ids = tokenizer.encode(word)
        assert table[ids].sum() == len(word.encode("utf-8")), word
    # The fixtures' 320 ids cut characters apart: an id decoded alone is U+FFFD, not its bytes,
    # so a table of len(decode([id]).encode()) would miscount these words.
    partial = [i for w in WORDS for i in tokenizer.encode(w) if "\ufffd" in tokenizer.decode([i])]
    assert partial
    # Special tokens (start, end, padding) spell nothing; a model's padded ids neither.
    assert table[tokenizer.token_id("<|endoftext|>")] == 0
    assert np.array_equal(token_byte_lengths(tokenizer, 400)[: table.size], table)
    assert not token_byte_lengths(tokenizer, 400)[table.size :].any()


def test_byte_table_refuses_a_tokenizer_that_is_not_byte_level():
    from tokenizers import Tokenizer, decoders, models

    tokenizer = Tokenizer(models.BPE(vocab={"a": 0, "▁": 1}, merges=[]))
    tokenizer.decoder = decoders.Metaspace()
    with pytest.raises(ValueError, match="byte-level BPE tokenizer.*Metaspace"):
        token_byte_lengths(tokenizer)
    with pytest.raises(ValueError, match="size=10 is below"):
        token_byte_lengths(load_tokenizer(FIXTURE), 10)


@pytest.mark.parametrize(
    "spec", ["words_lm:gpt2_tiny", "words_lm:smollm2_tiny"], ids=["gpt2", "llama_trunk"]
)
def test_bits_per_byte_is_the_bits_per_token_over_the_words_bytes(spec):
    setup = words_lm.build(load_config(spec, ["task.max_len=24"]))  # 16-byte words fit
    batch = setup.evaluator.batch_fn(WORDS)
    metrics = jax.jit(setup.metric_fn)(setup.params, batch)
    # The targets: each word's tokens and its end token, which spells no byte.
    num_tokens = float(np.asarray(batch[1])[:, 1:].sum())
    num_bytes = sum(len(w.encode("utf-8")) for w in WORDS)
    assert num_tokens != num_bytes  # else a table of ones would pass too
    bits = float(metrics["bits_per_token"]) * num_tokens
    assert float(metrics["bits_per_byte"]) * num_bytes == pytest.approx(bits, rel=1e-5)
    assert 0 <= float(metrics["accuracy"]) <= 1


@pytest.mark.parametrize("variant", ["smollm2_tiny", "smollm2_tiny_pretrain"])
def test_smollm2_tiny_reports_bits_per_byte_through_the_cli(tmp_path, variant):
    workdir = tmp_path / variant
    _train(f"words_lm:{variant}", workdir)
    result = json.loads((workdir / "eval.json").read_text())
    assert result["config"]["task"]["trainable_blocks"] == 1
    assert result["config"]["task"]["model"].endswith("llama_tiny/llama.q8_0.gguf")
    expected = {"smollm2_tiny": "maml", "smollm2_tiny_pretrain": "pretrain"}[variant]
    assert result["config"]["algorithm"]["name"] == expected
    for name in ("bits_per_byte", "bits_per_token", "accuracy"):
        means = result["metrics"][name]["mean"]
        assert len(means) == 2 and all(math.isfinite(m) for m in means), name
    # A random 320-id model: about log2(320) bits a token, more per byte (end tokens).
    assert result["metrics"]["bits_per_byte"]["mean"][0] > 5


def test_smollm2_variants_are_sized_for_the_cpu():
    for algo in ("maml", "fomaml", "reptile", "pretrain"):
        c = load_config(f"words_lm:smollm2_{algo}")
        assert c.algorithm.name == algo and c.task.model == "smollm2-135m"
        assert (c.task.trainable_blocks, c.task.lora_rank, c.task.lora_alpha) == (2, 8, 16.0)
        assert (c.task.shots, c.task.queries, c.task.max_len) == (4, 4, 16)
        assert (c.train.steps, c.train.meta_batch, c.train.checkpoint_every) == (100, 4, 25)
        assert (c.eval.num_tasks, c.eval.inner_steps) == (200, 20)
        assert c.eval.table_steps == (0, 1, 5, 10, 20) and c.algorithm.inner_lr == 0.01
    with pytest.raises(ValueError, match="words_lm variant 'smollm2_anil'"):
        load_config("words_lm:smollm2_anil")

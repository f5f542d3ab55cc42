"""``fewrel`` with a pretrained model (``task.model``): entity markers in GPT-2 tokens, the
GPT-2 features, the task draws, meta-gradients of ProtoNets and MAML on the tiny fixture (with
and without a frozen trunk), the CLI, prediction, and config errors."""

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import data_dir, needs_data

from metajax.models import load_gpt2
from metajax.models.gpt2_checkpoint import load_gpt2_tokenizer
from metajax.run import cli, predict
from metajax.run.build import build as build_experiment
from metajax.run.config import AlgorithmConfig, Config, ConfigError, TrainConfig
from metajax.run.config_files import load_config
from metajax.run.families import fewrel as fewrel_family
from metajax.tasks import fewrel as F
from metajax.tasks import text_encoding as G

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "gpt2_tiny"
SHARED = data_dir("fewrel")
BYTE_START = 256


@pytest.fixture(scope="module")
def tokenizer():
    return load_gpt2_tokenizer(FIXTURE)


def sentence(words, head, tail):
    return {"tokens": list(words), "h": ["h", "Q1", [list(head)]], "t": ["t", "Q2", [list(tail)]]}


def toy_files(tmp_path, rels=(("P1", "P2", "P3"), ("P4", "P5"), ("P6", "P7")), per=4):
    """Train / validation / test FewRel files; sentence i of relation r is distinct."""
    paths = []
    for name, ids in zip(("train", "val", "test"), rels, strict=True):
        data = {
            r: [sentence([r, "links", f"n{i}", "to", f"m{i}", "."], [0], [2]) for i in range(per)]
            for r in ids
        }
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(data))
        paths.append(str(path))
    return paths


def byte_encoder(max_len, pool="start"):
    return G.MarkerEncoder(lambda s: list(s.encode("utf-8")), BYTE_START, max_len, pool)


def test_markers_are_text_and_positions_point_at_their_last_token(tokenizer):
    enc = G.MarkerEncoder(tokenizer.encode, 0, 40, "start")
    s = sentence(["Alice", "met", "Bob", "."], [0], [2, 3])
    tokens, positions = enc([s])
    text = "<|endoftext|> [E1] Alice [/E1] met [E2] Bob . [/E2]"
    n = len(tokenizer.encode(text[len("<|endoftext|>") :])) + 1
    assert tokenizer.decode(tokens[0, :n]) == text
    assert (tokens[0, n:] == 0).all()
    # The fixture's BPE splits " [E1]" into " ", "[", "E", "1", "]": 5 tokens; the "]" of
    # [E1] is index 5 (after the start token); [E2] comes after " Alice" (5 tokens),
    # " [/E1]" (6) and " met" (2), so its "]" is index 1 + 5 + 5 + 6 + 2 + 4 = 23.
    assert enc.marker_ids[0] == tuple(tokenizer.encode(" [E1]")) and len(enc.marker_ids[0]) == 5
    assert positions.tolist() == [[5, 23]]
    for p, marker in zip(positions[0], (" [E1]", " [E2]"), strict=True):
        assert tokenizer.decode(tokens[0, p - 4 : p + 1]) == marker
    _, end_positions = G.MarkerEncoder(tokenizer.encode, 0, 40, "end")([s])
    assert tokenizer.decode(tokens[0, end_positions[0, 0] - 5 : end_positions[0, 0] + 1]) == (
        " [/E1]"
    )
    assert end_positions[0, 1] == n - 1  # [/E2] closes the sentence
    # Nested tail inside the head: the outer entity opens first and closes last.
    tokens, _ = byte_encoder(64)([sentence(["a", "b", "c"], [0, 1, 2], [1])])
    assert bytes(tokens[0, 1:][tokens[0, 1:] != BYTE_START].tolist()).decode() == (
        " [E1] a [E2] b [/E2] c [/E1]"
    )


def test_truncation_keeps_every_marker_token(tokenizer):
    words = [f"w{i}" for i in range(60)]
    enc = G.MarkerEncoder(tokenizer.encode, 0, 48, "start")
    tokens, positions = enc([sentence(words, [30], [33])])
    text = tokenizer.decode(tokens[0])
    assert (tokens[0] != 0).sum() == 47 and tokens[0, 0] == 0  # full: the start token + 47
    # Both entities fit: a contiguous window around them, every marker whole.
    assert " [E1] w30 [/E1] w31 w32 [E2] w33 [/E2]" in text
    assert text.startswith("<|endoftext|>") and "w20" not in text and "w45" not in text
    for p, marker in zip(positions[0], (" [E1]", " [E2]"), strict=True):
        assert tokenizer.decode(tokens[0, p - 4 : p + 1]) == marker
    # At the smallest max_len only the start token and the markers remain.
    tokens, positions = byte_encoder(byte_encoder(64).min_len)([sentence(words, [2], [50])])
    assert bytes(tokens[0, 1:].tolist()).decode() == " [E1] [/E1] [E2] [/E2]"
    assert positions.tolist() == [[5, 16]]
    with pytest.raises(ValueError, match="max_len=22: needs room .* markers \\(23 tokens\\)"):
        byte_encoder(22)


def test_prompt_pool_restates_the_entities_and_reads_their_names(tokenizer):
    enc = G.MarkerEncoder(tokenizer.encode, 0, 64, "prompt")
    s = sentence(["Alice", "met", "Bob", "."], [0], [2])
    tokens, positions = enc([s])
    text = (
        "<|endoftext|> [E1] Alice [/E1] met [E2] Bob [/E2] . The relation between Alice and Bob is"
    )
    n = len(tokenizer.encode(text[len("<|endoftext|>") :])) + 1
    assert tokenizer.decode(tokens[0, :n]) == text and (tokens[0, n:] == 0).all()
    # Each position is the last token of a name restated in the prompt: "Alice", then "Bob".
    (head, tail) = positions[0]
    assert tokenizer.decode(tokens[0, : head + 1]).endswith("[/E2] . The relation between Alice")
    assert tokenizer.decode(tokens[0, head + 1 : tail + 1]) == " and Bob"
    # A long sentence is cut, never the prompt nor a marker; a long name keeps its first
    # NAME_TOKENS tokens.
    words = [f"w{i}" for i in range(60)]
    long = sentence(words, [30], list(range(40, 52)))
    tokens, positions = enc([long])
    text = tokenizer.decode(tokens[0])
    assert (tokens[0] != 0).sum() == 63 and " [E1] w30 [/E1]" in text and "[/E2]" in text
    name = tokenizer.encode(" " + " ".join(words[40:52]))[: G.NAME_TOKENS]
    assert text.endswith(f" The relation between w30 and{tokenizer.decode(name)} is")
    assert tokens[0, positions[0, 1]] == name[-1]
    with pytest.raises(ValueError, match=f"max_len=40: needs room .* names of {G.NAME_TOKENS}"):
        G.MarkerEncoder(tokenizer.encode, 0, 40, "prompt")
    with pytest.raises(ValueError, match="pool='mean': choose one of start, end, prompt"):
        G.MarkerEncoder(tokenizer.encode, 0, 64, "mean")


def test_num_blocks_reads_the_raw_states_after_an_inner_block(tmp_path):
    model, params = load_gpt2(FIXTURE)
    tokens = None
    for trainable in (None, 1):  # the whole model, then a frozen trunk below block 0's top
        config = _config(tmp_path, "protonets", num_blocks=1, trainable_blocks=trainable)
        exp = build_experiment(config)
        # Block h_1 and ln_f are dropped: no weights, no factors.
        base = exp.params["model"]["base"]["params"]
        assert "h_1" not in base and "ln_f" not in base and "h_0" in base
        (inputs, positions), _ = jax.tree.map(
            lambda a: a[0], exp.setup.train_source.sample(0, 1).support
        )
        tokens = inputs if tokens is None else tokens  # without a trunk the inputs are tokens
        states = model.apply(params, tokens, blocks=1, method="trunk")
        want = jnp.take_along_axis(states, jnp.asarray(positions)[:, :, None], axis=1)
        got = exp.setup.embedding.apply_fn(exp.setup.embedding.params, (inputs, positions))
        np.testing.assert_allclose(got, want.reshape(len(tokens), -1), rtol=1e-4, atol=1e-4)
        # Not the final normed states.
        final = model.apply(params, tokens, method="features")
        assert np.abs(np.take_along_axis(final, positions[:, :, None], 1) - want).max() > 0.1


def test_centered_head_input_subtracts_the_meta_training_mean_and_normalizes(tmp_path):
    # pool=end: the states at [E1] of these toy sentences have read the same tokens.
    fields = dict(num_blocks=1, trainable_blocks=1, pool="end")
    raw = build_experiment(_config(tmp_path, "maml", **fields))
    exp = build_experiment(_config(tmp_path, "maml", head_input="centered", **fields))
    embed = lambda e, x: np.asarray(e.setup.embedding.apply_fn(e.setup.embedding.params, x))
    # The center: the raw features' mean over the sentences taken in turn from each relation.
    source = raw.setup.train_source  # tokens -> the model's inputs (the trunk's states)
    inputs, _ = source.fn((source.first_sentences(fewrel_family.CENTER_SENTENCES), None))
    center = embed(raw, inputs).reshape(-1, 2, 32).mean(0)
    task = jax.tree.map(lambda a: a[0], raw.setup.eval_source.sample(0, 1))
    x, _ = task.query
    shifted = embed(raw, x).reshape(-1, 2, 32) - center
    want = shifted / np.sqrt((shifted**2).mean(-1, keepdims=True))
    got = embed(exp, x)
    np.testing.assert_allclose(got, want.reshape(len(got), -1), rtol=1e-3, atol=1e-3)
    assert np.abs(got - embed(raw, x)).max() > 0.1
    # The head reads the same features.
    head = {"kernel": jax.random.normal(jax.random.key(1), (64, 2)), "bias": jnp.array([0.5, -1])}
    logits = exp.evaluator.predict_fn({**exp.params, "head": head}, x)
    np.testing.assert_allclose(logits, got @ head["kernel"] + head["bias"], rtol=1e-3, atol=1e-3)


def test_first_sentences_take_each_relation_in_turn_whatever_the_task_shape(tmp_path):
    train, val, test = toy_files(tmp_path)
    splits = F.protocol_splits("files", (train,), (val,), (test,))
    encoder = byte_encoder(40)
    rows = {}
    for shots, seed in ((1, 0), (2, 5)):
        source = F.FewRel(splits, ways=2, shots=shots, queries=1, seed=seed, tokenizer="byte")
        rows[shots] = G.FewRelTokens(source, encoder).first_sentences(5)
    np.testing.assert_array_equal(rows[1][0], rows[2][0])
    relations = list(F.resolve(splits)["train"].values())
    order = [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1)]
    for row, (r, i) in enumerate(order):
        ids, where = encoder.encode_one(relations[r][i])
        assert rows[1][0][row, : len(ids)].tolist() == ids and tuple(rows[1][1][row]) == where
    assert len(G.FewRelTokens(source, encoder).first_sentences(100)[0]) == 12  # all of them


def test_centered_head_input_needs_a_pretrained_model(tmp_path):
    config = _config(tmp_path, "maml", model="scratch", head_input="centered", lora_rank=8)
    with pytest.raises(ConfigError, match="task.head_input='centered': centering needs a pre"):
        fewrel_family.build(config)


def test_features_are_the_states_the_tied_head_reads():
    model, params = load_gpt2(FIXTURE)
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 320)
    mask = jnp.arange(12)[None, :] >= jnp.array([[0], [3]])  # the second row left-padded
    wte = params["params"]["wte"]["embedding"]
    for m in (None, mask):
        states = model.apply(params, tokens, m, method="features")
        logits = model.apply(params, tokens, m)
        assert states.shape == (2, 12, 32) and states.dtype == jnp.float32
        np.testing.assert_allclose(states @ wte.T, logits, rtol=1e-5, atol=1e-5)
    # They are LayerNorm outputs: mean 0 and variance 1 before ln_f's scale and bias.
    ln = params["params"]["ln_f"]
    normed = (states - ln["bias"]) / ln["scale"]
    np.testing.assert_allclose(normed.mean(-1), 0.0, atol=1e-4)
    np.testing.assert_allclose(normed.var(-1), 1.0, atol=1e-3)


def _byte_text(row):
    ids = row[row != BYTE_START].tolist()
    return " ".join(bytes(ids).decode().split())


def _fewrel_byte_text(row):
    markers = dict(zip(F._MARKER_IDS["byte"], F.MARKERS, strict=True))
    text = "".join(f" {markers[i]} " if i in markers else chr(i) for i in row if i != F.BYTE_PAD)
    return " ".join(text.split())


def test_tasks_are_fewrels_draws_in_gpt2_tokens_and_pure(tmp_path):
    splits = F.Splits(*((p,) for p in toy_files(tmp_path)))
    common = dict(ways=2, shots=1, queries=2, seed=3)
    ours = G.FewRelTokens(F.FewRel(splits, **common, tokenizer="byte"), byte_encoder(96))
    theirs = F.FewRel(splits, **common, tokenizer="byte", max_len=96).sample(5, 3)
    task = ours.sample(5, 3)
    for part, ref in ((task.support, theirs.support), (task.query, theirs.query)):
        (tokens, positions), labels = part
        np.testing.assert_array_equal(labels, ref[1])
        assert tokens.shape == (3, 2 * (1 if part is task.support else 2), 96)
        texts = [_byte_text(r) for r in tokens.reshape(-1, 96)]
        assert texts == [_fewrel_byte_text(r) for r in ref[0][0].reshape(-1, 96)]
        # Each position is the "]" of [E1] and [E2].
        flat_pos = positions.reshape(-1, 2)
        for row, (h, t) in zip(tokens.reshape(-1, 96), flat_pos, strict=True):
            assert bytes(row[h - 4 : h + 1].tolist()) == b" [E1]"
            assert bytes(row[t - 4 : t + 1].tolist()) == b" [E2]"
    later = ours.sample(5, 1, first_task=2)
    np.testing.assert_array_equal(task.query[0][0][2:], later.query[0][0])
    assert not np.array_equal(ours.sample(6, 3).query[0][0], task.query[0][0])


def _config(tmp_path, algo, **task):
    train, val, test = toy_files(tmp_path)
    fields = dict(
        protocol="files",
        train_files=(train,),
        val_files=(val,),
        test_files=(test,),
        ways=2,
        shots=1,
        queries=1,
        max_len=40,
        model=str(FIXTURE),
        lora_rank=2,
    )
    return Config(
        name="t",
        family="fewrel",
        task=fewrel_family.FewRelTask(**{**fields, **task}),
        algorithm=AlgorithmConfig(name=algo, **({"inner_lr": 0.1} if algo == "maml" else {})),
        train=TrainConfig(meta_batch=2),
    )


def _norm(tree):
    return float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(tree))))


@pytest.mark.parametrize("algo", ["protonets", "maml"])
def test_meta_gradients_are_finite_and_reach_the_factors(tmp_path, algo):
    exp = build_experiment(_config(tmp_path, algo))
    meta = exp.algo.init(exp.params)
    tasks = exp.setup.train_source.sample(0, 2)
    grads, metrics = jax.jit(exp.algo.meta_grad)(meta, tasks)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    assert math.isfinite(float(metrics["loss_after"]))
    # LoRA's b starts at zero, so the first gradient reaches b (and not a).
    factors = grads["model"]["lora"]
    b = [g for p, g in jax.tree_util.tree_leaves_with_path(factors) if p[-1].key == "b"]
    a = [g for p, g in jax.tree_util.tree_leaves_with_path(factors) if p[-1].key == "a"]
    assert len(b) == 8 and min(_norm(g) for g in b) > 1e-6 and _norm(a) == 0.0
    if algo == "maml":
        # The zero head predicts uniformly before adaptation.
        assert float(metrics["loss_before"]) == pytest.approx(math.log(2), abs=1e-6)
        assert _norm(grads["head"]) > 1e-6
        assert exp.setup.inner_mask["head"]["kernel"] is True
        assert exp.setup.inner_mask["model"]["base"]["params"]["wte"]["embedding"] is False
    else:
        assert set(grads) == {"model"} and exp.setup.inner_mask is None
    # freeze_base: the outer step leaves the GPT-2 weights exactly as they are.
    updates, _ = exp.optimizer.update(grads, exp.optimizer.init(meta), meta)
    assert _norm(updates["model"]["base"]) == 0.0 and _norm(updates["model"]["lora"]) > 0


@needs_data("fewrel")
def test_cli_tiny_trains_evaluates_and_predicts(tmp_path):
    workdir = tmp_path / "run"
    assert cli.main(["train", "fewrel:gpt2_tiny", "--workdir", str(workdir), "--no-progress"]) == 0
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["loss_before"] == pytest.approx(math.log(3), abs=1e-5)  # the zero head
    assert all(math.isfinite(r["loss_after"]) and r["grad_norm"] > 0 for r in rows)
    result = json.loads((workdir / "eval.json").read_text())
    assert result["adaptation_steps"] == [0, 1, 2] and result["num_tasks"] == 4
    assert all(0.0 <= a <= 1.0 for a in result["metrics"]["accuracy"]["mean"])
    model = predict.load(workdir)
    support = [
        sentence(["Paris", "is", "in", "France", "."], [0], [3]),
        sentence(["Ann", "wrote", "Emma", "."], [2], [0]),
        sentence(["Rex", "plays", "for", "Leeds", "."], [0], [3]),
    ]
    logits = model.adapt_and_predict(support, [0, 1, 2], support[:2])
    assert logits.shape == (2, 3) and np.isfinite(logits).all()
    with pytest.raises(ValueError, match="must lie in 0..2"):
        model.adapt(support, [0, 1, 3])


@needs_data("fewrel")
@pytest.mark.parametrize(
    "variant", ["maml", "protonets", "cosine", "proto_fomaml", "prompt_cosine", "prompt_maml"]
)
def test_cli_smollm2_tiny_variants_train_on_the_tiny_llama(tmp_path, variant):
    # The SmolLM2 configs' settings (frozen trunk, LoRA, end-marker or prompt pooling) on the
    # committed random tiny Llama GGUF.
    algo = variant.removeprefix("prompt_")
    workdir = tmp_path / variant
    argv = ["train", f"fewrel:smollm2_tiny_{variant}", "--workdir", str(workdir), "--no-progress"]
    assert cli.main(argv) == 0
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    if algo == "maml":  # the zero head: every class equally likely before the inner step
        assert rows[0]["loss_before"] == pytest.approx(math.log(3), abs=1e-5)
    result = json.loads((workdir / "eval.json").read_text())
    adapts = algo in ("maml", "proto_fomaml")
    assert result["adaptation_steps"] == ([0, 1, 2] if adapts else [0])
    config = json.loads((workdir / "config.json").read_text())
    assert config["task"]["trainable_blocks"] == 1
    prompt = variant.startswith("prompt_")
    assert config["task"]["pool"] == ("prompt" if prompt else "end")
    assert config["task"]["num_blocks"] == (1 if prompt else None)
    assert config["task"]["head_input"] == ("centered" if variant == "prompt_maml" else "raw")
    cosine = algo in ("cosine", "proto_fomaml")
    assert config["algorithm"]["distance"] == ("centered_cosine" if cosine else "squared_euclidean")
    if algo == "proto_fomaml":  # a user's sentences: the prototype head, then 2 steps
        support = [
            sentence(["Paris", "is", "in", "France", "."], [0], [3]),
            sentence(["Ann", "wrote", "Emma", "."], [2], [0]),
            sentence(["Rex", "plays", "for", "Leeds", "."], [0], [3]),
        ]
        model = predict.load(workdir)
        # One shot: each support sentence is its class's prototype, so it is classified as it.
        start = model.adapt_and_predict(support, [2, 0, 1], support, steps=0)
        assert start.argmax(-1).tolist() == [2, 0, 1]
        logits = model.adapt_and_predict(support, [2, 0, 1], support, steps=2)
        assert logits.shape == (3, 3) and np.isfinite(logits).all()


@needs_data("fewrel")
def test_proto_maml_starts_at_the_cosine_prototypes_and_adapts_factors_and_head():
    proto = build_experiment(load_config("fewrel:smollm2_tiny_proto_fomaml"))
    scale = proto.config.algorithm.cosine_scale
    cosine = build_experiment(
        load_config("fewrel:smollm2_tiny_cosine", [f"algorithm.cosine_scale={scale}"])
    )
    task = jax.tree.map(lambda a: a[0], proto.setup.eval_source.sample(0, 1))
    x, _ = task.query
    start = proto.algo.adapt(proto.params, task.support, steps=0)
    prototypes = cosine.algo.adapt(cosine.params, task.support)
    np.testing.assert_allclose(
        proto.evaluator.predict_fn(start, x),
        cosine.evaluator.predict_fn(prototypes, x),
        rtol=1e-4,
        atol=1e-4,
    )
    adapted = proto.algo.adapt(proto.params, task.support, steps=2)
    model, model0 = adapted["embedding"]["model"], proto.params["model"]
    assert _norm(jax.tree.map(jnp.subtract, model["base"], model0["base"])) == 0.0
    assert _norm(jax.tree.map(jnp.subtract, model["lora"], model0["lora"])) > 0
    assert _norm(jax.tree.map(jnp.subtract, adapted["head"], start["head"])) > 0


@needs_data("fewrel")
def test_cosine_variant_trains_and_predicts_by_centered_cosine():
    # Training (the algorithm's loss) and prediction (the evaluator) use the same distance.
    exp = build_experiment(load_config("fewrel:smollm2_tiny_cosine"))
    task = jax.tree.map(lambda a: a[0], exp.setup.eval_source.sample(0, 1))
    adapted = exp.algo.adapt(exp.params, task.support)
    x, labels = task.query
    features = exp.setup.embedding.apply_fn(exp.params, x)
    want = 10.0 * _centered_cosines(np.asarray(features), np.asarray(adapted.prototypes))
    logits = exp.evaluator.predict_fn(adapted, x)
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)
    log_p = want - np.log(np.exp(want).sum(axis=1, keepdims=True))
    tasks = jax.tree.map(lambda a: a[None], task)
    _, metrics = exp.algo.meta_grad(exp.params, tasks)
    want_loss = -log_p[np.arange(len(labels)), np.asarray(labels)].mean()
    assert float(metrics["loss_after"]) == pytest.approx(want_loss, rel=1e-4)


def _centered_cosines(queries, prototypes):
    center = prototypes.mean(axis=0)
    q, p = queries - center, prototypes - center
    return (q @ p.T) / np.outer(np.linalg.norm(q, axis=1), np.linalg.norm(p, axis=1))


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ({"max_len": 12}, "task.max_len=12: needs room for the start token and the 4 entity"),
        ({"max_len": 100}, "task.max_len=100 > the model's n_positions 64"),
        ({"ways": 4}, "ways=4 but the train split has 3 relations"),
        ({"shots": 3, "queries": 2}, "has 4 sentences; shots + queries = 5 are needed"),
        ({"pool": "mean"}, "task.pool='mean': choose one of start, end, prompt"),
        ({"adapt": "bias"}, "task.adapt='bias'"),
        ({"trainable_blocks": 3}, "task.trainable_blocks=3 must be in [1, 2]"),
        ({"num_blocks": 3}, "task.num_blocks=3 must be in [1, 2]"),
        ({"num_blocks": 0}, "task.num_blocks=0 must be >= 1"),
        ({"num_blocks": 1, "trainable_blocks": 2}, "task.trainable_blocks=2 must be in [1, 1]"),
        (
            {"pool": "prompt"},
            "task.max_len=40: needs room for the start token and the 4 entity markers, the prompt",
        ),
        ({"lora_rank": 0}, "task.lora_rank=0 must be"),
        ({"head_input": "mean"}, "task.head_input='mean': choose one of raw, centered"),
    ],
)
def test_bad_task_values_name_the_field(tmp_path, task, message):
    with pytest.raises(ConfigError) as err:
        fewrel_family.build(_config(tmp_path, "maml", **task))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_model_names_it(tmp_path, capsys):
    missing = tmp_path / "no_gpt2_here"
    with pytest.raises(ConfigError, match="not found"):
        fewrel_family.build(_config(tmp_path, "maml", model=str(missing)))
    # Through the CLI: exit code 2 and the folder in the message.
    code = cli.main(
        [
            "train",
            "fewrel:gpt2_tiny",
            "--workdir",
            str(tmp_path / "run"),
            "--no-progress",
            "--set",
            f"task.model={missing}",
            f"task.data_dir={tmp_path}",
            "task.protocol=files",
            "task.train_files=('train.json',)",
            "task.val_files=('val.json',)",
            "task.test_files=('test.json',)",
            "task.ways=2",
        ]
    )
    assert code == 2 and str(missing) in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_named_variants_point_at_models_gpt2():
    for v in ("5w1s_protonets", "5w1s_maml", "5w5s_protonets"):
        c = load_config(f"fewrel:gpt2_{v}")
        assert c.task.model == "models/gpt2" and c.algorithm.name == v.split("_")[1]
        assert (c.task.ways, c.task.shots) == (5, int(v[2]))
    assert load_config("fewrel:gpt2_tiny").train.steps <= 20
    with pytest.raises(Exception, match="variant"):
        load_config("fewrel:gpt2_5w5s_reptile")

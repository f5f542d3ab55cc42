"""FewRel relation classification: loading, markers, truncation, splits, episodes, the model."""

import dataclasses
import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import data_dir

import metajax as mj
from metajax.models.losses import classification_loss
from metajax.models.transformer import TransformerClassifier, TransformerConfig, TransformerEncoder
from metajax.tasks import fewrel as F

# Compile-bound on CPU: unoptimised XLA code compiles several times faster (as in
# tests/test_models_transformer.py), and one jitted apply beats op-by-op dispatch.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)
SHARED = data_dir("fewrel")
E1, E1_END, E2, E2_END = F._MARKER_IDS["byte"]


def sentence(words, head, tail):
    return {"tokens": list(words), "h": ["h", "Q1", [list(head)]], "t": ["t", "Q2", [list(tail)]]}


def write(path, data):
    path.write_text(json.dumps(data))
    return str(path)


def toy_files(tmp_path, rels=(("P1", "P2", "P3"), ("P4", "P5"), ("P6", "P7")), per=6):
    """Train / validation / test files; relation r's sentences say "<r> word<i> ..."; the
    test file alone has the word "zebra"."""
    paths = []
    for name, ids in zip(("train", "val", "test"), rels, strict=True):
        data = {}
        for r in ids:
            extra = ["zebra"] if name == "test" else []
            data[r] = [
                sentence([r, "the", f"w{i % 3}", "of", *extra, "x"], [0], [2]) for i in range(per)
            ]
        paths.append((write(tmp_path / f"{name}.json", data),))
    return F.Splits(*paths)


def test_markers_bytes_and_words():
    s = F.parse_sentence(sentence(["Alice", "met", "Bob", "."], [0], [2, 3]), "s")
    assert s == (("Alice", "met", "Bob", "."), (0, 1), (2, 4))
    tokens, pos = F.encode([s], "byte", 24)
    expect = [E1, *b"Alice", E1_END, *b" met ", E2, *b"Bob .", E2_END]
    np.testing.assert_array_equal(tokens[0, : len(expect)], expect)
    assert (tokens[0, len(expect) :] == F.BYTE_PAD).all() and pos.tolist() == [[0, 12]]
    vocab = {"met": 6, "bob": 7}
    tokens, pos = F.encode([s], "word", 8, vocab)
    assert tokens[0].tolist() == [2, F.WORD_UNK, 3, 6, 4, 7, F.WORD_UNK, 5] and pos.tolist() == [
        [0, 4]
    ]
    # Nested tail inside the head: the outer entity opens first and closes last.
    tokens, pos = F.encode([sentence(["a", "b", "c"], [0, 1, 2], [1])], "word", 8, {})
    assert tokens[0, :7].tolist() == [2, 1, 4, 1, 5, 1, 3] and pos.tolist() == [[0, 2]]


def test_truncation_keeps_both_entities():
    words = [f"w{i}" for i in range(40)]
    vocab = {w: 6 + i for i, w in enumerate(words)}
    # Entities fit: a contiguous window of 12 centred on the span w20..w22 (+4 markers).
    tokens, pos = F.encode([sentence(words, [20], [22])], "word", 12, vocab)
    assert tokens[0].tolist() == [
        6 + 17,
        6 + 18,
        6 + 19,
        2,
        6 + 20,
        3,
        6 + 21,
        4,
        6 + 22,
        5,
        6 + 23,
        6 + 24,
    ]
    assert pos.tolist() == [[3, 7]]
    # Entities far apart: both kept with their neighbours, the middle of the gap dropped.
    tokens, pos = F.encode([sentence(words, [2], [37])], "word", 10, vocab)
    assert tokens[0].tolist() == [2, 6 + 2, 3, 6 + 3, 6 + 4, 6 + 35, 6 + 36, 4, 6 + 37, 5]
    assert tokens[0, pos[0]].tolist() == [2, 4]
    # Near the start: the window cannot centre, so it takes more words to the right.
    tokens, _ = F.encode([sentence(words, [0], [1])], "word", 8, vocab)
    assert tokens[0].tolist() == [2, 6, 3, 4, 7, 5, 8, 9]


def test_sampling_deterministic_balanced_and_markers(tmp_path):
    splits = toy_files(tmp_path)
    src = F.FewRel(
        splits, split="train", ways=3, shots=2, queries=3, seed=1, max_len=16, tokenizer="byte"
    )
    task = src.sample(step=4, num_tasks=5)
    (xs, ps), ys = task.support
    (xq, pq), yq = task.query
    assert xs.shape == (5, 6, 16) and ps.shape == (5, 6, 2) and xq.shape == (5, 9, 16)
    assert xs.dtype == ps.dtype == ys.dtype == np.int32
    np.testing.assert_array_equal(np.sort(ys, axis=1), np.repeat([[0, 0, 1, 1, 2, 2]], 5, 0))
    np.testing.assert_array_equal(np.bincount(yq.ravel(), minlength=3), [15, 15, 15])
    for x, p in ((xs, ps), (xq, pq)):
        assert (np.take_along_axis(x, p[..., :1], -1) == E1).all()
        assert (np.take_along_axis(x, p[..., 1:], -1) == E2).all()
    # A label means one relation within a task, in support and query alike; byte 2 is the
    # relation's digit (the head entity is the word "P1", "P2" or "P3").
    digit = lambda x: x[..., 2]
    for t in range(5):
        for c in range(3):
            assert len(set(digit(xs[t][ys[t] == c]))) == 1
            assert set(digit(xq[t][yq[t] == c])) == set(digit(xs[t][ys[t] == c]))
    again = F.FewRel(
        splits, split="train", ways=3, shots=2, queries=3, seed=1, max_len=16, tokenizer="byte"
    ).sample(step=4, num_tasks=3, first_task=2)
    np.testing.assert_array_equal(again.support[0][0], xs[2:])
    np.testing.assert_array_equal(again.query[1], yq[2:])
    other = src.sample(step=5, num_tasks=5)
    assert not np.array_equal(other.support[0][0], xs) or not np.array_equal(other.query[1], yq)
    perms = {tuple(ys[t, ::2]) for t in range(5)} | {
        tuple(other.support[1][t, ::2]) for t in range(5)
    }
    assert len(perms) > 1  # labels are a fresh permutation per task


def test_word_vocab_comes_from_train_relations_only(tmp_path):
    splits = toy_files(tmp_path)
    vocab = F.build_vocab(splits, 100)
    # 6 sentences of each of 3 train relations: "of", "the", "x" are in all 18 of them.
    assert list(vocab)[:3] == ["of", "the", "x"] and "zebra" not in vocab
    assert "p4" not in vocab and "p6" not in vocab and set(vocab) >= {"p1", "w0", "w2"}
    assert sorted(vocab.values()) == list(range(6, 6 + len(vocab)))
    src = F.FewRel(
        splits,
        split="test",
        ways=2,
        shots=1,
        queries=1,
        max_len=12,
        tokenizer="word",
        vocab_size=100,
    )
    (x, p), _ = src.sample(0, 1).support
    # [E1] p6/p7 [/E1] the [E2] w<i> [/E2] of zebra x: relation names and "zebra" are UNK.
    np.testing.assert_array_equal(x[0, :, :5], [[2, F.WORD_UNK, 3, vocab["the"], 4]] * 2)
    assert set(x[0, :, 5]) <= {vocab["w0"], vocab["w1"], vocab["w2"]}
    np.testing.assert_array_equal(x[0, :, 7:10], [[vocab["of"], F.WORD_UNK, vocab["x"]]] * 2)
    assert src.num_tokens == 6 + len(vocab)
    assert F.build_vocab(splits, 2) == {"of": 6, "the": 7}


def test_bad_files_and_settings(tmp_path):
    bad = write(tmp_path / "list.json", [1, 2])
    with pytest.raises(F.FewRelError, match="list.json: not FewRel format"):
        F.load_file(bad)
    bad = write(tmp_path / "keys.json", {"P1": [{"tokens": ["a"], "h": ["a", "q", [[0]]]}]})
    with pytest.raises(F.FewRelError, match=r"keys.json: relation 'P1' sentence 0: expected.*t"):
        F.load_file(bad)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(F.FewRelError, match="broken.json: cannot read"):
        F.load_file(str(tmp_path / "broken.json"))
    data = {"P1": [sentence(["a", "b"], [0], [1]), sentence(["a", "b"], [0], [2])]}
    with pytest.raises(
        F.FewRelError,
        match=r"span.json: relation 'P1' sentence 1: t span \[2\]"
        r" lies outside the sentence's 2 tokens",
    ):
        F.load_file(write(tmp_path / "span.json", data))
    splits = toy_files(tmp_path, per=3)
    with pytest.raises(
        F.FewRelError,
        match=r"relation 'P1' \(train\) has 3 sentences; shots "
        r"\+ queries = 4",
    ):
        F.FewRel(splits, ways=2, shots=1, queries=3).sample(0, 1)
    with pytest.raises(F.FewRelError, match="ways=3 but the validation split has 2 relations"):
        F.FewRel(splits, split="validation", ways=3, queries=2).check()
    clash = F.Splits(splits.train_files, splits.train_files, splits.test_files)
    with pytest.raises(
        F.FewRelError,
        match=r"\['P1', 'P2', 'P3'\] are in both the train and "
        "the validation split",
    ):
        F.resolve(clash)
    with pytest.raises(F.FewRelError, match="tokenizer='bpe'"):
        F.FewRel(splits, tokenizer="bpe")
    with pytest.raises(F.FewRelError, match="max_len=3"):
        F.FewRel(splits, max_len=3)


def test_in_domain_and_cross_domain_splits_on_toy_files(tmp_path):
    rels = {f"R{i:02d}": [sentence(["a", "b"], [0], [1])] * 2 for i in range(10)}
    path = write(tmp_path / "one.json", rels)
    s = F.protocol_splits("in_domain", (path,), num_val=2, num_test=3)
    assert s.test_relations == ("R00", "R03", "R06") and s.val_relations == ("R01", "R05")
    assert s.train_relations == ("R02", "R04", "R07", "R08", "R09")
    news = write(tmp_path / "news.json", {"R03": rels["R03"], "N1": rels["R00"]})
    s = F.protocol_splits("cross_domain", (path,), (path,), (news,), num_val=3)
    assert s.val_relations == ("R00", "R04", "R07") and "R03" not in s.train_relations
    assert len(s.train_relations) == 6 and F.resolve(s)["test"].keys() == {"R03", "N1"}
    with pytest.raises(F.FewRelError, match="num_val=12"):
        F.protocol_splits("in_domain", (path,), num_val=12)


def test_relative_names_are_looked_up_in_the_variable_folder_only(tmp_path, monkeypatch):
    monkeypatch.delenv("METAJAX_FEWREL_DIR", raising=False)
    with pytest.raises(F.FewRelError, match=r"val_semeval.json: set task.data_dir or \$METAJAX_"):
        F.protocol_splits("cross_domain")
    rels = {f"R{i:02d}": [sentence(["a", "b"], [0], [1])] * 2 for i in range(10)}
    write(tmp_path / "one.json", rels)
    monkeypatch.setenv("METAJAX_FEWREL_DIR", str(tmp_path))
    s = F.protocol_splits("in_domain", ("one.json",), num_val=2, num_test=3)
    assert s.train_files == (str(tmp_path / "one.json"),) and len(s.train_relations) == 5
    with pytest.raises(F.FewRelError, match=re.escape(f"looked up in {tmp_path}: set")):
        F.load_file(str(tmp_path / "two.json"))


def test_shared_protocols():
    if not (SHARED / F.WIKI).is_file():
        pytest.skip(f"FewRel files not in {SHARED}")
    cross = F.resolve(F.protocol_splits("cross_domain", data_dir=SHARED))
    assert [len(cross[s]) for s in ("train", "validation", "test")] == [20, 5, 25]
    assert list(cross["validation"]) == [
        "Cause-Effect(e1,e2)",
        "Content-Container(e2,e1)",
        "Instrument-Agency(e2,e1)",
        "P155",
        "P364",
    ]
    assert not {"P25", "P40", "P921"} & cross["train"].keys()  # in val_nyt.json: test only
    s = F.protocol_splits("in_domain", data_dir=SHARED)
    assert s.test_relations == ("P155", "P2094", "P361", "P410", "P463")
    assert s.val_relations == ("P177", "P25", "P364", "P412", "P59")
    assert len(F.protocol_splits("in_domain", data_dir=SHARED, num_val=0).train_relations) == 11


TINY = TransformerConfig(
    vocab_size=F.BYTE_VOCAB_SIZE, width=16, depth=1, heads=2, mlp_width=32, max_len=16
)


def test_entity_pooled_classifier():
    model = TransformerClassifier(TINY, num_classes=3, pad_id=F.BYTE_PAD, pool="entity")
    tokens = np.random.default_rng(0).integers(0, 256, (4, 16)).astype(np.int32)
    pos = np.array([[0, 5], [1, 2], [3, 9], [0, 15]], np.int32)
    params = jit(model.init)(jax.random.key(0), tokens, pos)
    apply = jit(model.apply)
    assert params["params"]["head"]["kernel"].shape == (32, 3)
    logits = apply(params, tokens, pos)
    assert logits.shape == (4, 3) and logits.dtype == jnp.float32
    moved = pos.copy()
    moved[0] = [4, 5]
    changed = apply(params, tokens, moved)
    assert float(jnp.abs(changed[0] - logits[0]).max()) > 1e-6
    np.testing.assert_allclose(changed[1:], logits[1:], rtol=1e-6, atol=1e-7)
    # The encoder is the classifier minus its head: same features feed the head.
    encoder = TransformerEncoder(TINY, pad_id=F.BYTE_PAD, pool="entity")
    trunk = {"params": {k: v for k, v in params["params"].items() if k != "head"}}
    feats = jit(encoder.apply)(trunk, tokens, pos)
    head = params["params"]["head"]
    np.testing.assert_allclose(feats @ head["kernel"] + head["bias"], logits, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="pool='entity' needs entity_positions"):
        apply(params, tokens)
    with pytest.raises(ValueError, match=r"entity_positions must be int \(4, 2\)"):
        apply(params, tokens, pos[:, :1])


@pytest.mark.parametrize("algo", ["maml", "protonets"])
def test_meta_steps_on_sampled_tasks_give_finite_gradients(tmp_path, algo):
    src = F.FewRel(toy_files(tmp_path), ways=3, shots=1, queries=2, max_len=16, tokenizer="byte")
    tasks = src.sample(0, 2)
    if algo == "maml":
        model = TransformerClassifier(TINY, num_classes=3, pad_id=F.BYTE_PAD, pool="entity")
        apply = lambda p, x: model.apply(p, *x)
        learner = mj.maml(classification_loss(apply), inner_steps=1, inner_lr=0.1)
    else:
        model = TransformerEncoder(TINY, pad_id=F.BYTE_PAD, pool="entity")
        learner = mj.protonets(lambda p, x: model.apply(p, *x), ways=3)
    params = jit(model.init)(jax.random.key(0), *jax.tree.map(lambda a: a[0], tasks.support[0]))
    grads, metrics = jit(learner.meta_grad)(learner.init(params), tasks)
    flat = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])
    assert np.isfinite(flat).all() and np.abs(flat).max() > 0
    assert np.isfinite(float(metrics["loss_after"]))


def test_family_builds_from_files_and_names_bad_settings(tmp_path):
    fam = pytest.importorskip("metajax.run.families.fewrel")
    from metajax.run.config import Config, ConfigError

    s = toy_files(tmp_path)
    task = fam.FewRelTask(
        protocol="files",
        train_files=s.train_files,
        val_files=s.val_files,
        test_files=s.test_files,
        ways=2,
        queries=2,
        max_len=12,
        width=8,
        depth=1,
        heads=2,
        mlp_width=8,
    )
    setup = fam.build(Config(name="t", family="fewrel", task=task))
    assert setup.train_source.relations() == ("P1", "P2", "P3")
    assert setup.eval_source.relations() == ("P6", "P7")
    assert setup.params["params"]["head"]["kernel"].shape == (16, 2)
    assert setup.embedding.params["params"].keys() == {"trunk"} and setup.embedding.ways == 2
    batch_fn = setup.evaluator.batch_fn
    (tokens, pos), labels = batch_fn([sentence(["p1", "of", "x"], [0], [2])], [1])
    assert tokens.shape == (1, 12) and pos.tolist() == [[0, 4]] and labels.tolist() == [1]
    with pytest.raises(ValueError, match=r"labels must lie in 0..1, got \[0, 2\]"):
        batch_fn([sentence(["a"], [0], [0])] * 2, [0, 2])
    bad = {"ways": 4, "tokenizer": "bpe", "eval_split": "train", "protocol": "web"}
    messages = {
        "ways": "ways=4 but the train split has 3 relations",
        "tokenizer": "'bpe'",
        "eval_split": "task.eval_split='train'",
        "protocol": "task.protocol='web'",
    }
    for key, value in bad.items():
        cfg = Config(name="t", family="fewrel", task=dataclasses.replace(task, **{key: value}))
        with pytest.raises(ConfigError, match=messages[key]):
            fam.build(cfg)


def test_word_vocab_does_not_depend_on_the_test_files(tmp_path):
    # Cross-domain: the train file's relation P2 also occurs in one test file; the vocabulary
    # (of the train file minus validation) is the same whichever test file is evaluated.
    train = write(
        tmp_path / "tr.json",
        {
            r: [sentence([r, "alpha", "x"], [0], [2])] * 8
            for r in ("P1", "P2", "P3", "P8", "P9", "P10")
        },
    )
    test_a = write(tmp_path / "a.json", {"P2": [sentence(["P2", "beta", "x"], [0], [2])] * 8})
    test_b = write(tmp_path / "b.json", {"P7": [sentence(["P7", "gamma", "x"], [0], [2])] * 8})
    vocabs = [
        F.build_vocab(F.protocol_splits("cross_domain", (train,), (train,), (t,), num_val=1), 50)
        for t in (test_a, test_b)
    ]
    assert vocabs[0] == vocabs[1] and "p2" in vocabs[0] and "beta" not in vocabs[0]
    # In-domain: held-out relations of the same file never reach the vocabulary.
    splits = F.protocol_splits("in_domain", (train,), num_val=1, num_test=2)
    vocab = F.build_vocab(splits, 50)
    held_out = {r.lower() for r in splits.val_relations + splits.test_relations}
    assert held_out and not held_out & set(vocab)

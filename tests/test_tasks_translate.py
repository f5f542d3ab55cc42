"""Few-shot translation from CLDR names: pairs, split, encoding, sampling, decoding, metrics."""

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("babel")
pytest.importorskip("sacrebleu")

import metajax  # noqa: E402
from metajax.models import TransformerConfig, TransformerLM, next_token_loss  # noqa: E402
from metajax.models.decoding import (  # noqa: E402
    IncrementalDecoder,
    bytes_to_strings,
    greedy_decode,
    greedy_decode_cached,
    lm_decoder,
)
from metajax.models.metrics import chrf, exact_match, text_scores  # noqa: E402
from metajax.tasks import translate as T  # noqa: E402


def test_known_pairs_and_dropped_identical_names():
    from babel import Locale

    pairs = T.load_pairs("fi")
    assert Locale("fi").territories["DE"] == "Saksa" and ("Germany", "Saksa") in pairs
    assert ("German", "saksa") in pairs  # languages follow territories
    # Finnish calls Albania "Albania": that pair carries nothing to learn and is dropped.
    assert Locale("fi").territories["AL"] == "Albania"
    assert all(src != tgt for src, tgt in pairs) and "Albania" not in dict(pairs)
    sources = [s for s, _ in pairs]
    assert len(sources) == len(set(sources))  # one target per English source
    assert pairs == T.load_pairs("fi")  # deterministic order
    # The rule, recomputed from the installed CLDR release (pyproject accepts any babel >=
    # 2.14, whose counts differ): every English territory name with a Finnish name of its own.
    english, finnish = Locale("en").territories, Locale("fi").territories
    own = {english[c] for c in english if finnish.get(c) and finnish[c] != english[c]}
    territories = T.load_pairs("fi", ("territories",))
    assert {s for s, _ in territories} == own and len(territories) == len(own) > 150
    assert T.load_pairs("fi", ("currencies",))[0] == ("Andorran Peseta", "Andorran peseta")
    with pytest.raises(ValueError, match="kinds"):
        T.load_pairs("fi", ("countries",))
    with pytest.raises(ValueError, match="lang='xx'"):
        T.load_pairs("xx")


def test_groups_hold_out_families_and_follow_their_script_rules():
    # The rules, not one CLDR release's lists: pyproject accepts any babel >= 2.14.
    groups = T.language_groups()
    train = set(groups["train"])
    heldout = {g: set(groups[g]) for g in T.HELDOUT_FAMILIES}
    unused = set(T.unused_heldout_languages())
    usable = set(T._usable_languages())
    # A partition of the usable languages (a family, MIN_PAIRS pairs, names of their own).
    parts = [train, unused, *heldout.values()]
    assert set().union(*parts) == usable and sum(map(len, parts)) == len(usable)
    assert all(len(T.load_pairs(x, T.KINDS)) >= T.MIN_PAIRS for x in usable)
    # Held out by family: no training language belongs to a held-out family, and each group
    # is made of its own families' languages only.
    train_families = {T.family(x) for x in train}
    for name, fams in T.HELDOUT_FAMILIES.items():
        assert not set(fams) & train_families
        assert {T.family(x) for x in heldout[name]} <= set(fams)
        assert {x for x in usable if T.family(x) in fams} <= heldout[name] | unused
    # Scripts: new_script and validation share none with training; latin is Latin alone.
    train_scripts = {c for x in train for c in T.scripts(x)}
    assert "LATIN" in train_scripts
    for x in heldout["new_script"] | heldout["validation"]:
        assert not set(T.scripts(x)) & train_scripts, x
    assert all(T.scripts(x) == ("LATIN",) for x in heldout["latin"])
    # Every group language has enough names for K = 32 tasks to vary; unused ones broke a rule.
    for x in set().union(*heldout.values()):
        assert len(T.load_pairs(x, T.KINDS)) >= T.MIN_HELDOUT_PAIRS
        assert sum(T.fits(p, 64) for p in T.load_pairs(x)) >= 4 * (32 + 16), x
    for x in unused:
        group = next(g for g, fams in T.HELDOUT_FAMILIES.items() if T.family(x) in fams)
        script_ok = (
            T.scripts(x) == ("LATIN",)
            if group == "latin"
            else not set(T.scripts(x)) & train_scripts
        )
        assert not script_ok or len(T.load_pairs(x, T.KINDS)) < T.MIN_HELDOUT_PAIRS, x
    # The Latin group spans several families, none with a majority of its languages.
    latin_families = collections.Counter(T.family(x) for x in heldout["latin"])
    assert len(latin_families) >= 6 and max(latin_families.values()) < len(heldout["latin"]) / 2
    # Languages whose family, script and size no CLDR release will move.
    assert {"ko", "th", "ta", "kn"} <= heldout["new_script"]
    assert {"el", "ka", "hy"} <= heldout["validation"]
    assert {"vi", "tr", "fi", "hu", "id", "sw", "zu", "yo", "eu"} <= heldout["latin"]
    assert {"de", "fr", "ru", "zh", "ar", "hi", "ja"} <= train and len(train) > 100
    assert {"km", "kk", "ug"} <= unused  # held-out families in a script of their own
    assert "no" not in train and "nb" in train  # "no" duplicates "nb"
    assert not set(T.EXTRA_FAMILIES) & set(T.lang_lib.FAMILIES)
    # language_split names one test group "test".
    for group in T.TEST_GROUPS:
        split = T.language_split(group)
        assert split["test"] == groups[group] and split["train"] == groups["train"]
    with pytest.raises(ValueError, match="test_group='cyrillic'"):
        T.language_split("cyrillic")
    with pytest.raises(ValueError, match="choose one of new_script, latin"):
        T.Translate("test", test_group="cyrillic")


def test_test_groups_draw_the_same_numbers_from_their_own_languages():
    kw = dict(shots=4, queries=3, seed=1, max_len=48)
    latin = T.Translate("test", test_group="latin", **kw)
    new_script = T.Translate("test", **kw)
    assert new_script.test_group == "new_script"
    assert set(latin.sample_languages(0, 20)) <= set(T.language_groups()["latin"])
    assert set(new_script.sample_languages(0, 20)) <= set(T.language_groups()["new_script"])
    # Validation ignores the group.
    val = [T.Translate("validation", test_group=g, **kw).sample(0, 3) for g in T.TEST_GROUPS]
    np.testing.assert_array_equal(val[0].query[0], val[1].query[0])


def test_encoding_masks_exactly_target_bytes_and_end():
    tokens, mask = T.encode_pairs([("Germany", "Saksa"), ("Sweden", "Ruotsi")], max_len=16)
    expected = [T.BOS, *b"Germany", T.SEP, *b"Saksa", T.END, T.PAD]
    np.testing.assert_array_equal(tokens[0], expected)
    np.testing.assert_array_equal(np.flatnonzero(mask[0]), np.arange(9, 15))  # S..a, END
    assert mask.sum() == (5 + 1) + (6 + 1)
    # Multi-byte UTF-8: every byte of the target is a target.
    tokens, mask = T.encode_pairs([("Japan", "日本")], max_len=16)
    assert mask.sum() == 6 + 1 and tokens[0, 7 + 6] == T.END
    prompts, lengths, refs = T.split_sequences(tokens)
    assert refs == ["日本"] and lengths.tolist() == [7]
    np.testing.assert_array_equal(prompts[0, :8], [T.BOS, *b"Japan", T.SEP, T.PAD])
    with pytest.raises(ValueError, match="max_len=8"):
        T.encode_pairs([("Germany", "Saksa")], max_len=8)
    assert not T.fits(("Germany", "Saksa"), 14) and T.fits(("Germany", "Saksa"), 15)


def test_sampling_is_deterministic_and_varies():
    src = T.Translate("test", shots=4, queries=3, seed=1, max_len=48)
    a, b = src.sample(5, 4), src.sample(5, 4)
    assert a.support[0].shape == (4, 4, 48) and a.query[1].shape == (4, 3, 48)
    np.testing.assert_array_equal(a.support[0], b.support[0])
    np.testing.assert_array_equal(a.query[0][2:], src.sample(5, 2, first_task=2).query[0])
    assert not np.array_equal(a.support[0], src.sample(6, 4).support[0])
    for t in range(4):  # support and query pairs of a task are distinct
        rows = np.concatenate([a.support[0][t], a.query[0][t]])
        assert len({r.tobytes() for r in rows}) == 7
    langs = src.sample_languages(5, 4)
    assert set(langs) <= set(T.language_split()["test"])
    # The mask of a sampled sequence covers its target and END, as encode_pairs makes it.
    _, _, refs = T.split_sequences(a.support[0][0])
    assert a.support[1][0].sum() == sum(len(r.encode()) + 1 for r in refs)
    with pytest.raises(ValueError, match="shots=0"):
        T.Translate("train", shots=0)


def _table_apply(primary, fallback):
    """A known LM: the next token after ``t`` is ``primary[t]`` (logit 10), else ``fallback[t]``
    (logit 5); ``params`` scales the logits so jit sees a real argument."""

    def apply_fn(params, tokens):
        v = T.VOCAB_SIZE
        return params * (
            10.0 * jax.nn.one_hot(primary[tokens], v) + 5.0 * jax.nn.one_hot(fallback[tokens], v)
        )

    return apply_fn


def test_greedy_decoding_on_known_logits():
    primary = np.full(T.VOCAB_SIZE, ord("x"), np.int32)
    fallback = np.full(T.VOCAB_SIZE, ord("x"), np.int32)
    primary[T.SEP], primary[ord("h")], primary[ord("i")] = ord("h"), ord("i"), T.END
    primary[ord("a")] = 0xC3  # after "a" (prompt 2): "ä" as two bytes, then END
    primary[0xC3], primary[0xA4] = 0xA4, T.END
    primary[ord("q")], fallback[ord("q")] = T.BOS, 0xFF  # BOS banned: invalid byte instead
    apply_fn = _table_apply(jnp.asarray(primary), jnp.asarray(fallback))
    prompts, lengths = T.encode_prompts(["ok", "a", "q"], max_len=12)
    prompts[1:, 2], lengths[1:] = T.PAD, 2  # prompts 2 and 3 are BOS "a" and BOS "q"
    run = functools.partial(T.greedy_translate, apply_fn, steps=5)
    out = run(jnp.float32(1.0), prompts, lengths)
    np.testing.assert_array_equal(
        out,
        [
            [ord("h"), ord("i"), T.END, T.PAD, T.PAD],
            [0xC3, 0xA4, T.END, T.PAD, T.PAD],
            [0xFF, ord("x"), ord("x"), ord("x"), ord("x")],
        ],
    )
    assert T.to_strings(out) == ["hi", "ä", "\ufffdxxxx"]
    with jax.disable_jit():
        eager = run(jnp.float32(1.0), prompts, lengths)
    np.testing.assert_array_equal(jax.jit(run)(jnp.float32(1.0), prompts, lengths), eager)
    # A full buffer stops a row: "BOS ok SEP" (4) leaves 8 slots of 12, "BOS q" (2) 10.
    long = greedy_decode(apply_fn, 1.0, prompts, lengths, steps=10, end_id=-1, pad_id=T.PAD)
    assert (long[0] != T.PAD).sum() == 8 and (long[2] != T.PAD).sum() == 10
    assert long[2, 0] == T.BOS  # nothing banned here
    # The loop stops once every row has ended: "hi END" and "ä END" take 3 forward passes.
    calls = []

    def counting_apply(params, tokens):
        jax.debug.callback(lambda: calls.append(1))
        return apply_fn(params, tokens)

    ended = jax.jit(functools.partial(T.greedy_translate, counting_apply, steps=40))(
        jnp.float32(1.0), prompts[:2], lengths[:2]
    )
    jax.effects_barrier()
    assert len(calls) == 3 and (np.asarray(ended)[:, 3:] == T.PAD).all()
    assert bytes_to_strings(np.array([[104, 105, 7, 106]]), end_id=7) == ["hi"]


def test_cached_decoding_gives_the_same_tokens_as_full_passes():
    # Logits that depend on the last token only are their own incremental decoder.
    primary = np.full(T.VOCAB_SIZE, ord("x"), np.int32)
    primary[T.SEP], primary[ord("h")], primary[ord("i")] = ord("h"), ord("i"), T.END
    apply_fn = _table_apply(jnp.asarray(primary), jnp.asarray(primary))
    table = IncrementalDecoder(
        lambda n, width: (), lambda p, token, t, cache: (apply_fn(p, token[:, None])[:, 0], ())
    )
    prompts, lengths = T.encode_prompts(["ok", "a", "quite long"], max_len=14)
    prompts[1, 2], lengths[1] = ord("h"), 3  # BOS "a" "h": generates "i" END at once
    for steps in (1, 3, 12):
        full = T.greedy_translate(apply_fn, jnp.float32(1.0), prompts, lengths, steps)
        cached = T.greedy_translate(table, jnp.float32(1.0), prompts, lengths, steps)
        np.testing.assert_array_equal(cached, full)
    assert T.to_strings(full) == ["hi", "i", "hi"]
    # A random Transformer, sharp enough that its argmax changes from token to token; rows
    # of three prompt lengths, one of them filling its buffer before `steps` tokens.
    cfg = TransformerConfig(
        vocab_size=T.VOCAB_SIZE, width=16, depth=2, heads=2, mlp_width=32, max_len=14
    )
    model = TransformerLM(cfg)
    params = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 14), jnp.int32))
    params = jax.tree.map(lambda x: 20.0 * x, params)
    kw = dict(steps=12, end_id=T.END, pad_id=T.PAD, banned_ids=(T.PAD,))
    full = jax.jit(functools.partial(greedy_decode, model.apply, **kw))(params, prompts, lengths)
    decoder = lm_decoder(model)
    cached = jax.jit(functools.partial(greedy_decode_cached, decoder, **kw))(
        params, prompts, lengths
    )
    np.testing.assert_array_equal(cached, full)
    assert len(set(np.asarray(full)[0].tolist())) > 3  # not one token repeated
    assert (np.asarray(full)[2] != T.PAD).sum() == 14 - 12  # "BOS quite long SEP" is 12


def test_chrf_exact_match_and_translation_scores():
    family = pytest.importorskip("metajax.run.families.translate")
    assert chrf(["Saksa", "Ruotsi"], ["Saksa", "Ruotsi"]) == pytest.approx(100.0)
    assert chrf(["abcd"], ["wxyz"]) < 1.0
    assert exact_match(["a", "b", "c", "d"], ["a", "x", "c", "y"]) == 0.5
    with pytest.raises(ValueError, match="references"):
        chrf(["a"], [])
    # A model that always answers "hi": exact on the "hi" query, chrF strictly between.
    primary = np.full(T.VOCAB_SIZE, ord("x"), np.int32)
    primary[T.SEP], primary[ord("h")], primary[ord("i")] = ord("h"), ord("i"), T.END
    apply_fn = _table_apply(jnp.asarray(primary), jnp.asarray(primary))
    batch = T.encode_pairs([("a", "hi"), ("b", "ho")], max_len=8)
    predict = lambda params, inputs: T.greedy_translate(apply_fn, params, *inputs, steps=4)
    split = lambda query: T.split_sequences(query[0])
    scores = family.translation_scores(predict, split, T.to_strings)(jnp.float32(1.0), batch)
    assert scores["exact_match"] == 0.5
    assert scores["chrf"] == chrf(["hi", "hi"], ["hi", "ho"]) and 0.0 < scores["chrf"] < 100.0


def test_maml_meta_grad_on_sampled_tasks_is_finite():
    # Two explicit languages: no need to load every locale for the default split here.
    src = T.Translate("train", 2, 2, seed=0, max_len=40, languages=(("fi", "sw"), (), ()))
    cfg = TransformerConfig(
        vocab_size=T.VOCAB_SIZE, width=16, depth=1, heads=2, mlp_width=32, max_len=40
    )
    model = TransformerLM(cfg)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 40), jnp.int32))
    algo = metajax.maml(next_token_loss(model.apply), inner_steps=1, inner_lr=0.1)
    opt = optax.adam(1e-2)
    state = opt.init(params)
    step_fn = jax.jit(algo.meta_grad)
    losses = []
    for step in range(2):
        grads, metrics = step_fn(params, jax.tree.map(jnp.asarray, src.sample(step, 2)))
        leaves = jax.tree.leaves(grads)
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
        assert float(optax.tree.norm(grads)) > 0.0
        updates, state = opt.update(grads, state)
        params = optax.apply_updates(params, updates)
        losses.append(float(metrics["loss_after"]))
    assert np.all(np.isfinite(losses)) and losses[0] == pytest.approx(np.log(T.VOCAB_SIZE), 0.1)


def test_family_module_builds_and_translates_user_data():
    family = pytest.importorskip("metajax.run.families.translate")
    from metajax.run.config import Config, ConfigError

    task = family.TaskConfig(
        shots=2, queries=2, max_len=32, width=16, depth=1, heads=2, mlp_width=32, decode_len=6
    )
    setup = family.build(Config(name="t", family="translate", task=task))
    evaluator = setup.evaluator
    tokens, mask = evaluator.batch_fn([("Germany", "Saksa"), ("Sweden", "Ruotsi")], None)
    assert tokens.shape == (2, 32) and float(mask.sum()) == 6 + 7
    loss = float(jax.jit(setup.loss_fn)(setup.params, (tokens, mask)))
    assert loss == pytest.approx(np.log(T.VOCAB_SIZE), rel=0.05)
    # Bits per byte: the same 13 targets' information over the 11 bytes (END is no byte).
    bits = setup.metric_fn(setup.params, (tokens, mask))["bits_per_byte"]
    assert float(bits) == pytest.approx(loss * 13 / (np.log(2) * 11), rel=1e-5)
    prompts, lengths = evaluator.inputs_fn(["France", "Japan"])
    assert lengths.tolist() == [8, 7]
    out = jax.jit(evaluator.predict_fn)(setup.params, (prompts, lengths))
    assert out.shape == (2, 6) and not np.isin(np.asarray(out), [T.BOS, T.SEP]).any()
    # predict_fn is greedy decoding of this model: its first token is the argmax at SEP.
    logits = jax.jit(TransformerLM(family.transformer_config(task)).apply)(setup.params, prompts)
    at_sep = np.asarray(logits)[np.arange(2), np.asarray(lengths) - 1]
    at_sep[:, [T.PAD, T.BOS, T.SEP]] = -np.inf
    np.testing.assert_array_equal(np.asarray(out)[:, 0], at_sep.argmax(-1))
    assert evaluator.outputs_fn(out) == T.to_strings(out) and len(evaluator.outputs_fn(out)) == 2
    # The host scores: chrF and exact match of the greedy translations of the sources.
    support_prompts, support_lengths, references = T.split_sequences(tokens)
    translated = evaluator.predict_fn(setup.params, (support_prompts, support_lengths))
    expected = text_scores(T.to_strings(translated), references)
    assert evaluator.score_fn(setup.params, (tokens, mask)) == expected
    assert setup.eval_source.split == "test" and setup.train_source.shots == 2
    with pytest.raises(ConfigError, match="task.decode_len=30"):
        family.build(
            Config(name="t", family="translate", task=dataclasses.replace(task, decode_len=30))
        )
    with pytest.raises(ConfigError, match="task.kinds"):
        family.check(dataclasses.replace(task, kinds=("countries",)))


def test_family_evaluates_either_test_group():
    family = pytest.importorskip("metajax.run.families.translate")
    from metajax.run import families
    from metajax.run.config import Config, ConfigError
    from metajax.run.evaluate import eval_config

    task = family.TaskConfig(shots=2, queries=2, max_len=32, width=16, depth=1, decode_len=6)
    trained = Config(name="t", family="translate", task=task)
    assert family.build(trained).eval_source.test_group == "new_script"
    # `metajax eval --set task.test_group=latin` on a trained run: the same model, the
    # Latin-script test languages.
    latin = eval_config(trained, ["task.test_group=latin"], families.load("translate").eval_keys)
    source = family.build(latin).eval_source
    assert source.split == "test" and set(source.split_languages()) == set(
        T.language_groups()["latin"]
    )
    with pytest.raises(ConfigError, match="task.test_group='cyrillic': choose new_script or latin"):
        family.check(dataclasses.replace(task, test_group="cyrillic"))


def test_latin_train_script_meta_trains_on_latin_script_languages_only():
    latin = T.Translate("train", shots=4, queries=3, seed=1, max_len=48, train_script="latin")
    every = T.Translate("train", shots=4, queries=3, seed=1, max_len=48)
    groups = T.language_groups()
    drawn = set(latin.split_languages())
    assert drawn == {x for x in groups["train"] if T.scripts(x) == ("LATIN",)}
    assert 0 < len(drawn) < len(every.split_languages())
    assert {"fr", "de", "sq"} <= drawn and not {"ru", "ja", "bn"} & drawn
    assert set(latin.sample_languages(0, 30)) <= drawn
    # Only the train split changes: validation and test draw the same tasks either way.
    for split in ("validation", "test"):
        a, b = (
            T.Translate(split, 4, 3, seed=1, max_len=48, train_script=s) for s in T.TRAIN_SCRIPTS
        )
        np.testing.assert_array_equal(a.sample(0, 3).query[0], b.sample(0, 3).query[0])
    with pytest.raises(ValueError, match="train_script='cyrillic': choose one of any, latin"):
        T.Translate("train", train_script="cyrillic")


def test_family_passes_the_train_script_to_the_train_source_only():
    family = pytest.importorskip("metajax.run.families.translate")
    from metajax.configs import translate as configs
    from metajax.run.config import ConfigError

    config = configs.get_config("smollm2_latin_8_fomaml")
    assert config.task.train_script == "latin" and config.name == "translate_smollm2_latin_8_fomaml"
    # The same settings as the variant meta-trained on every training language.
    every = configs.get_config("smollm2_8_fomaml")
    assert dataclasses.replace(config.task, train_script="any") == every.task
    assert config.algorithm == every.algorithm and config.train == every.train
    task = family.TaskConfig(shots=2, queries=2, max_len=32, decode_len=6, train_script="latin")
    train, test = family._sources(task, seed=0)
    assert train.train_script == "latin" and test.train_script == "any"
    with pytest.raises(ConfigError, match="task.train_script='greek': choose any or latin"):
        family.check(dataclasses.replace(task, train_script="greek"))

"""experiments/translate_baselines.py: copying and in-context learning on the held-out
translation tasks, and the shared-prefix decoding it runs on (metajax.models.prefix_decoding)."""

import dataclasses
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("babel")
pytest.importorskip("sacrebleu")

from metajax.models.decoding import (  # noqa: E402
    greedy_decode,
    greedy_decode_cached,
    lm_decoder,
)
from metajax.models.llama import LlamaLM  # noqa: E402
from metajax.models.metrics import chrf  # noqa: E402
from metajax.models.prefix_decoding import prefix_cache, shared_prefix_decoder  # noqa: E402
from metajax.models.pretrained import load_pretrained, load_tokenizer  # noqa: E402
from metajax.tasks import translate  # noqa: E402

HERE = Path(__file__).resolve().parent
LLAMA = HERE / "fixtures" / "llama_tiny" / "llama"
QWEN2 = HERE / "fixtures" / "llama_tiny" / "qwen2"


def _script():
    path = HERE.parent / "experiments" / "translate_baselines.py"
    spec = importlib.util.spec_from_file_location("translate_baselines", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


B = _script()


def _fixture(path, positions=1024):
    # The fixtures allow 64 positions; RoPE has no table, so a longer limit is only a check.
    model, params = load_pretrained(path)
    return LlamaLM(dataclasses.replace(model.config, max_position_embeddings=positions)), params


def test_copying_scores_as_sacrebleu():
    from sacrebleu.metrics import CHRF

    hyps, refs = ["Uganda", "Germany", "Norway"], ["Uganda", "Saksa", "Norja"]
    expected = CHRF().corpus_score(hyps, [refs]).score
    got = B.text_scores(hyps, refs)  # what the script scores each method with
    assert got["chrf"] == pytest.approx(expected, abs=1e-9) and 0 < got["chrf"] < 100
    assert got["exact_match"] == pytest.approx(1 / 3)
    assert B.text_scores(["Kenya"], ["Kenya"])["chrf"] == pytest.approx(100.0)


def test_copy_rows_are_the_runners_tasks():
    result = B.baselines("latin", 8, ["copy"], num_tasks=3, progress=False)
    source, _ = B.eval_source("latin", 8)
    assert source.test_group == "latin" and source.shots == 8 and source.queries == 16
    for i in range(3):  # task i of meta-batch 0, however the runner chunks it
        pairs = B.task_pairs(source.sample(0, 1, i).query[0][0])
        sources, refs = zip(*pairs)
        assert len(pairs) == 16 and all(s.isprintable() and r for s, r in pairs)
        assert result["per_task"]["copy/chrf"][i] == chrf(list(sources), list(refs))
        assert result["per_task"]["language"][i] == source.sample_languages(0, 1, i)[0]
    per_task = np.asarray(result["per_task"]["copy/chrf"])
    assert result["methods"]["copy"]["chrf"]["mean"] == pytest.approx(per_task.mean())
    assert result["methods"]["copy"]["chrf"]["ci95"] == pytest.approx(
        1.96 * per_task.std(ddof=1) / np.sqrt(3)
    )
    lang = result["per_task"]["language"][0]
    assert set(result["examples"][lang][0]) == {"source", "reference", "copy"}
    assert B.table_rows(result, "m")[0].startswith("| latin | 8 | copy the English name | 3 | ")


def test_icl_prompt_format():
    support = [("Germany", "Allemagne"), ("Sweden", "Suède")]
    prompt = B.icl_prompt(support, "French", "Japan")
    assert prompt == (
        "English: Germany\nFrench: Allemagne\nEnglish: Sweden\nFrench: Suède\n"
        "English: Japan\nFrench:"
    )
    assert B.language_name("vi") == "Vietnamese" and B.language_name("kn") == "Kannada"
    # Encoded line by line, the ids are those of the whole prompt after the start token.
    tokenizer = load_tokenizer(LLAMA)
    translator = B.IclTranslator(*_fixture(LLAMA), tokenizer, max_new_tokens=4)
    prefix, suffixes = translator.token_ids(support, "French", ["Japan", "Chad"])
    assert translator.start_id == tokenizer.token_id("<|endoftext|>")
    assert prefix + suffixes[0] == [translator.start_id, *tokenizer.encode(prompt)]
    assert tokenizer.decode(prefix[1:] + suffixes[1]).endswith("English: Chad\nFrench:")


def test_line_end_logits_stop_at_any_stop_token():
    logits = jnp.array([[0.0, 5.0, 1.0, 3.0], [4.0, 2.0, 1.0, 3.0], [0.0, 1.0, 2.0, 3.0]])
    out = B.line_end_logits(logits, jnp.array([1, 3]), newline=3)
    # Row 0's best is stop token 1: it becomes the newline, with its logit.
    assert out.argmax(-1).tolist() == [3, 0, 3] and float(out[0, 3]) == 5.0
    assert float(out[0, 1]) == -np.inf and float(out[1, 0]) == 4.0


@pytest.mark.parametrize("path", [LLAMA, QWEN2], ids=["llama", "qwen2"])
def test_shared_prefix_logits_equal_the_whole_rows(path):
    model, params = _fixture(path)
    rng = np.random.default_rng(0)
    prefix = rng.integers(3, model.config.vocab_size, 13)
    padded = np.concatenate([prefix, np.zeros(19, np.int64)])  # padding after the prefix
    cache = prefix_cache(model, params, padded, len(prefix))
    decoder = shared_prefix_decoder(model, cache)
    step = jax.jit(decoder.step)
    suffixes = rng.integers(3, model.config.vocab_size, (2, 4))
    state = decoder.init_cache(2, 6)
    whole = model.apply(params, jnp.asarray(np.concatenate([np.tile(prefix, (2, 1)), suffixes], 1)))
    for t in range(4):
        logits, state = step(params, jnp.asarray(suffixes[:, t]), t, state)
        np.testing.assert_allclose(logits, whole[:, len(prefix) + t], atol=1e-4, rtol=1e-4)
    with pytest.raises(TypeError, match="needs a LlamaLM"):
        prefix_cache(object(), params, padded, 13)


def test_icl_on_two_tasks_equals_one_by_one_decoding():
    model, params = _fixture(LLAMA)
    tokenizer = load_tokenizer(LLAMA)
    translator = B.IclTranslator(model, params, tokenizer, max_new_tokens=6)
    source = translate.Translate("test", shots=2, queries=3, test_group="latin", seed=0)
    tasks, langs = source.sample(0, 2), source.sample_languages(0, 2)
    prompt_tokens, texts = 0, []

    def line_ends(p, tokens):  # the whole model, the translator's stop rule on every position
        logits = model.apply(p, tokens)
        flat = logits.reshape(-1, logits.shape[-1])
        stops = B.line_end_logits(flat, translator.stop_ids, translator.newline)
        return stops.reshape(logits.shape)

    for j, lang in enumerate(langs):
        support = B.task_pairs(tasks.support[0][j])
        sources = [s for s, _ in B.task_pairs(tasks.query[0][j])]
        language = B.language_name(lang)
        batched = translator.translate(support, language, sources)
        assert len(batched) == 3 and all(isinstance(t, str) for t in batched)
        # One query at a time, the whole prompt through the model for every token.
        prefix, suffixes = translator.token_ids(support, language, sources)
        prompt_tokens += len(prefix) + sum(map(len, suffixes))
        texts += batched
        for text, suffix in zip(batched, suffixes):
            ids = np.asarray([prefix + suffix + [0] * 6], np.int32)
            kw = dict(steps=6, end_id=translator.newline, pad_id=translator.newline)
            out = greedy_decode(line_ends, params, ids, np.asarray([ids.shape[1] - 6]), **kw)
            row = np.asarray(out)[0].tolist()
            row = row[: row.index(translator.newline)] if translator.newline in row else row
            assert text == tokenizer.decode(row).strip()
    stats = translator.stats
    assert stats["prompt_tokens"] == prompt_tokens and stats["seconds"] > 0
    assert 6 <= stats["generated_tokens"] <= 6 * 6 and any(texts)  # random weights: text


def test_batched_decoding_equals_each_prompt_alone():
    # The same prompts, batched (shared prefix, suffixes of different lengths) and one by one
    # through LlamaLM's own cached decoding: identical tokens.
    model, params = _fixture(LLAMA)
    rng = np.random.default_rng(1)
    prefix = rng.integers(3, 320, 21).tolist()
    suffixes = [rng.integers(3, 320, n).tolist() for n in (1, 4, 2)]
    rows = np.zeros((3, 12), np.int32)
    for i, s in enumerate(suffixes):
        rows[i, : len(s)] = s
    lengths = np.array([len(s) for s in suffixes], np.int32)
    padded = np.asarray(prefix + [0] * 11, np.int32)
    decoder = shared_prefix_decoder(model, prefix_cache(model, params, padded, len(prefix)))
    kw = dict(steps=7, end_id=-1, pad_id=0)
    batched = greedy_decode_cached(decoder, params, rows, lengths, **kw)
    for i, s in enumerate(suffixes):
        alone = np.zeros((1, len(prefix) + 12), np.int32)
        alone[0, : len(prefix) + len(s)] = prefix + s
        one = greedy_decode_cached(
            lm_decoder(model), params, alone, np.array([len(prefix) + len(s)]), **kw
        )
        np.testing.assert_array_equal(np.asarray(batched)[i], np.asarray(one)[0])
    assert len(set(np.asarray(batched).ravel().tolist())) > 3  # not one token repeated

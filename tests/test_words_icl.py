"""experiments/words_icl.py: in-context learning and 0-shot bits per byte of new languages'
words with a pretrained LM, on the committed tiny Llama, against a direct computation."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("wordfreq", reason="the words tasks draw from wordfreq's word lists")

from metajax.models.pretrained import load_pretrained, load_tokenizer  # noqa: E402
from metajax.run.config_files import load_config  # noqa: E402
from metajax.run.families import words_lm  # noqa: E402

HERE = Path(__file__).resolve().parent
LLAMA_GGUF = HERE / "fixtures" / "llama_tiny" / "llama.q8_0.gguf"
CONFIG = "words_lm:smollm2_tiny"  # the tiny Llama, K = 2 support and 2 query words


def _script():
    path = HERE.parent / "experiments" / "words_icl.py"
    spec = importlib.util.spec_from_file_location("words_icl", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


W = _script()


@pytest.fixture(autouse=True)
def trunk_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METAJAX_TRUNK_CACHE", str(tmp_path / "trunk"))


def _line_bits(model, params, tokenizer, prompt_words, word):
    """Bits of ``word`` and its newline after ``prompt_words``, one per line, from one
    forward pass of the whole prompt as the tokenizer encodes it in one piece."""
    start = tokenizer.token_id("<|endoftext|>")
    ids = [start] + tokenizer.encode("".join(w + "\n" for w in [*prompt_words, word]))
    line = tokenizer.encode(word + "\n")
    assert ids[-len(line) :] == line  # no BPE merge across the line break
    logits = np.asarray(model.apply(params, np.asarray([ids[:-1]], np.int32))[0], np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    picked = logp[np.arange(len(ids) - 1), ids[1:]]
    return -picked[-len(line) :].sum() / math.log(2.0)


def test_bits_per_byte_of_both_methods_match_a_direct_computation(tmp_path):
    out = tmp_path / "icl.json"
    W.main(["--config", CONFIG, "--tasks", "2", "--out", str(out), "--no-progress"])
    result = json.loads(out.read_text())
    assert result["num_tasks"] == 2 and result["model"].endswith("llama.q8_0.gguf")
    for method in ("icl", "zero_shot"):
        bpb = result["methods"][method]["bits_per_byte"]
        assert math.isfinite(bpb["mean"]) and math.isfinite(bpb["ci95"]), method
        assert len(result["per_task"][method]) == 2
    # The runner's tasks: its evaluated source holds the same words in the model's tokens.
    config = load_config(CONFIG)
    tasks = list(W.eval_tasks(config, 2))
    source = words_lm.build(config).eval_source
    runner = source.sample(0, 2, 0)
    tokenizer = load_tokenizer(LLAMA_GGUF)
    for j, (language, support, queries) in enumerate(tasks):
        assert language == source.sample_languages(0, 2, 0)[j] == result["per_task"]["language"][j]
        for ((tokens, _), mask), texts in ((runner.support, support), (runner.query, queries)):
            for row, m, word in zip(tokens[j], mask[j], texts, strict=True):
                assert tokenizer.decode(row[1 : int(m.sum())]) == word  # start word end
    # Task 0's scores from one forward pass of each whole prompt.
    model, params = load_pretrained(LLAMA_GGUF)
    language, support, queries = tasks[0]
    num_bytes = sum(len(q.encode("utf-8")) for q in queries)
    for method, prompt in (("icl", support), ("zero_shot", [])):
        bits = [_line_bits(model, params, tokenizer, prompt, q) for q in queries]
        got = result["per_task"][method][0]
        assert got == pytest.approx(sum(bits) / num_bytes, rel=1e-4), method
    # The support words change the scores: they are in the prompt.
    assert result["per_task"]["icl"][0] != pytest.approx(result["per_task"]["zero_shot"][0])


def test_each_query_is_scored_on_its_own_line_after_the_support():
    scorer = W.load_scorer(load_config(CONFIG), str(LLAMA_GGUF))
    tokens, targets = scorer.rows(["kala", "talo"], ["äiti", "ab"])
    assert tokens.shape == targets.shape and tokens.shape[1] % W.WIDTH_BUCKET == 0
    prefix = [scorer.start_id] + scorer.line_ids("kala") + scorer.line_ids("talo")
    for row, target, word in zip(tokens, targets, ["äiti", "ab"], strict=True):
        line = scorer.line_ids(word)
        assert list(row[: len(prefix) + len(line)]) == prefix + line
        assert np.flatnonzero(target).tolist() == list(range(len(prefix), len(prefix) + len(line)))
    bits, num_bytes = scorer.score(["kala", "talo"], ["äiti", "ab"])
    assert num_bytes.tolist() == [5, 2] and np.isfinite(bits).all() and (bits > 0).all()
    # Batched and padded rows score as a row alone.
    alone, _ = scorer.score(["kala", "talo"], ["ab"])
    np.testing.assert_allclose(alone[0], bits[1], rtol=1e-5)
    with pytest.raises(ValueError, match="prompt exceeds the model's 64 positions"):
        scorer.rows(["kala"] * 20, ["ab"])


def test_a_config_of_another_family_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        W.main(["--config", "words_langid:tiny", "--out", str(tmp_path / "x.json")])
    assert exit_info.value.code == 2
    assert "a words_langid config, not words_lm" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        W.main(["--config", "words_lm:tiny", "--out", str(tmp_path / "x.json")])
    assert "give --model" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()

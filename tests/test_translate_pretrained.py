"""``translate`` with a pretrained model (``task.model``), on the committed tiny GPT-2: the pair
encoding, greedy translation with and without a frozen trunk, and the CLI from training to
``predict``."""

import dataclasses
import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest

from metajax.models.decoding import greedy_decode
from metajax.models.gpt2_checkpoint import load_gpt2_tokenizer
from metajax.run import cli, predict
from metajax.run.build import build
from metajax.run.config_files import load_config
from metajax.run.predict import FewShotModel
from metajax.run.pretrained_choice import Pretrained
from metajax.tasks.text_encoding import PairEncoder, TranslateTokens
from metajax.tasks.translate import Translate

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "gpt2_tiny"
SUPPORT = [("Germany", "Saksa"), ("France", "Ranska")]


@pytest.fixture(autouse=True)
def trunk_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METAJAX_TRUNK_CACHE", str(tmp_path / "trunk"))


def test_pairs_are_prompt_then_target_and_split_back():
    tok = load_gpt2_tokenizer(FIXTURE)
    enc = PairEncoder(tok.encode, tok.decode, 0, 0, 40)
    tokens, mask = enc.pairs(SUPPORT)
    prompt = [0, *tok.encode("English: Germany\nTranslation:")]
    target = tok.encode(" Saksa")
    n = len(prompt) + len(target) + 1
    assert tokens[0, :n].tolist() == [*prompt, *target, 0] and (tokens[0, n:] == 0).all()
    # The mask is on the target and the end token only.
    assert mask[0].tolist() == [0.0] * len(prompt) + [1.0] * (len(target) + 1) + [0.0] * (40 - n)
    prompts, lengths, refs = enc.split(tokens, mask)
    assert refs == ["Saksa", "Ranska"] and lengths[0] == len(prompt)
    np.testing.assert_array_equal(prompts, enc.prompts(["Germany", "France"])[0])
    assert enc.strings([[*tok.encode(" Suomi"), 0, 5, 6]]) == ["Suomi"]
    with pytest.raises(ValueError, match="> max_len=40"):
        enc.pairs([("x" * 30, "y" * 30)])
    other = PairEncoder(tok.encode, tok.decode, 0, 0, 40, prompt="{} =")
    assert other.pairs(SUPPORT)[0][0, : len(tok.encode("Germany =")) + 1].tolist() == [
        0,
        *tok.encode("Germany ="),
    ]
    with pytest.raises(ValueError, match="one {} for the source"):
        PairEncoder(tok.encode, tok.decode, 0, 0, 40, prompt="English:")


def test_translations_with_a_frozen_trunk_are_the_whole_models():
    outputs = []
    for blocks in ("none", "1"):
        exp = build(load_config("translate:gpt2_tiny", [f"task.trainable_blocks={blocks}"]))
        model = FewShotModel(exp, exp.algo.init(exp.params), 0)
        # Unadapted (b = 0) both are the pretrained GPT-2: the same greedy tokens, the first
        # computed through the whole model, the second through the trunk then the top.
        outputs.append(model.adapt_and_predict(SUPPORT, None, ["Japan", "Finland"], steps=0))
    assert outputs[0] == outputs[1] and all(isinstance(s, str) for s in outputs[0])
    # What the fixture's random weights say (byte tokens that are no UTF-8 alone, then text).
    assert outputs[0] == ["\ufffd" * 8, "2ZZZZZZZ"]


def test_cli_trains_scores_and_predicts_with_a_frozen_trunk(tmp_path):
    workdir = tmp_path / "tr"
    args = ["train", "translate:gpt2_tiny", "--workdir", str(workdir), "--no-progress"]
    assert cli.main([*args, "--set", "task.trainable_blocks=1"]) == 0
    metrics = json.loads((workdir / "eval.json").read_text())["metrics"]
    assert set(metrics) == {"loss", "bits_per_token", "accuracy", "chrf", "exact_match"}
    assert all(0.0 <= c <= 100.0 for c in metrics["chrf"]["mean"])
    loss = metrics["loss"]["mean"]
    assert all(math.isfinite(x) for x in loss) and loss[2] < loss[0]  # adaptation fits
    model = predict.load(workdir)
    out = model.adapt_and_predict(SUPPORT, None, ["Japan"])
    assert len(out) == 1 and isinstance(out[0], str)


def test_cli_smollm2_tiny_trains_the_top_block_on_latin_script_languages(tmp_path):
    # The SmolLM2 variants' settings (frozen trunk, LoRA, the Latin-script test group) on the
    # committed random tiny Llama.
    workdir = tmp_path / "sm"
    args = ["train", "translate:smollm2_tiny", "--workdir", str(workdir), "--no-progress"]
    assert cli.main(args) == 0
    config = json.loads((workdir / "config.json").read_text())
    assert config["task"]["trainable_blocks"] == 1 and config["task"]["test_group"] == "latin"
    assert config["task"]["model"].endswith("llama.q8_0.gguf")
    metrics = json.loads((workdir / "eval.json").read_text())["metrics"]
    loss = metrics["loss"]["mean"]
    assert all(math.isfinite(x) for x in loss) and loss[2] < loss[0]  # adaptation fits
    assert all(0.0 <= c <= 100.0 for c in metrics["chrf"]["mean"])


@pytest.mark.parametrize("blocks", [None, 1])
def test_llama_decodes_with_its_cache_as_with_full_passes(blocks):
    # Perturbed factors (b != 0): the adapted top differs from the pretrained model. The
    # cached decoder, on the trunk's and the top's weights joined in one tree, must give the
    # tokens of full passes of the trunk then the top, one per generated token.
    task = load_config("translate:smollm2_tiny", []).task
    pre = Pretrained(dataclasses.replace(task, trainable_blocks=blocks), 0, task.max_len)
    leaves, treedef = jax.tree.flatten(pre.meta_params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    meta = treedef.unflatten(
        [x + 0.5 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    )
    enc = PairEncoder(pre.encode_ids, pre.tokenizer.decode, pre.start_id, pre.end_id, 40)
    prompts, lengths = enc.prompts(["Japan", "Finland", "Germany", "Peru"])
    kwargs = dict(steps=12, end_id=pre.end_id, pad_id=pre.end_id, banned_ids=(pre.start_id,))
    decode, params_of = pre.decoder()
    cached = np.asarray(decode(params_of(meta), prompts, lengths, **kwargs))
    top = pre.lora.merge(meta)
    if pre.trunk is None:
        apply_fn = pre.model.apply
    else:  # as the loss reads it: the trunk's own weights, then the adapted top's
        model, start = pre.model, pre.start
        hidden = lambda t: model.apply(pre.trunk_params, t, blocks=start, method="trunk")
        apply_fn = lambda top, t: model.apply(top, hidden(t), start=start, method="top")
    full = greedy_decode(apply_fn, top, prompts, lengths, **kwargs)
    np.testing.assert_array_equal(cached, np.asarray(full))
    assert len({tuple(row) for row in cached}) > 1  # real outputs, not all padding


def test_token_tasks_as_text_are_the_sampled_tasks():
    tok = load_gpt2_tokenizer(FIXTURE)
    enc = PairEncoder(tok.encode, tok.decode, 0, 0, 40)  # drops the longer pairs
    source = TranslateTokens(Translate("test", shots=3, queries=4, test_group="latin"), enc)
    tasks, texts = source.sample(2, 5, 7), source.sample_pairs(2, 5, 7)
    assert [lang for lang, _, _ in texts] == source.sample_languages(2, 5, 7)
    for j, (_, support, query) in enumerate(texts):
        assert len(support) == 3 and len(query) == 4 and all(enc.fits(p) for p in support)
        np.testing.assert_array_equal(enc.pairs(support)[0], tasks.support[0][j])
        np.testing.assert_array_equal(enc.pairs(query)[0], tasks.query[0][j])

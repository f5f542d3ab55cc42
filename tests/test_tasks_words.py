"""Few-shot language tasks from wordfreq: tokens, splits, LM and language-ID episodes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("wordfreq")

from metajax.models.losses import bits_per_byte_metric, next_token_loss  # noqa: E402
from metajax.tasks import languages as lang_lib  # noqa: E402
from metajax.tasks import words as W  # noqa: E402

# Small word lists load in ~30 ms each; the defaults (all 42 languages) take seconds.
# The test languages share no word (three scripts), so a word tells its language.
LANGS = (("fil", "sk", "sl", "ro", "is", "sv"), ("lt", "lv"), ("da", "el", "ko"))


def leaves_equal(a, b):
    return all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_encode_decode_and_mask():
    assert (W.PAD, W.BOS, W.EOS, W.VOCAB_SIZE) == (256, 257, 258, 259)
    tokens = W.encode(["ab", "żó", ""], max_len=8)
    np.testing.assert_array_equal(tokens[0], [257, 97, 98, 258, 256, 256, 256, 256])
    assert list(tokens[1, 1:5]) == list("żó".encode()) and tokens[1, 5] == W.EOS
    assert W.decode(tokens) == ["ab", "żó", ""]
    mask = W.target_mask(tokens)
    np.testing.assert_array_equal(mask[0], [0, 1, 1, 1, 0, 0, 0, 0])  # bytes and EOS are targets
    with pytest.raises(ValueError, match="max_len"):
        W.encode(["abcdefg"], max_len=8)


def test_default_split_holds_out_families():
    available = W.available_languages()
    assert len(available) >= 40 and set(available) <= set(lang_lib.FAMILIES)
    split = lang_lib.default_split(available)
    assert split["test"] == ("ar", "fi", "he", "hu", "ko", "lt", "lv", "ta")
    assert split["validation"] == ("el", "fa", "fil", "id", "ms", "tr")
    assert sorted(sum(split.values(), ())) == sorted(available)
    families = {s: {lang_lib.FAMILIES[x] for x in langs} for s, langs in split.items()}
    assert not families["train"] & families["validation"]
    assert not families["train"] & families["test"]
    assert not families["validation"] & families["test"]
    with pytest.raises(ValueError, match="more than one"):
        W.LanguageID(languages=(("da",), ("da",), ("sk",))).language_split()
    with pytest.raises(ValueError, match="not available"):
        W.LanguageID(languages=(("xx",), (), ())).language_split()


def test_word_filter():
    words = W.load_words("ko", 3000, 16)
    assert not any(w.isascii() for w in words)  # English leaking into the Korean list is dropped
    assert all(len(w) + 2 <= 16 for w in words)
    assert all(not any(chr(c).isdigit() for c in w) for w in W.load_words("da", 3000, 32))


@pytest.mark.parametrize("per", [1, 3])
def test_language_modeling_episode(per):
    src = W.LanguageModeling(
        split="train", shots=6, queries=5, languages=LANGS, max_len=24, words_per_sequence=per
    )
    task = src.sample(step=2, num_tasks=4)
    (ts, ms), (tq, mq) = task.support, task.query
    assert ts.shape == ms.shape == (4, 6, 24) and tq.shape == mq.shape == (4, 5, 24)
    assert ts.dtype == np.int32 and ms.dtype == np.float32
    assert (ts[..., 0] == W.BOS).all() and (ts.max() < W.VOCAB_SIZE) and (ts.min() >= 0)
    # Mask counts each sequence's bytes plus its EOS.
    np.testing.assert_array_equal(ms.sum(-1), (ts < 256).sum(-1) + 1)
    langs = src.sample_languages(2, 4)
    assert set(langs) <= set(LANGS[0]) and len(set(langs)) > 1
    for t, lang in enumerate(langs):
        vocab = {w.decode() for w in W.load_words(lang, src.num_words, src.max_len)}
        s_words = [w for seq in W.decode(ts[t]) for w in seq.split(" ")]
        q_words = [w for seq in W.decode(tq[t]) for w in seq.split(" ")]
        assert set(s_words + q_words) <= vocab
        assert not set(s_words) & set(q_words)
        if per == 3:
            assert max(len(seq.split(" ")) for seq in W.decode(ts[t])) > 1


def test_language_id_episode():
    src = W.LanguageID(split="test", ways=3, shots=2, queries=4, languages=LANGS, max_len=24)
    task = src.sample(step=0, num_tasks=16)
    (xs, ys), (xq, yq) = task.support, task.query
    assert xs.shape == (16, 6, 24) and xq.shape == (16, 12, 24) and ys.shape == (16, 6)
    assert ys.dtype == yq.dtype == np.int32
    assert len({tuple(r) for r in ys}) > 2  # labels are shuffled per task
    lang_of = {w.decode(): lang for lang in LANGS[2] for w in W.load_words(lang, 5000, 24)}
    for t in range(16):
        assert sorted(ys[t]) == [0, 0, 1, 1, 2, 2]
        seen = {}
        for x, y in zip([*xs[t], *xq[t]], [*ys[t], *yq[t]], strict=True):
            seen.setdefault(int(y), set()).add(lang_of[W.decode(x[None])[0]])
        assert all(len(v) == 1 for v in seen.values()) and len(set.union(*seen.values())) == 3
    with pytest.raises(ValueError, match="4-way needs 4 languages"):
        W.LanguageID(split="test", ways=4, languages=LANGS).sample(0, 1)


@pytest.mark.parametrize("cls", [W.LanguageModeling, W.LanguageID])
def test_determinism_and_first_task_split(cls):
    src = cls(languages=LANGS, max_len=24)
    whole = src.sample(7, 8)
    assert leaves_equal(whole, cls(languages=LANGS, max_len=24).sample(7, 8))
    assert not leaves_equal(whole, cls(languages=LANGS, max_len=24, seed=1).sample(7, 8))
    lo, hi = src.sample(7, 4), src.sample(7, 4, first_task=4)
    joined = jax.tree.map(lambda a, b: np.concatenate([a, b]), lo, hi)
    assert leaves_equal(whole, joined)


def test_losses_and_bits_per_byte_of_byte_tokens():
    tokens = jnp.asarray(W.encode(["abc", "d"], max_len=6))
    batch = (tokens, jnp.asarray(W.target_mask(np.asarray(tokens))))
    # A "model" whose parameters are the logits of every position.
    table = lambda logits, inputs: logits[:, : inputs.shape[1]]
    loss, bpb = next_token_loss(table), bits_per_byte_metric(table)
    uniform = jnp.zeros((2, 6, W.VOCAB_SIZE))
    assert jnp.allclose(loss(uniform, batch), math.log(W.VOCAB_SIZE))
    # 6 targets (4 + 2 with EOS) over 4 bytes.
    expected = 6 * math.log2(W.VOCAB_SIZE) / 4
    assert jnp.allclose(bpb(uniform, batch)["bits_per_byte"], expected, rtol=1e-6)
    # Logits that put all mass on the next token: zero loss (so the shift is the right one).
    perfect = jax.nn.one_hot(jnp.roll(tokens, -1, axis=1), W.VOCAB_SIZE) * 50.0
    assert loss(perfect, batch) < 1e-6
    assert bpb(jax.nn.one_hot(tokens, W.VOCAB_SIZE) * 50.0, batch)["bits_per_byte"] > 10

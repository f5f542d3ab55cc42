"""Which pair prompt suits a pretrained translator, judged before any training.

Pairs of the Latin-script meta-training languages (scripts of their names: Latin alone;
``--pairs`` per language, drawn with seed 0) are encoded with each prompt (``{}`` is the
English name), and the pretrained model, nothing trained, gives two numbers per prompt: the
bits per target token (the target and the end token given the prompt: what meta-training
starts from) and the chrF of its greedy continuation, read up to the end token or the end
of the line. Copying the English name is the reference line. Only meta-training languages
are read, so the choice is made without the held-out groups::

    .venv/bin/python experiments/translate_format_probe.py

Prints one line per prompt and writes experiments/results/translate_format_probe.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import jax
import numpy as np

from metajax.models.losses import next_token_loss
from metajax.models.metrics import text_scores
from metajax.run.config_files import load_config
from metajax.run.pretrained_choice import Pretrained
from metajax.tasks import translate
from metajax.tasks.text_encoding import PAIR_PROMPT, PairEncoder

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = ("{} =", " {} =", "{}:", PAIR_PROMPT)


def latin_pairs(per_language: int) -> list[tuple[str, str]]:
    """``per_language`` pairs of every meta-training language written in Latin alone."""
    rng, pairs = np.random.default_rng(0), []
    for lang in translate.language_groups()["train"]:
        if translate.scripts(lang) == ("LATIN",):
            table = translate.load_pairs(lang)
            pairs += [table[i] for i in rng.choice(len(table), per_language, replace=False)]
    return pairs


def score(pre: Pretrained, prompt: str, pairs, max_len: int, batch: int = 64) -> dict:
    enc = PairEncoder(
        pre.encode_ids, pre.tokenizer.decode, pre.start_id, pre.end_id, max_len, prompt
    )
    pairs = [p for p in pairs if enc.fits(p)]
    decode, params_of = pre.decoder()
    params = params_of(pre.meta_params)
    loss = jax.jit(next_token_loss(pre.model.apply))
    greedy = jax.jit(
        lambda p, x, n: decode(p, x, n, steps=16, end_id=pre.end_id, pad_id=pre.end_id)
    )
    nats = tokens = 0.0
    outputs = []
    for i in range(0, len(pairs), batch):
        x, mask = enc.pairs(pairs[i : i + batch])
        nats += float(loss(params, (x, mask))) * mask[:, 1:].sum()
        tokens += mask[:, 1:].sum()
        prompts, lengths = enc.prompts([s for s, _ in pairs[i : i + batch]])
        texts = enc.strings(np.asarray(greedy(params, prompts, lengths)))
        outputs += [t.split("\n")[0].strip() for t in texts]
    scores = text_scores(outputs, [t for _, t in pairs])
    return dict(
        prompt=prompt,
        pairs=len(pairs),
        bits_per_token=nats / tokens / np.log(2),
        chrf=scores["chrf"],
        examples=[[s, t, o] for (s, t), o in zip(pairs[:8], outputs)],
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="translate:smollm2_8_fomaml")
    parser.add_argument("--pairs", type=int, default=6, help="pairs per language")
    parser.add_argument("--max-len", type=int, default=32)
    args = parser.parse_args()
    task = load_config(args.config, []).task
    pre = Pretrained(dataclasses.replace(task, trainable_blocks=None), 0, args.max_len)
    pairs = latin_pairs(args.pairs)
    copy = text_scores([s for s, _ in pairs], [t for _, t in pairs])["chrf"]
    print(f"{len(pairs)} pairs; copying the English name: chrF {copy:.2f}")
    rows = []
    for prompt in PROMPTS:
        rows.append(score(pre, prompt, pairs, args.max_len))
        r = rows[-1]
        print(f"{prompt!r}: {r['bits_per_token']:.3f} bits per token, chrF {r['chrf']:.2f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "translate_format_probe.json"
    out.write_text(json.dumps(dict(config=args.config, copy_chrf=copy, rows=rows), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

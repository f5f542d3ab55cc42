"""Translated examples for each held-out language: what "a new language from K examples" gives.

For every test language: K support pairs drawn once (seeded) from its CLDR names, then the same
few English names translated greedily by each trained run after adapting on those pairs. A
Markdown table goes to stdout::

    .venv/bin/python experiments/translate_examples.py \\
        "MAML=runs/translate_8_maml" "baseline=runs/translate_8_pretrain@0.3"

Each argument is LABEL=WORKDIR, optionally @RATE to adapt at another inner rate than the
run's (the baseline's rate chosen on the validation languages), or LABEL=icl:MODEL for
in-context learning with a pretrained model (``experiments/translate_baselines.py``: the K
pairs as a prompt). ``--group latin`` draws the Latin-script test languages::

    .venv/bin/python experiments/translate_examples.py --group latin \
        "FOMAML=runs/tr_sm_8_fomaml" "in-context=icl:smollm2-135m"
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
from translate_baselines import language_name, load_translator

from metajax.run import predict
from metajax.run.workdir import read_config
from metajax.tasks import translate

QUERIES = ("Germany", "Japan", "Spanish")


def load(spec: str, shots: int, steps: int):
    """``(label, translate(lang, support, sources) -> outputs)`` of one LABEL=... argument."""
    label, _, where = spec.partition("=")
    if where.startswith("icl:"):
        translator = load_translator(where.removeprefix("icl:"), max_new_tokens=32)
        return label, lambda lang, support, sources: translator.translate(
            support, language_name(lang), sources
        )
    workdir, _, rate = where.partition("@")
    config = read_config(workdir)
    if rate:
        config = dataclasses.replace(
            config, algorithm=dataclasses.replace(config.algorithm, inner_lr=float(rate))
        )
    if config.task.shots != shots:
        raise SystemExit(f"{workdir}: trained with K = {config.task.shots}, not --shots {shots}")
    model = predict.load(workdir, config)
    return label, lambda lang, support, sources: model.adapt_and_predict(
        support, None, sources, steps=steps
    )


def support_and_queries(lang: str, shots: int, max_len: int, seed: int = 0):
    # Only pairs that fit the model's sequences (BOS, source, SEP, target, END).
    fits = lambda s, t: len(s.encode()) + len(t.encode()) + 3 <= max_len
    pairs = {s: t for s, t in translate.load_pairs(lang) if fits(s, t)}
    queries = [(s, pairs[s]) for s in QUERIES if s in pairs]
    rest = sorted(s for s in pairs if s not in QUERIES)
    picks = np.random.default_rng(seed).choice(len(rest), shots, replace=False)
    return [(rest[i], pairs[rest[i]]) for i in sorted(picks)], queries


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="LABEL=WORKDIR[@RATE]")
    parser.add_argument("--steps", type=int, default=10, help="adaptation steps")
    parser.add_argument("--shots", type=int, default=8, help="support pairs (the runs' K)")
    parser.add_argument("--max-len", type=int, default=64, help="bytes of a support pair")
    parser.add_argument("--group", choices=translate.TEST_GROUPS, default="new_script")
    args = parser.parse_args()
    models = [load(spec, args.shots, args.steps) for spec in args.runs]
    labels = [label for label, _ in models]
    print(f"| language | English | CLDR name | {' | '.join(labels)} |")
    print("|---|---|---|" + "---|" * len(labels))
    for lang in translate.language_split(args.group)["test"]:
        support, queries = support_and_queries(lang, args.shots, args.max_len)
        if not queries:  # none of QUERIES is among this language's names
            continue
        outputs = [
            translate_fn(lang, support, [s for s, _ in queries]) for _, translate_fn in models
        ]
        for i, (source, target) in enumerate(queries):
            cells = " | ".join(repr(out[i]) for out in outputs)
            print(f"| {lang} | {source} | {target} | {cells} |")


if __name__ == "__main__":
    main()

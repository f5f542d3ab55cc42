"""In-context learning of a new language's words with a pretrained LM: the ``words_lm`` baseline.

On exactly the held-out tasks the runner evaluates for a ``words_lm`` config (default
``words_lm:smollm2_maml``; ``metajax.train.evaluate``'s draws, ``source.sample(0, chunk,
first)``, so every row compares task for task with that config's ``eval.json``), the
pretrained model of the config (or ``--model``), with no meta-training and no LoRA, scores
each query word:

- icl: after the task's K support words, one per line after the model's start token (the one
  the family opens a word with), the query word is the next line::

      <start>talo
      kirja
      kala
      äiti
      koira

- zero_shot: the same query line right after the start token, no support words.

A query word is scored as the continuation ``word`` then a newline (not the end token): in the
prompt a newline ends every word, so it is the end marker the context teaches, where an end
token after one word of a list would be a surprise no support word announces. The newline
plays the part of the runner's end token: its information counts, and it spells no byte of
the word. Bits per byte as the runner's (:mod:`metajax.run.families.words_lm`): a task's query
bits (every token of each word and its newline) over the UTF-8 bytes of its query words (the
byte table of :func:`metajax.run.pretrained_choice.token_byte_lengths` summed over the word's
ids), then the mean and 95 % interval (1.96 * std / sqrt(n)) over tasks.

Each line is encoded on its own: a byte-level BPE splits letters from whitespace before
merging, so the ids are those of the whole prompt (the tests check it on the fixture). Every
query of a task is one row of a batch and goes through the model once.

Prints one Markdown row per method and writes a JSON file with the summaries and the
per-task scores and languages::

    .venv/bin/python experiments/words_icl.py --config words_lm:smollm2_maml \\
        --out runs/words_icl.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from metajax.run.config import Config, ConfigError
from metajax.run.config_files import load_config
from metajax.run.families.words_lm import word_sources
from metajax.run.pretrained_choice import SCRATCH, Pretrained
from metajax.tasks import words
from metajax.train import summarize

METHODS = ("icl", "zero_shot")
LABELS = {"icl": "in-context learning", "zero_shot": "0-shot (no support words)"}
# Rows are padded to a multiple of this, so few shapes compile; pads are never targets.
WIDTH_BUCKET = 16


def eval_tasks(config: Config, num_tasks: int) -> Iterator[tuple[str, list[str], list[str]]]:
    """``(language, support words, query words)`` of the first ``num_tasks`` tasks the runner
    evaluates for ``config``: its held-out source, drawn ``eval.chunk`` tasks at a time."""
    source = word_sources(config.task, config.train.seed)[1]
    chunk = max(1, min(config.eval.chunk, num_tasks))
    for first in range(0, num_tasks, chunk):
        n = min(chunk, num_tasks - first)
        tasks = source.sample(0, n, first)
        for j, language in enumerate(source.sample_languages(0, n, first)):
            yield language, words.decode(tasks.support[0][j]), words.decode(tasks.query[0][j])


class WordScorer:
    """Bits of query words as continuations of a prompt of words, one per line.

    Args:
      pre: a :class:`~metajax.run.pretrained_choice.Pretrained` without a frozen trunk; its
        pretrained weights (the LoRA factors stay out), tokenizer, start token and byte table
        are the family's.
    """

    def __init__(self, pre: Pretrained):
        if pre.trunk is not None:
            raise ValueError("WordScorer needs the whole model: build Pretrained without a trunk.")
        self.model, self.params = pre.model, pre.meta_params["base"]
        self.encode_ids, self.start_id = pre.encode_ids, pre.start_id
        self.newline = pre.encode_ids("\n")
        self.byte_lengths = pre.byte_lengths()
        config = self.model.config  # Llama-family and GPT-2 names
        self.positions = int(getattr(config, "max_position_embeddings", None) or config.n_positions)
        self._line = functools.lru_cache(maxsize=1 << 16)(
            lambda w: self.encode_ids(w) + self.newline
        )

    def line_ids(self, word: str) -> list[int]:
        """The ids of ``word`` then a newline."""
        return list(self._line(word))

    def word_bytes(self, word: str) -> int:
        """The UTF-8 bytes of ``word``, counted as the runner counts them: the byte table over
        its ids."""
        return int(self.byte_lengths[self.encode_ids(word)].sum())

    def rows(self, support: Sequence[str], queries: Sequence[str]) -> tuple[np.ndarray, ...]:
        """``(tokens, targets)``: int32 and float32 ``(len(queries), width)``; row ``i`` is the
        start token, the support lines, then query line ``i``, whose tokens are the targets."""
        prefix = [self.start_id] + [t for w in support for t in self.line_ids(w)]
        lines = [self.line_ids(q) for q in queries]
        longest = len(prefix) + max(map(len, lines))
        if longest > self.positions:
            raise ValueError(
                f"a {longest}-token prompt exceeds the model's {self.positions} positions."
            )
        width = min(-(-longest // WIDTH_BUCKET) * WIDTH_BUCKET, self.positions)
        tokens = np.full((len(lines), width), self.start_id, np.int32)
        targets = np.zeros((len(lines), width), np.float32)
        for i, line in enumerate(lines):
            tokens[i, : len(prefix) + len(line)] = prefix + line
            targets[i, len(prefix) : len(prefix) + len(line)] = 1.0
        return tokens, targets

    def score(self, support: Sequence[str], queries: Sequence[str]) -> tuple[np.ndarray, ...]:
        """``(bits, bytes)``, float64 ``(len(queries),)``: each query line's information in
        bits after the support lines, and each query word's UTF-8 bytes."""
        tokens, targets = self.rows(support, queries)
        bits = np.asarray(_row_bits(self.model, self.params, tokens, targets), np.float64)
        return bits, np.array([self.word_bytes(q) for q in queries], np.float64)


@functools.partial(jax.jit, static_argnums=0)
def _row_bits(model, params, tokens, targets) -> jax.Array:
    """Each row's ``-log2 p`` summed over its target positions (the model is causal, so the
    pads after a row's last target change nothing)."""
    logits = model.apply(params, tokens[:, :-1]).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return -jnp.sum(picked * targets[:, 1:], axis=-1) / math.log(2.0)


def bits_per_byte(bits: np.ndarray, num_bytes: np.ndarray) -> float:
    """A task's query bits over its query bytes (the runner's per-task metric)."""
    return float(np.sum(bits) / max(np.sum(num_bytes), 1.0))


def baselines(
    config: Config, scorer: WordScorer, num_tasks: int | None = None, progress: bool = True
) -> dict:
    """Both methods on the first ``num_tasks`` (default ``eval.num_tasks``) held-out tasks of
    ``config``: summaries (``methods``) and per-task bits per byte and languages."""
    num_tasks = config.eval.num_tasks if num_tasks is None else num_tasks
    per_task: dict[str, list] = {"language": [], **{m: [] for m in METHODS}}
    bar = tqdm(total=num_tasks, desc="words icl", disable=not progress, file=sys.stderr)
    for language, support, queries in eval_tasks(config, num_tasks):
        per_task["language"].append(language)
        for method, prompt in (("icl", support), ("zero_shot", [])):
            per_task[method].append(bits_per_byte(*scorer.score(prompt, queries)))
        bar.update(1)
        means = {m: f"{np.mean(per_task[m]):.3f}" for m in METHODS}
        bar.set_postfix(means, refresh=False)
    bar.close()
    summary = summarize({m: np.asarray(per_task[m]) for m in METHODS})
    return {
        "num_tasks": num_tasks,
        "shots": config.task.shots,
        "queries": config.task.queries,
        "methods": {m: {"bits_per_byte": summary[m]} for m in METHODS},
        "per_task": per_task,
    }


def table_rows(result: dict, model: str) -> list[str]:
    """One Markdown row per method: method, K, tasks, bits per byte (95 %)."""
    rows = []
    for method, s in result["methods"].items():
        bpb = s["bits_per_byte"]
        rows.append(
            f"| {LABELS[method]}, {model} | {result['shots']} | {result['num_tasks']} | "
            f"{bpb['mean']:.3f} ± {bpb['ci95']:.3f} |"
        )
    return rows


def load_scorer(config: Config, model: str) -> WordScorer:
    """The scorer of pretrained ``model`` set up as the family sets it up for ``config``, but
    whole (no frozen trunk)."""
    task = dataclasses.replace(config.task, model=model, trainable_blocks=None)
    return WordScorer(Pretrained(task, config.train.seed, task.max_len))


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="words_lm:smollm2_maml", help="a words_lm config")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides")
    parser.add_argument("--tasks", type=int, default=None, help="default: the config's")
    parser.add_argument("--model", default=None, help="default: the config's task.model")
    parser.add_argument("--out", type=Path, default=Path("runs/words_icl.json"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.tasks is not None and args.tasks < 1:
        parser.error(f"--tasks {args.tasks}: need at least 1.")
    try:
        config = load_config(args.config, args.set)
    except (ConfigError, ValueError) as e:
        parser.error(f"--config {args.config}: {e}")
    if config.family != "words_lm":
        parser.error(f"--config {args.config}: a {config.family} config, not words_lm.")
    model = args.model or config.task.model
    if model == SCRATCH:
        parser.error(f"--config {args.config} trains its own Transformer: give --model.")
    try:
        scorer = load_scorer(config, model)
    except (ConfigError, ValueError) as e:
        raise SystemExit(f"--model {model}: {e}".replace("\n", " ")) from None
    result = baselines(config, scorer, args.tasks, not args.no_progress)
    out = {
        "config": args.config,
        "overrides": args.set,
        "model": model,
        "scored": "each query word then a newline, after the start token and (icl) the "
        "support words one per line",
        **result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print("| method | K | tasks | bits per byte |")
    print("|---|---|---|---|")
    print("\n".join(table_rows(result, model)))
    print(f"wrote {args.out}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()

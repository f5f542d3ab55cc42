"""Reference points for few-shot translation: copying the English name, and in-context learning.

On exactly the held-out tasks the runner evaluates for ``translate:<K>_maml`` (``metajax.train.
evaluate``'s draws, ``source.sample(0, chunk, first)``, so every row compares task for task
with ``eval.json``), two translators that learn nothing from meta-training:

- copy: the English source unchanged. In Latin script names are often shared or borrowed
  in part ("Yemen" -> Zulu "i-Yemen"), so this is the floor a Latin-script translator must
  beat. Its exact match is 0 by construction: a pair whose target equals the English name is
  not in the data (:func:`metajax.tasks.translate.load_pairs`).
- icl: a pretrained language model (default ``smollm2-135m``; any Llama-family checkpoint
  ``metajax.models.load_pretrained`` reads) prompted with the K support pairs, each on two
  lines, the target language named in English (babel), then the query::

      <start of text>English: Germany
      Vietnamese: Đức
      English: Sweden
      Vietnamese: Thụy Điển
      English: Japan
      Vietnamese:

  and decoded greedily to the end of the line: a token containing a newline or a special
  token (start, end, padding) ends the translation, or ``--max-new-tokens`` tokens do. The
  text before it, stripped, is the translation. The 16 queries of a task are decoded as one
  batch: the K support lines go through the model once and every query attends to their keys
  and values (:mod:`metajax.models.prefix_decoding`), each with its own key-value cache.

Each is scored as the runner scores its translators (``metajax.models.metrics.text_scores``):
corpus-level chrF (sacrebleu) and exact match over a task's 16 queries, then the mean and 95 %
interval over tasks. Groups: ``latin`` and ``new_script`` (the two test groups,
``task.test_group``) and ``validation``.
Prints one Markdown row per (group, K, method) and writes a JSON file with the summaries,
the per-task scores and languages, three example translations per language and the
decoding speed (rewritten after each group and K, so a long run keeps what it finished)::

    .venv/bin/python experiments/translate_baselines.py --group latin new_script \\
        --shots 8 32 --methods copy icl --out runs/translate_baselines.json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from metajax.models.decoding import greedy_decode_cached
from metajax.models.llama import LlamaLM
from metajax.models.metrics import text_scores
from metajax.models.prefix_decoding import prefix_cache, shared_prefix_decoder
from metajax.run.build import build
from metajax.run.config_files import load_config
from metajax.tasks import translate
from metajax.train import summarize

GROUPS = ("latin", "new_script", "validation")
METHODS = ("copy", "icl")
# Whose held-out tasks are scored ({shots}: K); a pretrained model's runner draws from the
# pairs that fit its tokens (translate:smollm2_{shots}_fomaml).
CONFIG = "translate:{shots}_maml"
METRICS = ("chrf", "exact_match")
EXAMPLES_PER_LANGUAGE = 3
# The token a text starts with, first known first (as the pretrained families choose it).
START_TOKENS = ("<|endoftext|>", "<|begin_of_text|>", "<s>", "<bos>")
# Special tokens (the tokenizer's ids, where it names them) that end a translation too.
SPECIALS = ("bos", "eos", "pad")
# Prefix and suffix widths are rounded up to these, so few shapes compile; the padding is
# masked, and each step's attention grows with it.
PREFIX_BUCKET, SUFFIX_BUCKET = 64, 16


def eval_source(group: str, shots: int, config: str = CONFIG):
    """The runner's held-out source of ``config`` (``{shots}`` filled in) for ``group``, and
    its ``eval`` settings (``num_tasks``, ``chunk``)."""
    if group not in GROUPS:
        raise ValueError(f"group={group!r}: choose one of {', '.join(GROUPS)}.")
    if group == "validation":
        sets = ["task.eval_split=validation"]
    else:
        sets = ["task.eval_split=test", f"task.test_group={group}"]
    config = load_config(config.format(shots=shots), sets)
    return build(config).setup.eval_source, config.eval


def sample_pairs(source, first: int, n: int) -> list[tuple]:
    """Tasks ``first .. first + n - 1`` of step 0 as ``(language, support, query)``, the
    pairs as strings: a pretrained model's token source gives them itself, the byte source
    as decoded rows."""
    if hasattr(source, "sample_pairs"):
        return source.sample_pairs(0, n, first)
    tasks, langs = source.sample(0, n, first), source.sample_languages(0, n, first)
    return [
        (lang, task_pairs(tasks.support[0][j]), task_pairs(tasks.query[0][j]))
        for j, lang in enumerate(langs)
    ]


def task_pairs(tokens) -> list[tuple[str, str]]:
    """The (English, target) pairs of encoded rows ``BOS source SEP target END``."""
    prompts, lengths, refs = translate.split_sequences(tokens)
    sources = [
        bytes(int(t) for t in row[1 : n - 1]).decode("utf-8") for row, n in zip(prompts, lengths)
    ]
    return list(zip(sources, refs))


@functools.cache
def language_name(code: str) -> str:
    """A language's English name in CLDR (``"vi"`` -> ``"Vietnamese"``)."""
    from babel import Locale

    return Locale("en").languages[code]


def icl_prefix(support, language: str) -> str:
    """The support pairs as prompt lines, each ending in a newline."""
    return "".join(f"English: {source}\n{language}: {target}\n" for source, target in support)


def icl_prompt(support, language: str, source: str) -> str:
    """The whole prompt for one query (without the start-of-text token)."""
    return icl_prefix(support, language) + f"English: {source}\n{language}:"


def line_end_logits(logits: jax.Array, stop_ids: jax.Array, newline: int) -> jax.Array:
    """Logits whose argmax is ``newline`` exactly when the argmax of ``logits`` is one of
    ``stop_ids`` (which holds ``newline``): the stop tokens' largest logit moves to
    ``newline``, the others to -inf, so one end token stands for all of them."""
    best = logits[:, stop_ids].max(axis=-1)
    return logits.at[:, stop_ids].set(-jnp.inf).at[:, newline].set(best)


class IclTranslator:
    """Greedy in-context translation with a Llama-family model, one batch per task.

    Args:
      model, params: a :class:`~metajax.models.LlamaLM` and its parameters.
      tokenizer: its tokenizer (``encode``, ``decode``, ``vocab_size``, ``token_id``).
      max_new_tokens: tokens generated per query at most, the line end included.

    Attributes:
      stats: totals over every call: ``prompt_tokens``, ``generated_tokens`` (line ends
        included), ``seconds`` (decoding, compilation excluded) and ``compile_seconds``.
    """

    def __init__(self, model, params, tokenizer, max_new_tokens: int = 64):
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.max_new_tokens = max_new_tokens
        self.start_id = _start_id(tokenizer)
        newline = tokenizer.encode("\n")
        if len(newline) != 1:
            raise ValueError(f"the tokenizer writes a newline as {len(newline)} tokens, not 1.")
        self.newline = newline[0]
        specials = {self.start_id, *(getattr(tokenizer, f"{k}_id", None) for k in SPECIALS)}
        line_ends = {i for i in range(tokenizer.vocab_size) if "\n" in tokenizer.decode([i])}
        self.stop_ids = jnp.asarray(sorted(line_ends | (specials - {None})), jnp.int32)
        self._ids = functools.lru_cache(maxsize=1 << 16)(tokenizer.encode)
        self._compiled = {}
        self.stats = dict(prompt_tokens=0, generated_tokens=0, seconds=0.0, compile_seconds=0.0)

    def token_ids(self, support, language: str, sources) -> tuple[list[int], list[list[int]]]:
        """``(prefix ids, one suffix per source)``: the prompt of query ``i`` is the prefix
        then suffix ``i``. Each line is encoded on its own: a byte-level BPE never merges
        across a newline, so the ids are those of the whole prompt."""
        prefix = [self.start_id]
        for source, target in support:
            prefix += self._ids(f"English: {source}\n") + self._ids(f"{language}: {target}\n")
        suffixes = [self._ids(f"English: {s}\n") + self._ids(f"{language}:") for s in sources]
        return prefix, suffixes

    def translate(self, support, language: str, sources) -> list[str]:
        """Greedy translations of ``sources`` after the ``support`` pairs, in ``language``."""
        prefix, suffixes = self.token_ids(support, language, sources)
        width = _round_up(max(map(len, suffixes)), SUFFIX_BUCKET) + self.max_new_tokens
        prefix_width = _round_up(len(prefix), PREFIX_BUCKET)
        positions = self.model.config.max_position_embeddings
        if prefix_width + width > positions:
            raise ValueError(
                f"a {len(prefix)}-token prompt and {width} more tokens exceed the model's "
                f"{positions} positions."
            )
        prefix_tokens = np.full((prefix_width,), self.start_id, np.int32)
        prefix_tokens[: len(prefix)] = prefix
        rows = np.full((len(suffixes), width), self.newline, np.int32)
        for i, ids in enumerate(suffixes):
            rows[i, : len(ids)] = ids
        lengths = np.array([len(ids) for ids in suffixes], np.int32)
        args = (self.params, prefix_tokens, np.int32(len(prefix)), rows, lengths)
        decode = self._compile(args)
        start = time.perf_counter()
        out = np.asarray(decode(*args))
        self.stats["seconds"] += time.perf_counter() - start
        self.stats["prompt_tokens"] += len(prefix) + int(lengths.sum())
        texts = []
        for row in out.tolist():
            row = row[: row.index(self.newline) + 1] if self.newline in row else row
            self.stats["generated_tokens"] += len(row)
            texts.append(self.tokenizer.decode([t for t in row if t != self.newline]).strip())
        return texts

    def _decode(self, params, prefix_tokens, prefix_len, rows, lengths):
        decoder = shared_prefix_decoder(
            self.model, prefix_cache(self.model, params, prefix_tokens, prefix_len)
        )

        def step(p, token, index, cache):
            logits, cache = decoder.step(p, token, index, cache)
            return line_end_logits(logits, self.stop_ids, self.newline), cache

        return greedy_decode_cached(
            decoder._replace(step=step),
            params,
            rows,
            lengths,
            steps=self.max_new_tokens,
            end_id=self.newline,
            pad_id=self.newline,
        )

    def _compile(self, args):
        key = (args[1].shape, args[3].shape)
        if key not in self._compiled:
            start = time.perf_counter()
            self._compiled[key] = jax.jit(self._decode).lower(*args).compile()
            self.stats["compile_seconds"] += time.perf_counter() - start
        return self._compiled[key]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _start_id(tokenizer) -> int:
    for token in START_TOKENS:
        try:
            return int(tokenizer.token_id(token))
        except (ValueError, KeyError):
            continue
    if getattr(tokenizer, "bos_id", None) is not None:
        return int(tokenizer.bos_id)
    raise ValueError(f"the tokenizer has none of the start tokens {START_TOKENS}.")


def baselines(
    group, shots, methods, num_tasks=None, translator=None, progress=True, config=CONFIG
) -> dict:
    """Copying and ICL (``methods``) on the first ``num_tasks`` held-out tasks of ``group``
    of the runner of ``config`` (default its ``eval.num_tasks``): summaries, per-task scores,
    examples, speed."""
    source, eval_cfg = eval_source(group, shots, config)
    num_tasks = eval_cfg.num_tasks if num_tasks is None else num_tasks
    if "icl" in methods and translator is None:
        raise ValueError("methods include icl: give an IclTranslator.")
    per_task = {f"{m}/{k}": [] for m in methods for k in METRICS}
    languages, examples = [], {}
    before = dict(translator.stats) if translator is not None else {}
    bar = tqdm(total=num_tasks, desc=f"{group} K={shots}", disable=not progress, file=sys.stderr)
    for first in range(0, num_tasks, eval_cfg.chunk):
        n = min(eval_cfg.chunk, num_tasks - first)
        for lang, support, query in sample_pairs(source, first, n):
            sources, refs = map(list, zip(*query))
            outputs = {"copy": sources}
            if "icl" in methods:
                outputs["icl"] = translator.translate(support, language_name(lang), sources)
            for m in methods:
                for k, value in text_scores(outputs[m], refs).items():
                    per_task[f"{m}/{k}"].append(value)
            languages.append(lang)
            if lang not in examples:
                examples[lang] = [
                    {"source": s, "reference": r, **{m: outputs[m][i] for m in methods}}
                    for i, (s, r) in enumerate(zip(sources, refs))
                ][:EXAMPLES_PER_LANGUAGE]
            bar.update(1)
            chrf = {f"{m} chrF": f"{np.mean(per_task[f'{m}/chrf']):.1f}" for m in methods}
            bar.set_postfix(chrf, refresh=False)
    bar.close()
    summary = summarize({k: np.asarray(v) for k, v in per_task.items()})
    result = {
        "group": group,
        "shots": shots,
        "num_tasks": num_tasks,
        "languages": sorted(set(languages)),
        "methods": {m: {k: summary[f"{m}/{k}"] for k in METRICS} for m in methods},
        "per_task": {"language": languages, **per_task},
        "examples": examples,
    }
    if translator is not None and "icl" in methods:
        result["speed"] = _speed(before, translator.stats, num_tasks)
    return result


def _speed(before: dict, after: dict, num_tasks: int) -> dict:
    """Decoding time per task (compilation apart) and tokens per second: prompt and generated
    tokens together, and generated ones alone."""
    spent = {k: after[k] - before[k] for k in after}
    seconds, tokens = spent["seconds"], spent["prompt_tokens"] + spent["generated_tokens"]
    return {
        "seconds_per_task": seconds / num_tasks,
        "prompt_tokens_per_task": spent["prompt_tokens"] / num_tasks,
        "generated_tokens_per_task": spent["generated_tokens"] / num_tasks,
        "tokens_per_s": tokens / seconds,
        "generated_tokens_per_s": spent["generated_tokens"] / seconds,
        "compile_seconds": spent["compile_seconds"],
    }


def table_rows(result: dict, model: str) -> list[str]:
    """One Markdown row per method: group, K, method, tasks, chrF, exact match (95 %)."""
    rows = []
    for m, s in result["methods"].items():
        label = "copy the English name" if m == "copy" else f"in-context learning, {model}"
        chrf, em = s["chrf"], s["exact_match"]
        rows.append(
            f"| {result['group']} | {result['shots']} | {label} | {result['num_tasks']} | "
            f"{chrf['mean']:.2f} ± {chrf['ci95']:.2f} | "
            f"{100 * em['mean']:.1f} % ± {100 * em['ci95']:.1f} |"
        )
    return rows


def load_translator(name: str, max_new_tokens: int) -> IclTranslator:
    """The pretrained model ``name`` (a registered name, a GGUF file or an HF folder)."""
    from metajax.models.pretrained import load_pretrained, load_tokenizer

    try:
        model, params = load_pretrained(name)
        tokenizer = load_tokenizer(name)
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"--model {name}: {e}".replace("\n", " ")) from None
    if not isinstance(model, LlamaLM):
        raise SystemExit(
            f"--model {name}: a {type(model).__name__}; icl needs a Llama-family model."
        )
    return IclTranslator(model, params, tokenizer, max_new_tokens)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--group", nargs="+", choices=GROUPS, default=["latin", "new_script"])
    parser.add_argument("--shots", nargs="+", type=int, choices=(8, 32), default=[8, 32])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--tasks", type=int, default=None, help="default: the config's 600")
    parser.add_argument("--model", default="smollm2-135m", help="pretrained model for icl")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("runs/translate_baselines.json"))
    parser.add_argument(
        "--config", default=CONFIG, help="the runner whose tasks are scored ({shots}: K)"
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    if args.tasks is not None and args.tasks < 1:
        parser.error(f"--tasks {args.tasks}: need at least 1.")
    translator = None
    if "icl" in args.methods:
        translator = load_translator(args.model, args.max_new_tokens)
    out = {
        "model": args.model if translator else None,
        "max_new_tokens": args.max_new_tokens,
        "prompt_example": icl_prompt([("Germany", "Allemagne")], "French", "Japan"),
        "results": [],
    }
    rows = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for group in args.group:
        for shots in args.shots:
            result = baselines(
                group,
                shots,
                args.methods,
                args.tasks,
                translator,
                not args.no_progress,
                args.config,
            )
            out["results"].append(result)
            args.out.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
            rows += table_rows(result, args.model)
            if "speed" in result:
                s = result["speed"]
                hours = s["seconds_per_task"] * 600 / 3600
                print(
                    f"{group} K={shots}: {s['seconds_per_task']:.2f} s per task, "
                    f"{s['tokens_per_s']:.0f} tokens/s ({s['generated_tokens_per_s']:.1f} "
                    f"generated), compilation {s['compile_seconds']:.0f} s: a 600-task run "
                    f"decodes for {hours:.1f} h",
                    file=sys.stderr,
                )
    print("| group | K | method | tasks | chrF | exact match |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

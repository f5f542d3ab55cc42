"""Greedy decoding with and without the key-value cache, on the translation model's shapes.

    PYTHONPATH=. .venv/bin/python -m benchmarks.decoding
    PYTHONPATH=. .venv/bin/python -m benchmarks.decoding --smoke     # seconds: tiny sizes
    PYTHONPATH=. .venv/bin/python -m benchmarks.decoding --config translate:smollm2_8_fomaml

One task's query set as ``translate:8_<algo>`` evaluates it (16 prompts, width 64, 2 blocks,
buffers of 64 tokens, up to 56 generated), random weights, and no end token: every row
decodes until its buffer or ``decode_len`` is full, as a model that never emits END does
(the trained translation models mostly do not). Checks that both forms give the same
tokens, then prints the median time of each (jitted, after warm-up) and their ratio,
measured in one process.

``--config`` a pretrained translation config instead: its model as the runner decodes it
(the frozen trunk and the top with its LoRA factors at their start, i.e. the pretrained
model), one evaluation chunk of query prompts (``eval.chunk`` tasks of ``task.queries``),
``decode_len`` tokens each, with its end token (rows stop where the model ends them).
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.measure import time_calls
from metajax.models import TransformerLM
from metajax.models.decoding import (
    IncrementalDecoder,
    greedy_decode,
    greedy_decode_cached,
    lm_decoder,
)
from metajax.run.families.translate import TaskConfig, transformer_config
from metajax.tasks import translate as T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks, not numbers")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--config", help="a pretrained translation config, e.g. "
                        "translate:smollm2_8_fomaml")  # fmt: skip
    args = parser.parse_args()
    if args.config:
        return pretrained(args.config, args.repeats)
    task = TaskConfig(shots=8, queries=16)
    if args.smoke:
        task = TaskConfig(shots=2, queries=4, max_len=24, width=16, depth=1, heads=2,
                          mlp_width=32, decode_len=12)  # fmt: skip
    model = TransformerLM(transformer_config(task))
    params = model.init(jax.random.key(0), jnp.zeros((1, task.max_len), jnp.int32))
    names = [("Germany", "x"), ("Japan", "x"), ("Spanish", "x"), ("Korean", "x")]
    tokens, _ = T.encode_pairs(names * (task.queries // len(names)), task.max_len)
    prompts, lengths, _ = T.split_sequences(tokens)
    forms = {"full passes": model.apply, "key-value cache": lm_decoder(model)}
    outputs, rows = {}, {}
    for name, decoder in forms.items():
        decode = greedy_decode_cached if isinstance(decoder, IncrementalDecoder) else greedy_decode
        run = jax.jit(
            functools.partial(
                decode, decoder, steps=task.decode_len, end_id=-1, pad_id=T.PAD, banned_ids=(T.PAD,)
            )
        )
        outputs[name] = np.asarray(run(params, prompts, lengths))
        rows[name] = time_calls(lambda run=run: run(params, prompts, lengths), repeats=args.repeats)
    full, cached = outputs.values()
    np.testing.assert_array_equal(cached, full)
    generated = int((full != T.PAD).sum())
    ratio = rows["full passes"]["median_s"] / rows["key-value cache"]["median_s"]
    print(json.dumps({"rows": rows, "generated_tokens": generated, "speedup": ratio}, indent=1))


def pretrained(config_name: str, repeats: int) -> None:
    """The cache against full passes for the pretrained model of a translation config."""
    from metajax.run.config_files import load_config
    from metajax.run.pretrained_choice import Pretrained
    from metajax.tasks.text_encoding import PairEncoder

    config = load_config(config_name, [])
    task = config.task
    pre = Pretrained(task, config.train.seed, task.max_len)
    enc = PairEncoder(pre.encode_ids, pre.tokenizer.decode, pre.start_id, pre.end_id, task.max_len)
    sources = ["Germany", "Japan", "Spanish", "Korean", "Peru", "French", "Kenya", "Chile"]
    prompts, lengths = enc.prompts(sources * (config.eval.chunk * task.queries // len(sources)))
    decode, params_of = pre.decoder()
    kwargs = dict(steps=task.decode_len, end_id=pre.end_id, pad_id=pre.end_id)
    forms = {
        "full passes": jax.jit(functools.partial(greedy_decode, pre.model.apply, **kwargs)),
        "key-value cache": jax.jit(functools.partial(decode, **kwargs)),
    }
    params = params_of(pre.meta_params)
    outputs, rows = {}, {}
    for name, run in forms.items():
        outputs[name] = np.asarray(run(params, prompts, lengths))
        rows[name] = time_calls(lambda run=run: run(params, prompts, lengths), repeats=repeats)
    np.testing.assert_array_equal(outputs["key-value cache"], outputs["full passes"])
    ratio = rows["full passes"]["median_s"] / rows["key-value cache"]["median_s"]
    generated = int((outputs["full passes"] != pre.end_id).sum())
    summary = {"config": config_name, "prompts": len(prompts), "rows": rows}
    print(json.dumps({**summary, "generated_tokens": generated, "speedup": ratio}, indent=1))


if __name__ == "__main__":
    main()

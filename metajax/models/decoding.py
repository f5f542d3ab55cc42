"""Greedy decoding for a byte-level decoder LM: fixed shapes, one ``lax.while_loop``, jittable.

A prompt is a right-padded token row whose first ``prompt_length`` tokens are given (for
translation ``BOS source SEP``). A row stops at ``end_id`` (which is emitted) or when its buffer
is full; after that it emits ``pad_id``; the loop ends as soon as every row has stopped. Two
forms, with the same output:

- :func:`greedy_decode` works with any ``apply_fn(params, tokens) -> logits`` of a causal model
  (LoRA or adapted parameters included). Each of ``steps`` iterations runs the model on the
  whole fixed-width buffer and takes the argmax at the last filled position: one full forward
  pass per generated token. Because the model is causal, whatever lies in the buffer after the
  last filled position never changes the logits that are read, so the buffer needs no mask.
- :func:`greedy_decode_cached` uses a model's key-value cache (:class:`IncrementalDecoder`,
  e.g. :func:`lm_decoder` of a :class:`~metajax.models.TransformerLM`): one position per
  iteration, shared by all rows, prompt tokens included (they are fed, not predicted), so a
  buffer of width W costs at most W - 1 one-token steps instead of ``steps`` W-token passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

ApplyFn = Callable[[object, jax.Array], jax.Array]


class IncrementalDecoder(NamedTuple):
    """A causal LM that decodes one position at a time with a cache.

    Attributes:
      init_cache: ``init_cache(batch, width) -> cache`` for rows of up to ``width`` tokens.
      step: ``step(params, token (batch,), index, cache) -> (logits (batch, vocab), cache)``:
        the logits after ``token`` at position ``index`` (a scalar), given the cache of the
        positions before it.
    """

    init_cache: Callable[[int, int], Any]
    step: Callable[[Any, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


def lm_decoder(model) -> IncrementalDecoder:
    """The :class:`IncrementalDecoder` of a :class:`~metajax.models.TransformerLM` or of any
    model with a ``decode_step`` method and an ``init_cache(batch, width)`` method
    (:class:`~metajax.models.LlamaLM`)."""
    from metajax.models.transformer import init_kv_cache

    def step(params, token, index, cache):
        return model.apply(params, token, index, cache, method="decode_step")

    init_cache = getattr(model, "init_cache", None)
    if init_cache is None:
        init_cache = lambda batch, width: init_kv_cache(model.config, batch, width)
    return IncrementalDecoder(init_cache, step)


def _check_decode_args(prompts, prompt_lengths, steps) -> None:
    if prompts.ndim != 2:
        raise ValueError(f"prompts must be (n, width) token ids, got shape {prompts.shape}.")
    if prompt_lengths.shape != prompts.shape[:1]:
        raise ValueError(
            f"prompt_lengths shape {prompt_lengths.shape} != (n,) = {prompts.shape[:1]}."
        )
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}.")


def _mask_banned(logits: jax.Array, banned_ids: Sequence[int]) -> jax.Array:
    if banned_ids:
        logits = logits.at[:, jnp.asarray(tuple(banned_ids), jnp.int32)].set(-jnp.inf)
    return logits


def greedy_decode(
    apply_fn: ApplyFn,
    params,
    prompts: jax.Array,
    prompt_lengths: jax.Array,
    *,
    steps: int,
    end_id: int,
    pad_id: int,
    banned_ids: Sequence[int] = (),
) -> jax.Array:
    """Greedy continuation of each prompt, ``steps`` tokens at most.

    Args:
      apply_fn: ``apply_fn(params, tokens (n, W)) -> logits (n, W, vocab)`` of a causal LM;
        ``logits[:, t]`` predicts token ``t + 1``.
      params: the model's parameters (e.g. after adaptation to one task).
      prompts: int ``(n, W)``; row ``b`` holds its prompt in ``[:prompt_lengths[b]]``, the rest
        is ignored (overwritten as tokens are generated).
      prompt_lengths: int ``(n,)``, each in ``[1, W]``.
      steps: the number of tokens to generate per row (static).
      end_id: the token that ends a row; it is emitted, then ``pad_id`` follows.
      pad_id: what a finished or full row emits.
      banned_ids: tokens never generated (e.g. PAD, BOS, a separator): their logits are set
        to ``-inf`` before the argmax.

    Returns:
      int32 ``(n, steps)``: the generated tokens, ``end_id`` included, ``pad_id`` after it.
      A row whose buffer fills up before ``end_id`` stops there without one.

    Raises:
      ValueError: shapes that do not fit, or ``steps < 1``.
    """
    _check_decode_args(prompts, prompt_lengths, steps)
    n, width = prompts.shape
    slots = jnp.arange(width)
    lengths = jnp.asarray(prompt_lengths, jnp.int32)

    def body(carry):
        i, buffer, out, done = carry
        write = lengths + i  # the slot this step fills
        logits = apply_fn(params, buffer)
        read = jnp.clip(write - 1, 0, width - 1)[:, None, None]
        next_logits = _mask_banned(jnp.take_along_axis(logits, read, axis=1)[:, 0], banned_ids)
        token = jnp.argmax(next_logits, axis=-1).astype(jnp.int32)
        live = ~done & (write < width)
        token = jnp.where(live, token, pad_id)
        buffer = jnp.where((slots[None] == write[:, None]) & live[:, None], token[:, None], buffer)
        out = out.at[:, i].set(token)
        return i + 1, buffer, out, done | ~live | (token == end_id)

    def more(carry):
        # Once every row has ended, the remaining slots stay pad_id: stop there.
        i, _, _, done = carry
        return (i < steps) & ~jnp.all(done)

    init = (
        jnp.int32(0),
        jnp.asarray(prompts, jnp.int32),
        jnp.full((n, steps), pad_id, jnp.int32),
        jnp.zeros((n,), bool),
    )
    return jax.lax.while_loop(more, body, init)[2]


def greedy_decode_cached(
    decoder: IncrementalDecoder,
    params,
    prompts: jax.Array,
    prompt_lengths: jax.Array,
    *,
    steps: int,
    end_id: int,
    pad_id: int,
    banned_ids: Sequence[int] = (),
) -> jax.Array:
    """:func:`greedy_decode` with a key-value cache: the same arguments and result, but
    ``decoder`` instead of ``apply_fn``.

    Iteration ``t`` feeds every row's token at position ``t`` (its prompt's, or the one it
    generated) and reads the prediction for ``t + 1``; a row whose prompt is longer than
    ``t + 1`` keeps its prompt token. The loop ends when every row has stopped or the buffer
    is full.
    """
    _check_decode_args(prompts, prompt_lengths, steps)
    n, width = prompts.shape
    lengths = jnp.asarray(prompt_lengths, jnp.int32)
    out_slots = jnp.arange(steps)

    def body(carry):
        t, buffer, out, done, cache = carry
        logits, cache = decoder.step(params, buffer[:, t], t, cache)
        token = jnp.argmax(_mask_banned(logits, banned_ids), axis=-1).astype(jnp.int32)
        i = t + 1 - lengths  # the output index of slot t + 1 (negative: still the prompt)
        live = (i >= 0) & ~done
        token = jnp.where(live, token, pad_id)
        buffer = buffer.at[:, t + 1].set(jnp.where(live, token, buffer[:, t + 1]))
        out = jnp.where((out_slots[None] == i[:, None]) & live[:, None], token[:, None], out)
        done = done | (live & ((token == end_id) | (i + 1 >= steps)))
        return t + 1, buffer, out, done, cache

    def more(carry):
        t, _, _, done, _ = carry
        return (t + 1 < width) & ~jnp.all(done)

    init = (
        jnp.int32(0),
        jnp.asarray(prompts, jnp.int32),
        jnp.full((n, steps), pad_id, jnp.int32),
        jnp.zeros((n,), bool),
        decoder.init_cache(n, width),
    )
    return jax.lax.while_loop(more, body, init)[2]


def bytes_to_strings(generated, end_id: int) -> list[str]:
    """Generated byte tokens back to text (host side).

    Each row is read up to its first ``end_id``; ids ``>= 256`` (specials) are dropped and the
    bytes decoded as UTF-8, invalid sequences replaced by U+FFFD.

    Args:
      generated: int ``(n, steps)`` as :func:`greedy_decode` returns (numpy or jax).
      end_id: the end token.

    Returns:
      ``n`` strings.
    """
    rows = np.asarray(generated)
    if rows.ndim != 2:
        raise ValueError(f"generated must be (n, steps) token ids, got shape {rows.shape}.")
    out = []
    for row in rows:
        stop = np.flatnonzero(row == end_id)
        row = row[: stop[0]] if stop.size else row
        out.append(bytes(int(t) for t in row if 0 <= t < 256).decode("utf-8", "replace"))
    return out

"""Parameter counts of the default models, against hand-computed formulas."""

import jax
import jax.numpy as jnp
import pytest

from metajax.models import (
    MLP,
    ConvNet,
    ConvNetConfig,
    TransformerClassifier,
    TransformerConfig,
    TransformerLM,
    convnet_param_count,
)


def count(model, x):
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)  # no compile, no FLOPs
    return sum(s.size for s in jax.tree.leaves(shapes))


def test_mlp_of_the_sinusoid_experiment():
    n = count(MLP(), jnp.zeros((1, 1)))
    print(f"MLP 1-40-40-1: {n} parameters")
    assert n == (1 * 40 + 40) + (40 * 40 + 40) + (40 * 1 + 1) == 1761


@pytest.mark.parametrize("ways", [5, 20])
def test_convnet_of_the_maml_paper(ways):
    n = count(ConvNet(ConvNetConfig(ways=ways)), jnp.zeros((1, 28, 28, 1)))
    print(f"ConvNet {ways}-way on 28x28x1: {n} parameters")
    # Block 1: 3x3x1x64 conv + 64 bias + 2x64 norm; blocks 2-4: 3x3x64x64 + 64 + 2x64;
    # 28 -> 14 -> 7 -> 3 -> 1 after the pools, so the head reads 64 features.
    by_hand = (9 * 64 + 64 + 128) + 3 * (9 * 64 * 64 + 64 + 128) + (64 * ways + ways)
    assert n == by_hand == convnet_param_count(ConvNetConfig(ways=ways))
    assert n == {5: 112261, 20: 113236}[ways]


def test_convnet_count_formula_off_the_defaults():
    cfg = ConvNetConfig(ways=7, filters=6, blocks=3, norm="none")
    n = count(ConvNet(cfg), jnp.zeros((1, 20, 24, 3)))
    # 20x24 -> 10x12 -> 5x6 -> 2x3: the head reads 2 * 3 * 6 = 36 features.
    by_hand = (9 * 3 * 6 + 6) + 2 * (9 * 6 * 6 + 6) + (36 * 7 + 7)
    assert n == by_hand == convnet_param_count(cfg, (20, 24, 3))


@pytest.mark.parametrize("tie", [True, False])
def test_benchmark_standard_transformer(tie):
    cfg = TransformerConfig(
        vocab_size=64, width=128, depth=2, heads=4, mlp_width=512, max_len=32, tie_embeddings=tie
    )
    tokens = jnp.zeros((1, 32), jnp.int32)
    n = count(TransformerLM(cfg), tokens)
    n_cls = count(TransformerClassifier(cfg, num_classes=5), tokens)
    print(f"Transformer LM (2x128, 4 heads, MLP 512, seq 32, vocab 64, tied={tie}): {n}")
    print(f"Transformer classifier, same trunk, 5-way: {n_cls}")
    w, m, v, length = 128, 512, 64, 32
    block = 2 * (2 * w) + (w * 3 * w + 3 * w) + (w * w + w) + (w * m + m) + (m * w + w)
    trunk = v * w + length * w + 2 * block + 2 * w
    assert n == trunk + (0 if tie else w * v)
    assert n_cls == trunk + w * 5 + 5
    assert n == {True: 409088, False: 417280}[tie]

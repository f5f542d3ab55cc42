"""The standard Transformer case in PyTorch: plain autograd, `higher` and `torchopt`.

Optional extra (never imported by the library or its tests): ``pip install torch==2.13.0``
(CPU build), ``pip install --no-deps higher torchopt`` and ``pip install optree graphviz``.

The PyTorch model mirrors :class:`metajax.models.TransformerLM` weight for weight (Flax's
parameter layouts are used as they are), so every peer starts from the same weights as
metajax and its meta-gradient is checked against metajax's before anything is timed.
Second order through plain autograd uses ``create_graph=True``; ``torch.func`` is avoided on
purpose (in torch 2.13 ``grad(vmap(...))`` through an inner grad of ``layer_norm`` is wrong).
"""

from __future__ import annotations

import math

import jax
import numpy as np
import torch
import torch.nn.functional as F

from metajax.paths import path_str


def torch_params(flax_params) -> dict[str, torch.Tensor]:
    """Flax params -> {dotted path: float32 tensor}, same layouts."""
    flat = jax.tree_util.tree_flatten_with_path(flax_params["params"])[0]
    return {path_str(p).replace("/", "."): torch.tensor(np.asarray(v)) for p, v in flat}


def lm_forward(P: dict[str, torch.Tensor], tokens: torch.Tensor, heads: int) -> torch.Tensor:
    """The TransformerLM forward pass: tokens (B, T) long -> logits (B, T, vocab)."""
    B, T = tokens.shape
    width = P["trunk.positions"].shape[1]
    head_dim = width // heads
    ln = lambda x, pre: F.layer_norm(x, (width,), P[pre + ".scale"], P[pre + ".bias"], eps=1e-6)
    x = P["trunk.embed.embedding"][tokens] + P["trunk.positions"][:T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    depth = sum(1 for k in P if k.endswith("ln_attn.scale"))
    for i in range(depth):
        b = f"trunk.blocks_{i}"
        h = ln(x, b + ".ln_attn")
        qkv = h @ P[b + ".attn.qkv.kernel"].reshape(width, -1) + P[b + ".attn.qkv.bias"].reshape(-1)
        q, k, v = qkv.view(B, T, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)
        attn = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v  # (B, H, T, D)
        attn = attn.permute(0, 2, 1, 3).reshape(B, T, width)
        x = x + attn @ P[b + ".attn.out.kernel"].reshape(width, width) + P[b + ".attn.out.bias"]
        h = ln(x, b + ".ln_mlp")
        h = F.gelu(h @ P[b + ".mlp_in.kernel"] + P[b + ".mlp_in.bias"], approximate="tanh")
        x = x + h @ P[b + ".mlp_out.kernel"] + P[b + ".mlp_out.bias"]
    x = ln(x, "trunk.ln_final")
    return x @ P["trunk.embed.embedding"].T


def next_token_loss(P, batch, heads):
    tokens, _ = batch  # every token is real in the benchmark
    logits = lm_forward(P, tokens[:, :-1], heads)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


class TorchLM(torch.nn.Module):
    """``nn.Module`` wrapper (for higher and torchopt) over the same functional forward."""

    def __init__(self, params: dict[str, torch.Tensor], heads: int):
        super().__init__()
        self.heads = heads
        self.names = list(params)
        for i, name in enumerate(self.names):
            self.register_parameter(f"p{i}", torch.nn.Parameter(params[name].clone()))

    def as_dict(self, tensors=None):
        tensors = list(self.parameters()) if tensors is None else tensors
        return dict(zip(self.names, tensors))

    def forward(self, tokens):
        return lm_forward(
            self.as_dict([getattr(self, f"p{i}") for i in range(len(self.names))]),
            tokens,
            self.heads,
        )


def lm_loss_module(model, batch):
    tokens, _ = batch
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def to_torch_tasks(tasks):
    """metajax Task with a task axis -> list of (support, query) per task, torch tensors."""
    s_tok, s_mask = (torch.tensor(np.asarray(a)).long() for a in tasks.support)
    q_tok, q_mask = (torch.tensor(np.asarray(a)).long() for a in tasks.query)
    return [((s_tok[i], s_mask[i]), (q_tok[i], q_mask[i])) for i in range(s_tok.shape[0])]


def make_autograd_step(model: TorchLM, tasks, *, steps, lr, second_order, outer_lr=1e-3):
    """Plain autograd: an inner loop of ``torch.autograd.grad(create_graph=...)`` per task."""
    opt = torch.optim.Adam(model.parameters(), lr=outer_lr)
    params = list(model.parameters())

    def meta_grad():
        for p in params:
            p.grad = None
        for support, query in tasks:
            fast = params
            for _ in range(steps):
                loss = next_token_loss(model.as_dict(fast), support, model.heads)
                grads = torch.autograd.grad(loss, fast, create_graph=second_order)
                fast = [p - lr * g for p, g in zip(fast, grads)]
            (next_token_loss(model.as_dict(fast), query, model.heads) / len(tasks)).backward()
        return [p.grad for p in params]

    def step():
        meta_grad()
        opt.step()

    return meta_grad, step


def make_higher_step(model: TorchLM, tasks, *, steps, lr, second_order, outer_lr=1e-3):
    import higher

    opt = torch.optim.Adam(model.parameters(), lr=outer_lr)
    inner_opt = torch.optim.SGD(model.parameters(), lr=lr)

    def meta_grad():
        opt.zero_grad(set_to_none=True)
        for support, query in tasks:
            with higher.innerloop_ctx(
                model, inner_opt, copy_initial_weights=False, track_higher_grads=second_order
            ) as (fmodel, diffopt):
                for _ in range(steps):
                    diffopt.step(lm_loss_module(fmodel, support))
                (lm_loss_module(fmodel, query) / len(tasks)).backward()
        return [p.grad for p in model.parameters()]

    def step():
        meta_grad()
        opt.step()

    return meta_grad, step


def make_torchopt_step(model: TorchLM, tasks, *, steps, lr, second_order, outer_lr=1e-3):
    import torchopt

    opt = torch.optim.Adam(model.parameters(), lr=outer_lr)
    inner_opt = torchopt.MetaSGD(model, lr=lr)

    def meta_grad():
        opt.zero_grad(set_to_none=True)
        initial = torchopt.extract_state_dict(model)
        for support, query in tasks:
            for _ in range(steps):
                inner_opt.step(lm_loss_module(model, support))
                if not second_order:
                    torchopt.stop_gradient(model)
            (lm_loss_module(model, query) / len(tasks)).backward()
            torchopt.recover_state_dict(model, initial)
        return [p.grad for p in model.parameters()]

    def step():
        meta_grad()
        opt.step()

    return meta_grad, step


PEERS = {
    "torch_autograd": make_autograd_step,
    "higher": make_higher_step,
    "torchopt": make_torchopt_step,
}

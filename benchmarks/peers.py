"""metajax against the PyTorch peers on one case, meta-gradients checked equal before timing."""

from __future__ import annotations

import numpy as np

from benchmarks import cases
from benchmarks.measure import time_calls

TOLERANCE = 1e-4  # relative difference of meta-gradients, float32


def compare(size: dict, repeats: int, algorithm, measure_step) -> list[dict]:
    """Rows for metajax (both task-loop forms) and every peer, second and first order.

    ``ratio_to_metajax`` is peer time over the fastest metajax time of the same order, from
    the same process; a peer whose meta-gradient differs by more than TOLERANCE is reported
    and not timed.
    """
    import jax
    import torch

    from benchmarks import torch_peers as tp

    torch.manual_seed(0)
    case = cases.transformer_case(**size)
    tasks = tp.to_torch_tasks(case.tasks)
    heads = size["heads"]
    rows = []
    for order in ("maml", "fomaml"):
        second = order == "maml"
        reference = tp.torch_params(
            jax.jit(algorithm(order, case).meta_grad)(case.params, case.tasks)[0]
        )
        ours = []
        for task_batch in (None, 1):
            row = {
                "case": "transformer",
                "algorithm": order,
                "implementation": "metajax",
                "task_batch": task_batch,
            }
            row.update(
                measure_step(
                    algorithm(order, case, task_batch=task_batch),
                    case,
                    repeats,
                    task_batch=task_batch,
                )
            )
            ours.append(row)
        best = min(r["median_s"] for r in ours)
        for r in ours:
            r["ratio_to_metajax"] = r["median_s"] / best
        rows += ours
        # higher and torchopt detach their fast weights without higher-order tracking, so
        # their first-order gradient never reaches the initial weights: plain autograd is the
        # PyTorch way to write FOMAML.
        peers = tp.PEERS if second else {"torch_autograd": tp.PEERS["torch_autograd"]}
        for name, make in peers.items():
            model = tp.TorchLM(tp.torch_params(case.params), heads=heads)
            meta_grad, step = make(
                model, tasks, steps=case.inner_steps, lr=case.inner_lr, second_order=second
            )
            grads = meta_grad()
            num = sum(float(((g - reference[n]) ** 2).sum()) for n, g in zip(model.names, grads))
            den = sum(float((reference[n] ** 2).sum()) for n in model.names)
            row = {
                "case": "transformer",
                "algorithm": order,
                "implementation": name,
                "grad_rel_diff": float(np.sqrt(num / den)),
            }
            if row["grad_rel_diff"] < TOLERANCE:
                slow = name == "torchopt"  # tens of seconds a step: a few runs only
                row.update(time_calls(step, warmup=1, repeats=2 if slow else repeats))
                row["ratio_to_metajax"] = row["median_s"] / best
            rows.append(row)
            print(row, flush=True)
    return rows

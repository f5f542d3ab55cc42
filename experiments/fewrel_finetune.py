"""FewRel baseline: the pretrained model fine-tuned on the pooled meta-training relations.

No meta-learning: the LoRA factors of the trainable blocks and one linear head over all the
meta-training relations (20 in the cross-domain protocol) are trained by plain minibatch
cross-entropy on every sentence of those relations (Adam, the meta-learners' encoder, trunk
and pooling: those of ``--config``, default ``fewrel:smollm2_5w1s_maml``). The
relation head is then dropped, and each test task is adapted exactly as the meta-learned
rows are: a zero 5-way head and the factors, SGD on the support sentences, accuracy on the
query after 0 to 5 steps (``metajax.evaluate``, the runner's evaluation); and, with no
steps at all, nearest prototypes of the fine-tuned features (``--distance``: squared
Euclidean, or the centered cosine that the prompt readout's frozen features use). The
inner rate and the number of steps are chosen on the validation relations
(``--validation-tasks``, 100), then the test tasks (``--test-tasks``, 600) are evaluated
once::

    .venv/bin/python experiments/fewrel_finetune.py --workdir runs/sm_finetune \\
        --shots 1 5 --steps 300 --rates 0.01 0.03
    .venv/bin/python experiments/fewrel_finetune.py --workdir runs/sm_prompt_finetune \\
        --config fewrel:smollm2_prompt_5w1s_maml --distance centered_cosine --shots 1 5

Writes WORKDIR/params.pkl (resumed from WORKDIR/progress.pkl after an interruption) and
WORKDIR/eval_<setting>.json for each ``--shots`` given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _shared_data import use_shared_data

import metajax as mj
from metajax.run.build import build
from metajax.run.config_files import load_config
from metajax.run.families import fewrel as fewrel_family
from metajax.tasks import fewrel

EVAL_STEPS = 5


def relation_sentences(config) -> tuple[list, np.ndarray]:
    """Every sentence of the meta-training relations and its relation index."""
    relations = fewrel.resolve(fewrel_family.splits(config.task))["train"]
    sentences, labels = [], []
    for label, sents in enumerate(relations.values()):
        sentences.extend(sents)
        labels.extend([label] * len(sents))
    return sentences, np.asarray(labels, np.int32)


def fine_tune(experiment, sentences, labels, args, workdir: Path):
    """The embedding's parameters after ``args.steps`` minibatches of relation cross-entropy."""
    setup = experiment.setup
    embed = setup.embedding.apply_fn
    num_classes = int(labels.max()) + 1
    width = jax.eval_shape(
        lambda p, x: embed(p, x), setup.embedding.params, setup.evaluator.inputs_fn(sentences[:1])
    ).shape[-1]
    params = {
        "model": setup.embedding.params["model"],
        "head": {"kernel": jnp.zeros((width, num_classes)), "bias": jnp.zeros((num_classes,))},
    }
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(args.lr))
    if setup.wrap_optimizer is not None:
        tx = setup.wrap_optimizer(tx)  # the frozen base of the trainable blocks stays frozen

    def loss_fn(p, x, y):
        logits = embed({"model": p["model"]}, x) @ p["head"]["kernel"] + p["head"]["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p, opt, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        updates, opt = tx.update(grads, opt, p)
        return optax.apply_updates(p, updates), opt, loss

    progress = workdir / "progress.pkl"
    first, opt = 0, tx.init(params)
    if progress.exists():
        first, params, opt = pickle.loads(progress.read_bytes())
        print(f"resuming fine-tuning at step {first}")
    rng = np.random.default_rng(0)
    order = np.concatenate(
        [rng.permutation(len(labels)) for _ in range(1 + args.steps * args.batch // len(labels))]
    )
    started, losses = time.time(), []
    for i in range(first, args.steps):
        idx = order[i * args.batch : (i + 1) * args.batch]
        x = setup.evaluator.inputs_fn([sentences[j] for j in idx])
        params, opt, loss = step(params, opt, x, labels[idx])
        losses.append(float(loss))
        if (i + 1) % 50 == 0 or i + 1 == args.steps:
            rate = (i + 1 - first) / (time.time() - started)
            print(
                f"step {i + 1}/{args.steps}  loss {np.mean(losses[-50:]):.4f}  {rate:.2f} steps/s"
            )
        if (i + 1) % 250 == 0 or i + 1 == args.steps:
            tmp = progress.with_suffix(".tmp")
            tmp.write_bytes(pickle.dumps((i + 1, jax.device_get(params), jax.device_get(opt))))
            tmp.replace(progress)
    return jax.device_get({"model": params["model"]})


def evaluate(
    experiment, embedding_params, split: str, shots: int, rate: float, num_tasks: int, distance
):
    """Per-task accuracy ``(num_tasks, EVAL_STEPS + 1)`` of the adapted rows, and
    ``(num_tasks,)`` of the prototypes by ``distance`` (a name), on ``split``."""
    config = experiment.config
    task = dataclasses.replace(config.task, eval_split=split, shots=shots)
    setup = build(dataclasses.replace(config, task=task)).setup
    params = {"model": embedding_params["model"], "head": setup.params["head"]}
    learner = mj.maml(setup.loss_fn, inner_steps=EVAL_STEPS, inner_lr=rate, mask=setup.inner_mask)
    adapted = mj.evaluate(
        learner,
        params,
        setup.eval_source,
        setup.loss_fn,
        setup.metric_fn,
        num_tasks=num_tasks,
        steps=EVAL_STEPS,
        chunk=config.eval.chunk,
    )["accuracy"]
    emb = setup.embedding
    protonets = mj.protonets(emb.apply_fn, ways=emb.ways)
    from metajax.algorithms.protonets import distance_by_name, protonet_logits
    from metajax.models.losses import accuracy_metric, classification_loss

    distance_fn = distance_by_name(distance)  # the scale does not change the nearest class
    logits = lambda a, x: protonet_logits(emb.apply_fn, a, x, distance_fn)
    prototypes = mj.evaluate(
        protonets,
        {"model": embedding_params["model"]},
        setup.eval_source,
        classification_loss(logits),
        accuracy_metric(logits),
        num_tasks=num_tasks,
        steps=0,
        chunk=config.eval.chunk,
    )["accuracy"][:, 0]
    return adapted, prototypes


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--config", default="fewrel:smollm2_5w1s_maml")
    parser.add_argument("--set", dest="sets", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=1000, help="fine-tuning minibatches")
    parser.add_argument("--batch", type=int, default=32, help="sentences per minibatch")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3])
    parser.add_argument("--shots", type=int, nargs="+", default=[1])
    parser.add_argument("--validation-tasks", type=int, default=100)
    parser.add_argument("--test-tasks", type=int, default=600)
    parser.add_argument(
        "--distance",
        choices=("squared_euclidean", "centered_cosine"),
        default="squared_euclidean",
        help="the prototypes' distance",
    )
    args = parser.parse_args()
    use_shared_data()
    if min(args.steps, args.batch, args.validation_tasks, args.test_tasks) < 1:
        parser.error("--steps, --batch and the task counts must be >= 1.")
    if not args.lr > 0 or min(args.rates) <= 0:
        parser.error("--lr and --rates must be positive.")
    experiment = build(load_config(args.config, args.sets))
    args.workdir.mkdir(parents=True, exist_ok=True)
    final = args.workdir / "params.pkl"
    if final.exists():
        params = pickle.loads(final.read_bytes())
    else:
        sentences, labels = relation_sentences(experiment.config)
        print(f"fine-tuning on {len(labels)} sentences of {labels.max() + 1} relations")
        params = fine_tune(experiment, sentences, labels, args, args.workdir)
        final.write_bytes(pickle.dumps(params))
    validation_split = "validation" if experiment.config.task.val_relations else None
    for shots in args.shots:
        out = {"shots": shots, "fine_tuning_steps": args.steps, "batch": args.batch}
        out["distance"] = args.distance
        if validation_split:
            best = (-1.0, None, None)
            for rate in args.rates:
                acc, protos = evaluate(
                    experiment,
                    params,
                    validation_split,
                    shots,
                    rate,
                    args.validation_tasks,
                    args.distance,
                )
                by_steps = acc.mean(0)
                print(
                    f"validation {shots}-shot, rate {rate}: "
                    + " ".join(f"{a:.3f}" for a in by_steps)
                    + f"; prototypes {protos.mean():.3f}"
                )
                out.setdefault("validation", {})[str(rate)] = by_steps.tolist()
                out["validation_prototypes"] = float(protos.mean())
                if by_steps.max() > best[0]:
                    best = (float(by_steps.max()), rate, int(by_steps.argmax()))
            _, rate, steps = best
        else:
            rate, steps = args.rates[0], EVAL_STEPS
        acc, protos = evaluate(
            experiment, params, "test", shots, rate, args.test_tasks, args.distance
        )
        summary = mj.summarize({"accuracy": acc})["accuracy"]
        out.update(
            rate=rate,
            steps=steps,
            test=summary,
            test_at_choice=[summary["mean"][steps], summary["ci95"][steps]],
        )
        out["test_prototypes"] = [
            float(protos.mean()),
            float(1.96 * protos.std(ddof=1) / np.sqrt(len(protos))),
        ]
        print(
            json.dumps({k: out[k] for k in ("rate", "steps", "test_at_choice", "test_prototypes")})
        )
        (args.workdir / f"eval_{shots}shot.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()

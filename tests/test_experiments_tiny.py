"""Every experiment config's tiny variant, end to end through the CLI: train, then eval."""

import importlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import data_dir, needs_data

from metajax.run import cli
from metajax.run.build import ALGORITHMS
from metajax.run.config_files import experiment_names, load_config

QUIET = ["--no-progress"]


def _eval(workdir):
    return json.loads((Path(workdir) / "eval.json").read_text())


def _on_grid(means, predictions: int) -> bool:
    """Whether mean accuracies over tasks are whole numbers of right answers: with
    ``predictions`` query predictions in all (tasks x ways x queries), each mean is
    ``right / predictions``. Counting a batch wrongly, or averaging anything but hits, is not."""
    return all(abs(m * predictions - round(m * predictions)) < 1e-3 for m in means)


def _train(spec, workdir, *overrides):
    args = ["train", spec, "--workdir", str(workdir), *QUIET]
    if overrides:
        args += ["--set", *overrides]
    assert cli.main(args) == 0
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(np.isfinite(r["loss_after"]) for r in rows)
    return _eval(workdir)


def test_every_config_file_is_listed_and_has_a_tiny_variant():
    names = experiment_names()
    for name in (
        "sinusoid",
        "omniglot",
        "words_lm",
        "words_langid",
        "fewrel",
        "translate",
    ):
        assert name in names
        assert load_config(f"{name}:tiny").train.steps <= 20
    # A pretrained model is a model choice of the text families, not a family of its own.
    assert not {"words_gpt2", "fewrel_gpt2"} & set(names)
    for name in ("words_lm", "fewrel", "translate"):
        config = load_config(f"{name}:gpt2_tiny")
        assert config.family == name and config.task.model.endswith("gpt2_tiny")
        assert config.train.steps <= 20


def _module(name):
    return importlib.import_module(f"metajax.configs.{name}")


def test_every_named_omniglot_variant_loads_with_its_algorithm():
    variants = _module("omniglot").VARIANTS
    assert len(variants) == 5 + 2 * 15
    for v in variants:
        c = load_config(f"omniglot:{v}")
        assert c.name.startswith("omniglot_")
        assert c.task.ways == int(v.split("w")[0]) if v[0].isdigit() else c.task.ways == 5
        if "protonets" in v:
            assert c.eval.inner_steps == 0 and c.algorithm.name == "protonets"
        elif not v.endswith("_gpu"):  # one task at a time on a CPU
            assert (c.algorithm.task_batch, c.algorithm.unroll_tasks) == (1, True)
        assert c.algorithm.name in ALGORITHMS
        if v.endswith("_gpu"):
            # Reptile's published budget is 100K outer steps (200K for 20-way); MAML's 60K.
            expected_steps = (
                {"20w1s": 200_000}.get(v.split("_")[0], 100_000) if "reptile" in v else 60_000
            )
            assert c.task.filters == 64 and c.train.steps == expected_steps
    with pytest.raises(Exception, match="variant"):
        load_config("omniglot:5w2s_maml")


@pytest.mark.parametrize(
    ("k", "algo"), [(5, "maml"), (10, "fomaml"), (20, "reptile"), (5, "pretrain")]
)
def test_sinusoid_variants(k, algo):
    c = load_config(f"sinusoid:k{k}_{algo}")
    assert c.task.shots == k and c.algorithm.name == algo
    assert c.train.meta_batch == 25 and c.task.hidden == (40, 40)


def test_sinusoid_tiny_pretrain(tmp_path):
    result = _train("sinusoid:tiny", tmp_path / "s", "algorithm.name=pretrain")
    loss = result["metrics"]["loss"]
    assert result["adaptation_steps"] == [0, 1, 2] and all(c > 0 for c in loss["ci95"])
    # Sinusoid amplitudes are U[0.1, 5]: a near-zero function's MSE is about E[A^2]/2 ~ 4.2.
    assert 1.0 < loss["mean"][0] < 10.0


@needs_data("omniglot")
@pytest.mark.parametrize("variant", ["tiny", "tiny_protonets", "tiny_reptile"])
def test_omniglot_tiny(tmp_path, variant):
    result = _train(f"omniglot:{variant}", tmp_path / variant)
    acc, loss = result["metrics"]["accuracy"], result["metrics"]["loss"]
    assert result["num_tasks"] == 8
    assert _on_grid(acc["mean"], 8 * 5 * 2)  # 8 tasks of 5 ways x 2 queries
    # Four meta-steps from a random init: still close to chance, cross-entropy near log 5.
    assert abs(loss["mean"][0] - math.log(5)) < 0.6
    if variant == "tiny_protonets":
        assert result["adaptation_steps"] == [0]
    else:
        assert result["adaptation_steps"] == [0, 1, 2]
        assert loss["mean"][2] < loss["mean"][0]  # adaptation fits the support set


def test_words_lm_tiny(tmp_path):
    # The pretrain variant: the cheapest Transformer compile that still runs the whole path
    # (the second-order one is covered by the Transformer MAML tests and by langid below).
    result = _train("words_lm:tiny_pretrain", tmp_path / "lm")
    loss, bpb = result["metrics"]["loss"], result["metrics"]["bits_per_byte"]
    # An almost untrained byte LM predicts nearly uniformly over 259 tokens.
    assert abs(loss["mean"][0] - math.log(259)) < 0.3
    # Bits per byte counts EOS information over byte targets only: above nats / ln 2.
    assert bpb["mean"][0] > loss["mean"][0] / math.log(2)
    assert loss["mean"][2] < loss["mean"][0]  # fine-tuning fits the language


def test_words_langid_tiny(tmp_path):
    langid = _train("words_langid:tiny", tmp_path / "id")
    acc = langid["metrics"]["accuracy"]["mean"]
    assert len(acc) == 3 and _on_grid(acc, 8 * 3 * 2)  # 8 tasks of 3 ways x 2 queries
    assert abs(langid["metrics"]["loss"]["mean"][0] - math.log(3)) < 0.5


@pytest.mark.parametrize(
    "spec",
    [
        "words_lm:maml",
        "words_lm:reptile",
        "words_lm:pretrain_gpu",
        "words_langid:5w5s_fomaml",
        "words_langid:5w1s_reptile_gpu",
    ],
)
def test_language_configs(spec):
    c = load_config(spec)
    algo = spec.split(":")[1].split("_")[-2 if spec.endswith("_gpu") else -1]
    assert c.algorithm.name == algo and c.task.max_len == 24
    assert c.task.width == (256 if spec.endswith("_gpu") else 64)
    if algo == "reptile":  # several inner steps, outer SGD on the pseudo-gradient
        assert c.algorithm.inner_steps >= 5 and c.optimizer.name == "sgd"


def test_translate_tiny_reports_chrf(tmp_path):
    result = _train("translate:tiny", tmp_path / "tr")
    metrics = result["metrics"]
    assert set(metrics) >= {"loss", "bits_per_byte", "chrf", "exact_match"}
    # Exact matches are whole queries (8 tasks x 2); a byte LM trained for a few steps
    # produces none and little of the references' character n-grams.
    assert _on_grid(metrics["exact_match"]["mean"], 8 * 2)
    assert metrics["exact_match"]["mean"][0] == 0.0 and metrics["chrf"]["mean"][0] < 50.0
    assert metrics["loss"]["mean"][2] < metrics["loss"]["mean"][0]
    # Validation languages, without the greedy decoding: the same losses' kind, no chrF.
    out = tmp_path / "val.json"
    args = ["eval", "--workdir", str(tmp_path / "tr"), "--output", str(out), *QUIET]
    sets = ["--set", "task.eval_split=validation", "eval.scores=false"]
    assert cli.main(args + sets) == 0
    val = json.loads(out.read_text())
    assert set(val["metrics"]) == {"loss", "bits_per_byte"}
    assert val["config"]["task"]["eval_split"] == "validation"
    assert val["metrics"]["loss"]["mean"] != metrics["loss"]["mean"]
    # chrF at some step counts only: the same numbers there, NaN elsewhere.
    sub = tmp_path / "sub.json"
    args = ["eval", "--workdir", str(tmp_path / "tr"), "--output", str(sub), *QUIET]
    assert cli.main(args + ["--set", "eval.score_steps=(0, 2)"]) == 0
    chrf = json.loads(sub.read_text())["metrics"]["chrf"]["mean"]
    assert math.isnan(chrf[1]) and chrf[::2] == metrics["chrf"]["mean"][::2]
    assert cli.main(args + ["--set", "eval.score_steps=(3,)"]) == 2  # beyond eval.inner_steps


@needs_data("fewrel")
def test_fewrel_tiny_protonets_then_eval_on_another_file(tmp_path):
    fewrel = data_dir("fewrel")
    workdir = tmp_path / "fr"
    result = _train("fewrel:tiny_protonets", workdir)
    assert _on_grid(result["metrics"]["accuracy"]["mean"], 4 * 3 * 2)  # 4 tasks, 3 ways x 2
    # Evaluation on any FewRel-format file: here the web-text relations instead of the news.
    code = cli.main(
        [
            "eval",
            "--workdir",
            str(workdir),
            "--set",
            f"task.test_files=('{fewrel / 'val_semeval.json'}',)",
            "task.train_files=('val_wiki.json',)",
            "task.val_files=('val_wiki.json',)",
        ]
    )
    assert code == 2  # the training files are fixed by training
    code = cli.main(
        [
            "eval",
            "--workdir",
            str(workdir),
            "--set",
            f"task.test_files=('{fewrel / 'val_semeval.json'}',)",
        ]
    )
    assert code == 0
    assert _eval(workdir)["config"]["task"]["test_files"] == [str(fewrel / "val_semeval.json")]

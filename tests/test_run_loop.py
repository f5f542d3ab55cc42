"""The train loop's dispatch forms (fused on-device sampling, prefetched host batches) equal
the plain form; a program-cache hit trains as a fresh trace does."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metajax.run import dispatch, loop, program_cache
from metajax.run.config import TrainConfig
from metajax.run.config_files import load_config
from metajax.run.logs import MetricsWindow, NonFiniteError
from metajax.run.pretrained_choice import MappedSource
from metajax.tasks.base import TaskSource
from metajax.tasks.fewrel import FewRel
from metajax.tasks.movies import MovieRatings
from metajax.tasks.omniglot import Omniglot
from metajax.tasks.sinusoid import Sinusoid
from metajax.tasks.text_encoding import FewRelTokens, TranslateTokens, WordTokens
from metajax.tasks.translate import Translate
from metajax.tasks.words import LanguageID, LanguageModeling

pytest.importorskip("flatbuffers", reason="jax.export serialisation needs flatbuffers")

SETS = [
    "train.steps=12",
    "train.log_every=4",
    "train.checkpoint_every=12",
    "eval.after_train=false",
]


def _train(workdir, *sets, **kwargs):
    notes = []
    config = load_config("sinusoid:tiny", [*SETS, *sets])
    state = loop.train(config, workdir, echo=notes.append, bar=False, **kwargs)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("steps_per_s")
    return jax.device_get(state), rows, notes


@pytest.fixture(autouse=True)
def _sources_never_newer(monkeypatch):
    # Others may edit a shared checkout while this runs; the guard has its own test.
    monkeypatch.setattr(program_cache, "_process_start", lambda: float("inf"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("ref") / "run", fast_path=False)


def _assert_close(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-6), a, b)


@pytest.mark.parametrize("traceable", [True, False], ids=["fused", "prefetched"])
def test_fast_path_equals_the_plain_loop(tmp_path, reference, monkeypatch, traceable):
    monkeypatch.setattr(Sinusoid, "traceable", traceable)
    state, rows, notes = _train(tmp_path / "run", program_cache_dir=None)
    ref_state, ref_rows, _ = reference
    assert int(state.step) == 12
    _assert_close(state, ref_state)
    assert [r["step"] for r in rows] == [4, 8, 12]
    for row, ref in zip(rows, ref_rows, strict=True):
        assert row == pytest.approx(ref, rel=1e-6)
    ready = [n for n in notes if "meta-step ready" in n]
    assert len(ready) == 1 and "(traced, not stored" in ready[0]
    assert ("4 meta-steps per dispatch" in ready[0]) == traceable
    plain_ready = [n for n in reference[2] if "meta-step ready" in n]
    assert len(plain_ready) == 1 and "(" not in plain_ready[0]


def test_program_cache_hit_equals_a_fresh_trace_and_a_changed_config_retraces(tmp_path, reference):
    cache = tmp_path / "cache"
    first, first_rows, first_notes = _train(tmp_path / "a", program_cache_dir=cache)
    again, again_rows, again_notes = _train(tmp_path / "b", program_cache_dir=cache)
    assert any("(traced;" in n for n in first_notes)
    assert any("(cached;" in n for n in again_notes)
    assert len(list(cache.glob("*" + program_cache.SUFFIX))) == 1
    jax.tree.map(np.testing.assert_array_equal, first, again)
    assert first_rows == again_rows
    _assert_close(again, reference[0])
    # Two inner steps is another program: a new entry, and the result of that program.
    two, _, notes = _train(tmp_path / "c", "algorithm.inner_steps=2", program_cache_dir=cache)
    assert any("(traced;" in n for n in notes)
    assert len(list(cache.glob("*" + program_cache.SUFFIX))) == 2
    plain_two, _, _ = _train(tmp_path / "d", "algorithm.inner_steps=2", fast_path=False)
    _assert_close(two, plain_two)
    assert (
        np.abs(
            two.meta_params["params"]["Dense_0"]["kernel"]
            - again.meta_params["params"]["Dense_0"]["kernel"]
        ).max()
        > 1e-4
    )


def test_the_form_follows_the_source_and_the_parallel_mode():
    tc = TrainConfig(steps=1000, log_every=200, checkpoint_every=400)
    host_side = MappedSource(Sinusoid(), lambda batch: batch)
    assert dispatch.choose_form(tc, Sinusoid(), 0, fast_path=True) == ("fused", 100)
    assert dispatch.choose_form(tc, Sinusoid(), 650, fast_path=True) == ("fused", 50)
    assert dispatch.choose_form(tc, host_side, 0, fast_path=True) == ("prefetched", 1)
    assert dispatch.choose_form(tc, Sinusoid(), 0, fast_path=False) == ("plain", 1)
    pmap = dataclasses.replace(tc, parallel="pmap")
    assert dispatch.choose_form(pmap, Sinusoid(), 0, fast_path=True) == ("plain", 1)


def test_every_source_declares_whether_it_traces():
    sources = [
        Sinusoid,
        Omniglot,
        FewRel,
        LanguageModeling,
        LanguageID,
        MovieRatings,
        Translate,
        WordTokens,
        FewRelTokens,
        TranslateTokens,
        MappedSource,
    ]
    assert all(TaskSource in cls.__mro__ for cls in sources)
    assert [cls.__name__ for cls in sources if cls.traceable] == ["Sinusoid"]


def test_key_differs_by_inner_steps_and_not_by_the_log_interval():
    def identity(*sets, steps=4):
        config = load_config("sinusoid:tiny", list(sets))
        return dispatch.program_identity(config, dispatch.Form("fused", steps))

    assert identity() != identity("algorithm.inner_steps=2")
    assert identity() == identity("train.log_every=7")
    assert identity() != identity(steps=2)


@pytest.mark.parametrize(
    "log_every, checkpoint_every, steps, start, expected",
    [
        (100, 5000, 30000, 0, 100),
        (20, 20, 200, 40, 20),
        (3, 4, 12, 0, 1),
        (4, 8, 30, 8, 2),
        (200, 400, 1000, 0, 100),
        (250, 500, 1000, 0, 50),
    ],
)
def test_steps_per_call_divides_every_boundary(log_every, checkpoint_every, steps, start, expected):
    tc = TrainConfig(steps=steps, log_every=log_every, checkpoint_every=checkpoint_every)
    assert dispatch.steps_per_call(tc, start) == expected


def test_step_window_means_and_names_the_bad_step():
    rng = np.random.default_rng(0)
    losses = rng.normal(size=10).astype(np.float32)
    stacked = MetricsWindow(0)
    stacked.add({"loss": jnp.asarray(losses[:4]), "grad_norm": jnp.asarray(2 * losses[:4])}, 4)
    for value in losses[4:]:
        stacked.add({"loss": jnp.asarray(value), "grad_norm": jnp.asarray(2 * value)})
    row = stacked.flush(10)
    assert row["step"] == 10
    np.testing.assert_allclose(row["loss"], np.mean(losses.astype(np.float64)), rtol=1e-6)
    np.testing.assert_allclose(row["grad_norm"], 2 * np.mean(losses.astype(np.float64)), rtol=1e-6)
    # Steps 11..14 in one entry, 15..18 in the next; step 17's grad_norm is NaN.
    bad = np.ones(4, np.float32)
    bad[2] = np.nan
    stacked.add({"loss": jnp.ones(4), "grad_norm": jnp.ones(4)}, 4)
    stacked.add({"loss": jnp.ones(4), "grad_norm": jnp.asarray(bad)}, 4)
    with pytest.raises(NonFiniteError, match=r"step 17: meta-train metric 'grad_norm' is nan"):
        stacked.check()


def test_nan_inside_a_fused_dispatch_names_its_step(tmp_path):
    # 4 good steps, then (resumed) a rate that blows up at step 6, inside dispatch 5..8.
    sets = ["train.log_every=4", "train.checkpoint_every=4"]
    _train(tmp_path / "run", "train.steps=4", *sets, program_cache_dir=None)
    config = load_config("sinusoid:tiny", [*SETS, *sets, "optimizer.lr=1e30"])
    with pytest.raises(NonFiniteError, match=r"^step 6: meta-train metric .* is (inf|nan)"):
        loop.train(
            config,
            tmp_path / "run",
            echo=lambda *_: None,
            bar=False,
            allow_changes=True,
            program_cache_dir=None,
        )
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["4"]

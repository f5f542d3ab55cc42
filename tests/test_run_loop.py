"""The train loop's fast path (fused on-device sampling, prefetched host batches) equals the
plain loop; the step cache returns what a fresh trace does and never runs a stale program."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metajax.run import loop, step_cache, stored_executables
from metajax.run.config import TrainConfig
from metajax.run.config_files import load_config
from metajax.run.logs import MetricsWindow, NonFiniteError
from metajax.tasks.sinusoid import Sinusoid

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
    monkeypatch.setattr(step_cache, "_process_start", lambda: float("inf"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("ref") / "run", fast_path=False)


def _assert_close(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-6), a, b)


@pytest.mark.parametrize("traceable", [True, False], ids=["fused", "prefetched"])
def test_fast_path_equals_the_plain_loop(tmp_path, reference, monkeypatch, traceable):
    monkeypatch.setattr(Sinusoid, "traceable", traceable)
    state, rows, notes = _train(tmp_path / "run", step_cache_dir=None)
    ref_state, ref_rows, _ = reference
    assert int(state.step) == 12
    _assert_close(state, ref_state)
    assert [r["step"] for r in rows] == [4, 8, 12]
    for row, ref in zip(rows, ref_rows, strict=True):
        assert row == pytest.approx(ref, rel=1e-6)
    ready = [n for n in notes if "meta-step ready" in n]
    assert len(ready) == 1 and ("4 meta-steps per dispatch" in ready[0]) == traceable


def test_step_cache_hit_equals_a_fresh_trace_and_a_changed_config_retraces(tmp_path, reference):
    cache = tmp_path / "cache"
    first, first_rows, first_notes = _train(tmp_path / "a", step_cache_dir=cache)
    again, again_rows, again_notes = _train(tmp_path / "b", step_cache_dir=cache)
    assert any("(traced;" in n for n in first_notes)
    assert any("(cached;" in n for n in again_notes)
    assert len(list(cache.glob("*" + step_cache.SUFFIX))) == 1
    jax.tree.map(np.testing.assert_array_equal, first, again)
    assert first_rows == again_rows
    _assert_close(again, reference[0])
    # Two inner steps is another program: a new entry, and the result of that program.
    two, _, notes = _train(tmp_path / "c", "algorithm.inner_steps=2", step_cache_dir=cache)
    assert any("(traced;" in n for n in notes)
    assert len(list(cache.glob("*" + step_cache.SUFFIX))) == 2
    plain_two, _, _ = _train(tmp_path / "d", "algorithm.inner_steps=2", fast_path=False)
    _assert_close(two, plain_two)
    assert (
        np.abs(
            two.meta_params["params"]["Dense_0"]["kernel"]
            - again.meta_params["params"]["Dense_0"]["kernel"]
        ).max()
        > 1e-4
    )


def _toy(state, x):
    new = {"w": state["w"] - 0.1 * x * state["w"], "n": state["n"] + 1}
    return new, {"loss": jnp.sum(new["w"] ** 2)}


def _toy_step(tmp_path, identity, w=1.0):
    state = {"w": jnp.full((3,), w), "n": jnp.zeros((), jnp.int32)}
    x = jnp.arange(3.0)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    step, how = step_cache.cached_step(
        _toy, state, x, metric_sharding=sharding, identity=identity, directory=tmp_path
    )
    return step, how, state, x


def test_cached_step_keys_and_donation(tmp_path, monkeypatch):
    step, how, state, x = _toy_step(tmp_path, {"lr": 0.1})
    assert how == "traced"
    new, metrics = step(state, x)
    assert state["w"].is_deleted()  # the state is donated, as by the plain train step
    np.testing.assert_allclose(new["w"], [1.0, 0.9, 0.8])
    assert float(metrics["loss"]) == pytest.approx(2.45)
    step, how, state, x = _toy_step(tmp_path, {"lr": 0.1}, w=2.0)
    assert how == "cached"
    assert float(step(state, x)[1]["loss"]) == pytest.approx(4 * 2.45)
    # Another identity, another jax version: other keys, never the stored program.
    assert _toy_step(tmp_path, {"lr": 0.2})[1] == "traced"
    real = step_cache._version
    monkeypatch.setattr(step_cache, "_version", lambda p: real(p) + ("+other" * (p == "jax")))
    assert _toy_step(tmp_path, {"lr": 0.1})[1] == "traced"
    monkeypatch.setattr(step_cache, "_version", real)
    # Sources edited after this process started: the code it runs may not be on disk.
    monkeypatch.setattr(step_cache, "_process_start", lambda: 0.0)
    assert step_cache.source_digest() is None
    assert _toy_step(tmp_path, {"lr": 0.1})[1] == "traced, not cached"
    monkeypatch.setattr(step_cache, "_process_start", lambda: float("inf"))
    # Files under the right names whose stored keys differ (a collision, a copied file).
    for suffix in (step_cache.SUFFIX, stored_executables.SUFFIX):
        files = sorted(tmp_path.glob("*" + suffix))
        assert len(files) == 3
        blobs = {f: f.read_bytes() for f in files}
        for f in files:
            other = next(g for g in files if g != f)
            f.write_bytes(blobs[other])
    assert _toy_step(tmp_path, {"lr": 0.1})[1] == "traced"


def test_stored_executable_is_keyed_by_the_compiler_and_skipped_when_it_cannot_load(
    tmp_path, monkeypatch
):
    assert _toy_step(tmp_path, {"lr": 0.1})[1] == "traced"
    assert _toy_step(tmp_path, {"lr": 0.1})[1] == "cached"
    # Other XLA flags compile other code: the traced program is reused, the executable not.
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    assert _toy_step(tmp_path, {"lr": 0.1})[1] == "cached program"
    monkeypatch.delenv("XLA_FLAGS")
    exe_files = sorted(tmp_path.glob("*" + stored_executables.SUFFIX))
    assert len(exe_files) == 2
    # A file that no longer loads (another runtime) is ignored, then replaced.
    for f in exe_files:
        header = f.read_bytes().partition(b"\n")[0]
        f.write_bytes(header + b"\nnot a pickle")
    step, how, state, x = _toy_step(tmp_path, {"lr": 0.1})
    assert how == "cached program"
    assert float(step(state, x)[1]["loss"]) == pytest.approx(2.45)
    assert _toy_step(tmp_path, {"lr": 0.1})[1] == "cached"


def _solve(state, x):
    # jnp.linalg.solve lowers to a LAPACK custom call on the CPU.
    a = jnp.eye(3) * (2.0 + x[:, None])
    new = {"w": jnp.linalg.solve(a, state["w"]), "n": state["n"] + 1}
    return new, {"loss": jnp.sum(new["w"] ** 2)}


def test_a_program_with_custom_calls_keeps_only_its_traced_program(tmp_path):
    state = {"w": jnp.ones(3), "n": jnp.zeros((), jnp.int32)}
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    hows = []
    for _ in range(2):
        step, how = step_cache.cached_step(
            _solve,
            dict(state),
            jnp.arange(3.0),
            metric_sharding=sharding,
            identity={"solve": 1},
            directory=tmp_path,
        )
        hows.append(how)
    assert hows == ["traced", "cached program"]
    assert not list(tmp_path.glob("*" + stored_executables.SUFFIX))
    new, _ = step(dict(state), jnp.arange(3.0))
    np.testing.assert_allclose(new["w"], [1 / 2, 1 / 3, 1 / 4], rtol=1e-6)


def test_key_differs_by_inner_steps_and_not_by_the_log_interval():
    def identity(*sets, steps=4):
        return step_cache.program_identity(load_config("sinusoid:tiny", list(sets)), "fused", steps)

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
    assert step_cache.steps_per_call(tc, start) == expected


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
    _train(tmp_path / "run", "train.steps=4", *sets, step_cache_dir=None)
    config = load_config("sinusoid:tiny", [*SETS, *sets, "optimizer.lr=1e30"])
    with pytest.raises(NonFiniteError, match=r"^step 6: meta-train metric .* is (inf|nan)"):
        loop.train(
            config,
            tmp_path / "run",
            echo=lambda *_: None,
            bar=False,
            allow_changes=True,
            step_cache_dir=None,
        )
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["4"]

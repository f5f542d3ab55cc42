"""The program cache returns what a fresh trace does, donates the state, and never runs a
program stored under another key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metajax.run import program_cache

pytest.importorskip("flatbuffers", reason="jax.export serialisation needs flatbuffers")


@pytest.fixture(autouse=True)
def _sources_never_newer(monkeypatch):
    # Others may edit a shared checkout while this runs; the guard has its own test.
    monkeypatch.setattr(program_cache, "_process_start", lambda: float("inf"))


def _toy(state, x):
    new = {"w": state["w"] - 0.1 * x * state["w"], "n": state["n"] + 1}
    return new, {"loss": jnp.sum(new["w"] ** 2)}


def _toy_step(directory, identity, w=1.0):
    state = {"w": jnp.full((3,), w), "n": jnp.zeros((), jnp.int32)}
    x = jnp.arange(3.0)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    step, how = program_cache.compiled_step(
        _toy, state, x, metric_sharding=sharding, identity=identity, directory=directory
    )
    return step, how, state, x


def test_a_hit_runs_the_stored_program_and_donates_the_state(tmp_path):
    step, how, state, x = _toy_step(tmp_path, {"lr": 0.1})
    assert how == "traced"
    new, metrics = step(state, x)
    assert state["w"].is_deleted()  # the state is donated, as by the plain train step
    np.testing.assert_allclose(new["w"], [1.0, 0.9, 0.8])
    assert float(metrics["loss"]) == pytest.approx(2.45)
    assert int(new["n"]) == 1
    step, how, state, x = _toy_step(tmp_path, {"lr": 0.1}, w=2.0)
    assert how == "cached"
    assert float(step(state, x)[1]["loss"]) == pytest.approx(4 * 2.45)
    assert len(list(tmp_path.glob("*" + program_cache.SUFFIX))) == 1


def test_no_folder_traces_and_stores_nothing(tmp_path):
    step, how, state, x = _toy_step(None, {"lr": 0.1})
    assert how == "traced, not stored"
    assert float(step(state, x)[1]["loss"]) == pytest.approx(2.45)


def test_other_keys_never_read_the_stored_program(tmp_path, monkeypatch):
    assert _toy_step(tmp_path, {"lr": 0.1})[1] == "traced"
    # Another identity, another jax version: other keys, never the stored program.
    assert _toy_step(tmp_path, {"lr": 0.2})[1] == "traced"
    real = program_cache._version
    monkeypatch.setattr(program_cache, "_version", lambda p: real(p) + ("+other" * (p == "jax")))
    assert _toy_step(tmp_path, {"lr": 0.1})[1] == "traced"
    monkeypatch.setattr(program_cache, "_version", real)
    # Sources edited after this process started: the code it runs may not be on disk.
    monkeypatch.setattr(program_cache, "_process_start", lambda: 0.0)
    assert program_cache.source_digest() is None
    assert _toy_step(tmp_path, {"lr": 0.1})[1] == "traced, not stored"
    monkeypatch.setattr(program_cache, "_process_start", lambda: float("inf"))
    # Files under the right names whose stored keys differ (a collision, a copied file).
    files = sorted(tmp_path.glob("*" + program_cache.SUFFIX))
    assert len(files) == 3
    blobs = {f: f.read_bytes() for f in files}
    for f in files:
        other = next(g for g in files if g != f)
        f.write_bytes(blobs[other])
    assert _toy_step(tmp_path, {"lr": 0.1})[1] == "traced"


def _solve(state, x):
    # jnp.linalg.solve lowers to a LAPACK custom call on the CPU.
    a = jnp.eye(3) * (2.0 + x[:, None])
    new = {"w": jnp.linalg.solve(a, state["w"]), "n": state["n"] + 1}
    return new, {"loss": jnp.sum(new["w"] ** 2)}


def test_a_program_with_a_custom_call_runs_from_the_cache(tmp_path):
    state = {"w": jnp.ones(3), "n": jnp.zeros((), jnp.int32)}
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    hows = []
    for _ in range(2):
        step, how = program_cache.compiled_step(
            _solve,
            dict(state),
            jnp.arange(3.0),
            metric_sharding=sharding,
            identity={"solve": 1},
            directory=tmp_path,
        )
        hows.append(how)
    assert hows == ["traced", "cached"]
    new, _ = step(dict(state), jnp.arange(3.0))
    np.testing.assert_allclose(new["w"], [1 / 2, 1 / 3, 1 / 4], rtol=1e-6)


def test_a_step_that_cannot_be_exported_runs_uncached(tmp_path, capsys):
    def with_callback(state, x):
        new, metrics = _toy(state, x)
        jax.debug.callback(lambda n: None, new["n"])
        return new, metrics

    state = {"w": jnp.ones(3), "n": jnp.zeros((), jnp.int32)}
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    step, how = program_cache.compiled_step(
        with_callback,
        state,
        jnp.arange(3.0),
        metric_sharding=sharding,
        identity={"callback": 1},
        directory=tmp_path,
    )
    assert how == "traced, not stored"
    assert "cannot be exported" in capsys.readouterr().err
    assert not list(tmp_path.glob("*" + program_cache.SUFFIX))
    new, metrics = step(state, jnp.arange(3.0))
    assert float(metrics["loss"]) == pytest.approx(2.45)

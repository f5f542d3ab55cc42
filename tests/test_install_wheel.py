"""metajax as a user installs it: the wheel built from these sources, installed with pip into
a fresh virtual environment outside the repository, run from another folder."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Installing jax and the rest takes 30 to 60 s with pip's cache warm: long, but only a real
# install checks that the dependencies and extras declared in pyproject.toml are enough.
PIP_TIMEOUT = 900


def _run(args, cwd, env, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of what it is made of: setuptools stages an in-tree build
    in ``build/``, which would keep modules deleted from the checkout since the last build."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT / "metajax", src / "metajax", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    args = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp / "dist", src]
    _ok(_run(args, tmp, os.environ.copy(), PIP_TIMEOUT))
    (built,) = (tmp / "dist").glob("metajax-*.whl")
    return built


@pytest.mark.slow
def test_the_wheel_installs_and_trains_from_any_folder(wheel, tmp_path):
    venv, elsewhere = tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    python, metajax = venv / "bin" / "python", venv / "bin" / "metajax"
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _ok(_run([sys.executable, "-m", "venv", venv], tmp_path, env))

    # The bare install: the primitives only, from the venv's own copy of metajax.
    _ok(_run([*pip, wheel], tmp_path, env, PIP_TIMEOUT))
    probe = (
        "import importlib.util, metajax as mj; from metajax.models import ConvNet, MLP; "
        "mj.maml, mj.reptile, mj.adapt; print(mj.__file__); "
        "print(*(importlib.util.find_spec(m) is None for m in ('tqdm', 'wordfreq', 'babel', "
        "'tensorflow_datasets', 'safetensors')))"
    )
    where, absent = _ok(_run([python, "-c", probe], elsewhere, env)).split("\n")[:2]
    assert Path(where).is_relative_to(venv) and "site-packages" in where
    assert absent == "True True True True True"  # the extras' packages are not there
    # The runner without its extra: one line naming it, nothing written.
    run = _run([metajax, "train", "sinusoid:tiny", "--workdir", elsewhere / "w"], elsewhere, env)
    assert run.returncode == 2
    assert run.stderr.strip() == "metajax: metajax train needs tqdm: pip install 'metajax[run]'"
    assert not (elsewhere / "w").exists()

    # With [run]: the packaged configs, found from a folder that has none.
    _ok(_run([*pip, f"{wheel}[run]"], tmp_path, env, PIP_TIMEOUT))
    listing = _ok(_run([metajax, "list"], elsewhere, env))
    for name in ("sinusoid", "omniglot", "fewrel", "translate", "words_lm", "movies"):
        assert f"\n  {name}: " in listing
    train = [metajax, "train", "sinusoid:tiny", "--workdir", elsewhere / "w", "--no-progress"]
    _ok(_run(train, elsewhere, env, timeout=600))
    result = json.loads((elsewhere / "w" / "eval.json").read_text())
    loss = result["metrics"]["loss"]["mean"]
    assert result["adaptation_steps"] == [0, 1, 2] and all(math.isfinite(v) for v in loss)
    # Sinusoid amplitudes are U[0.1, 5]: a near-zero function's MSE is about E[A^2]/2 ~ 4.2.
    assert 0.5 < loss[0] < 10.0

    # A family whose extra is missing, and a variant that needs the checkout's test model.
    words = _run([metajax, "train", "words_langid:tiny", "--workdir", "x"], elsewhere, env)
    assert words.returncode == 2
    assert words.stderr.strip().endswith(
        "task family words_langid needs wordfreq: pip install 'metajax[text]'"
    )
    gpt2 = _run([metajax, "train", "words_lm:gpt2_tiny", "--workdir", "x"], elsewhere, env)
    assert gpt2.returncode == 2 and "tests/fixtures/gpt2_tiny of a metajax source" in gpt2.stderr
    assert len(gpt2.stderr.strip().splitlines()) == 1 and not (elsewhere / "x").exists()


def test_ci_runs_the_readme_commands_as_written():
    readme = (ROOT / "README.md").read_text()
    quick, tests = [
        line.strip() for line in readme.splitlines() if line.startswith("    python3 -m venv")
    ][:2]
    # The quick start runs the CLI, which needs the [run] extra; the tests need everything.
    assert "pip install -q -e '.[run]'" in quick and "metajax train sinusoid" in quick
    assert "pip install -q -e '.[test]'" in tests and "pytest -n 2" in tests
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert tests in ci

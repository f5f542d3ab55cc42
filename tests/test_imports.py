"""``import metajax`` gives the primitives only; no module imports the runner from below;
every optional dependency is named with the pip extra that installs it."""

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

from metajax._extras import EXTRAS

PACKAGE = Path(__file__).resolve().parents[1] / "metajax"
# jax itself imports flatbuffers where it is installed.
HEAVY = tuple(m for m in EXTRAS if m != "flatbuffers")
# What `pip install metajax` brings: its dependencies (ml_dtypes is jax's own).
BASE = {"jax", "jaxlib", "flax", "optax", "chex", "numpy", "ml_dtypes", "metajax"}


def test_import_metajax_loads_no_runner_dependency():
    code = (
        "import sys, metajax; print(sorted({m.split('.')[0] for m in sys.modules} & "
        f"set({HEAVY!r})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "[]"
    code = "import sys, metajax; print('metajax.run' in sys.modules)"
    assert (
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()
        == "False"
    )


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _importers(package: str, allowed: tuple[str, ...]) -> list[str]:
    """Modules outside ``allowed`` (top-level folders of metajax/) that import ``package``."""
    return [
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if p.relative_to(PACKAGE).parts[0] not in allowed
        and any(n == package or n.startswith(package + ".") for n in _imports(p))
    ]


def test_only_the_runner_and_the_configs_import_the_runner():
    # The configs sit on top of the runner (they build its Config); nothing imports them.
    assert _importers("metajax.run", ("run", "configs")) == []
    assert _importers("metajax.configs", ("configs",)) == []


def test_every_third_party_import_is_a_dependency_or_in_an_extra():
    tops = {n.split(".")[0] for p in PACKAGE.rglob("*.py") for n in _imports(p)}
    optional = tops - set(sys.stdlib_module_names) - BASE
    assert optional and optional <= set(EXTRAS), optional - set(EXTRAS)
    extras = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert set(EXTRAS.values()) <= set(extras)
    # Each extra lists the distribution of each module it is named for.
    dist = {"PIL": "pillow", "orbax": "orbax-checkpoint", "tensorflow_datasets": "tensorflow-"}
    for module, extra in EXTRAS.items():
        name = dist.get(module, module).lower()
        assert any(r.lower().startswith(name) for r in extras[extra]), (module, extra)


def test_the_config_schema_is_a_leaf():
    assert not [n for n in _imports(PACKAGE / "run" / "config.py") if n.startswith("metajax")]


def test_loading_and_evaluating_a_workdir_imports_no_train_loop():
    code = (
        "import sys; import metajax.run.predict, metajax.run.evaluate; "
        "print('metajax.run.loop' in sys.modules, 'metajax.run.dispatch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "False False"

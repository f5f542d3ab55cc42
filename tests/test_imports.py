"""``import metajax`` gives the primitives only; no module imports the runner from below."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "metajax"
HEAVY = (
    "orbax",
    "tensorflow_datasets",
    "matplotlib",
    "tqdm",
    "wordfreq",
    "safetensors",
    "tokenizers",
    "babel",
    "sacrebleu",
)


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


def test_only_the_runner_imports_the_runner():
    offenders = [
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if "run" not in p.relative_to(PACKAGE).parts[:1]
        and any(n == "metajax.run" or n.startswith("metajax.run.") for n in _imports(p))
    ]
    assert offenders == []


def test_the_config_schema_is_a_leaf():
    assert not [n for n in _imports(PACKAGE / "run" / "config.py") if n.startswith("metajax")]

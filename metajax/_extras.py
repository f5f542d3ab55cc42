"""Which pip extra installs each optional dependency, and the one-line error naming it.

``pip install metajax`` brings only what the primitives need; the runner, the data of each
task family and the pretrained-checkpoint readers come with extras (``pyproject.toml``).
"""

from __future__ import annotations

import importlib.util

# Top-level module name -> the extra that installs it.
EXTRAS = {
    "tqdm": "run",
    "orbax": "run",
    "matplotlib": "run",
    "flatbuffers": "run",
    "PIL": "omniglot",
    "tensorflow_datasets": "omniglot",
    "array_record": "omniglot",
    "wordfreq": "text",
    "babel": "text",
    "sacrebleu": "text",
    "safetensors": "pretrained",
    "tokenizers": "pretrained",
    "gguf": "pretrained",
}


class MissingExtraError(ModuleNotFoundError):
    """An optional dependency is not installed; the message names the pip extra."""


def install_command(module: str) -> str:
    """``pip install 'metajax[<extra>]'`` for the extra that installs ``module``."""
    return f"pip install 'metajax[{EXTRAS.get(module.partition('.')[0], 'all')}]'"


def require(modules: tuple[str, ...], purpose: str) -> None:
    """Checks, without importing them, that ``modules`` are installed.

    Raises:
      MissingExtraError: ``"<purpose> needs <module>: pip install 'metajax[<extra>]'"`` for
        the first one missing.
    """
    for module in modules:
        if importlib.util.find_spec(module.partition(".")[0]) is None:
            message = f"{purpose} needs {module}: {install_command(module)}"
            raise MissingExtraError(message, name=module.partition(".")[0])


def hint(error: ModuleNotFoundError) -> str | None:
    """The one-line message for a failed import of a known optional dependency, else none."""
    top = (error.name or "").partition(".")[0]
    if top not in EXTRAS:
        return None
    return f"{top} is not installed: {install_command(top)}"

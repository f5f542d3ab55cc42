"""Task distributions: every one a :class:`TaskSource`, ``sample(step, num_tasks, first_task)``.

``Omniglot`` is imported lazily: it pulls in tensorflow_datasets (about a second), which users
of the other sources should not pay for.
"""

from metajax.tasks.base import SPLIT_IDS, TaskSource, split_id, task_rng
from metajax.tasks.languages import FAMILIES
from metajax.tasks.prefetch import prefetch
from metajax.tasks.sinusoid import Sinusoid
from metajax.tasks.words import (
    BOS,
    EOS,
    PAD,
    VOCAB_SIZE,
    LanguageID,
    LanguageModeling,
)

_LAZY = {"Omniglot": "metajax.tasks.omniglot", "prepare_omniglot": "metajax.tasks.omniglot_builder"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(_LAZY[name])
        return getattr(module, "prepare" if name == "prepare_omniglot" else name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BOS",
    "EOS",
    "FAMILIES",
    "PAD",
    "SPLIT_IDS",
    "VOCAB_SIZE",
    "LanguageID",
    "LanguageModeling",
    "Omniglot",
    "Sinusoid",
    "TaskSource",
    "prefetch",
    "prepare_omniglot",
    "split_id",
    "task_rng",
]

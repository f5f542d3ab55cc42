"""The packaged experiment configs, one file per experiment: ``metajax train NAME[:VARIANT]``.

Each file defines ``get_config(variant) -> Config`` and lists its variants in ``VARIANTS``;
``metajax.run.config_files`` finds them by name after a user's own folders.
"""

from __future__ import annotations

from pathlib import Path

from metajax.run.config import ConfigError

# Two levels up from metajax/configs/ is the source checkout, when there is one.
_CHECKOUT_FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures"


def checkout_fixture(name: str) -> str:
    """The folder ``tests/fixtures/<name>`` of a metajax source checkout.

    The ``*gpt2_tiny*`` variants train the committed random-weights test model for a few
    steps; the wheel does not ship the tests, so an installed copy refuses them by name.

    Raises:
      ConfigError: no checkout holds the fixture.
    """
    path = _CHECKOUT_FIXTURES / name
    if not path.is_dir():
        raise ConfigError(
            f"this variant trains the test model tests/fixtures/{name} of a metajax source "
            "checkout, absent here: run it from a clone of the repository."
        )
    return str(path)

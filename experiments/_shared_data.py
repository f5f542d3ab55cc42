"""The project's copy of the data, ``../shared/data`` beside the repository, as the default
of metajax's data variables for the scripts here; a variable already set wins.

metajax itself reads data folders from a config or these variables only.
"""

from __future__ import annotations

import os
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
VARIABLES = {
    "METAJAX_OMNIGLOT_DIR": "omniglot",
    "METAJAX_FEWREL_DIR": "fewrel",
    "METAJAX_MOVIETWEETINGS_DIR": "movietweetings",
}


def use_shared_data() -> None:
    """Sets each unset variable to its folder under ``../shared/data``, where that exists."""
    for variable, name in VARIABLES.items():
        if (SHARED_DATA / name).is_dir():
            os.environ.setdefault(variable, str(SHARED_DATA / name))

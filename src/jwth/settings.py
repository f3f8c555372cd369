"""Project-wide settings: where the data lives.

The data root is found, in order, from the environment variable ``JWTH_DATA_ROOT``
or from a ``shared/data`` folder beside the working directory or beside the
repository checkout (``../shared/data``). Nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_DATA_ROOT = "JWTH_DATA_ROOT"


def _candidates() -> list[Path]:
    here = Path(__file__).resolve()
    cands = [Path.cwd() / ".." / "shared" / "data", Path.cwd() / "shared" / "data"]
    # src/jwth/settings.py -> repository root is parents[2]
    if len(here.parents) > 2:
        cands.append(here.parents[2] / ".." / "shared" / "data")
    return cands


def data_root(required: bool = True) -> Path | None:
    """Return the folder holding the bundled data sets.

    Args:
        required: raise when no data root is found (otherwise return None).

    Returns:
        The resolved data root (a folder with ``tcga_crc_msi/`` etc.), or None.

    Raises:
        FileNotFoundError: ``JWTH_DATA_ROOT`` names a missing folder, or nothing was
            found and ``required`` is true. The message names the setting to use.
    """
    env = os.environ.get(ENV_DATA_ROOT)
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(
                f"{ENV_DATA_ROOT}={env!r} is not a folder. Point it at the folder that "
                "holds the data sets (e.g. the one containing tcga_crc_msi/)."
            )
        return p.resolve()
    for c in _candidates():
        if c.is_dir():
            return c.resolve()
    if required:
        raise FileNotFoundError(
            "No data root found: set the environment variable "
            f"{ENV_DATA_ROOT}=/path/to/data (the folder containing tcga_crc_msi/), "
            "or run from a checkout that has ../shared/data beside it."
        )
    return None


def dataset_dir(name: str) -> Path:
    """Return ``data_root()/name``, or raise FileNotFoundError naming what is missing."""
    root = data_root()
    d = root / name
    if not d.is_dir():
        avail = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise FileNotFoundError(f"Data set {name!r} not found under {root}; available: {avail}")
    return d

"""Configuration: the packaged default YAML, merged with a user YAML and ``key=value``.

As in the DINOv2 training code, a run's config is the default
(``jwth/configs/pretrain_default.yaml``) updated by an optional YAML file and by
command-line overrides ``section.key=value`` (values parsed as YAML, so
``optim.batch_size=32``, ``crops.global_crops_scale=[0.4,1.0]``,
``model.init=null`` all work). The resolved config is saved with every run.
An unknown key, in the file or an override, raises :class:`ConfigError` listing the
valid keys.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import yaml

# Mappings whose keys are free-form (passed through to another library).
OPEN_KEYS = {"model.kwargs"}


class ConfigError(KeyError):
    """An unknown or malformed configuration key."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


def default_config() -> dict:
    """The packaged default configuration as a nested dict (a fresh copy)."""
    text = resources.files("jwth").joinpath("configs", "pretrain_default.yaml").read_text()
    return yaml.safe_load(text)


def flat_keys(cfg: dict, prefix: str = "") -> list[str]:
    """Dotted names of all leaf keys (open mappings count as leaves)."""
    out = []
    for k, v in cfg.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and name not in OPEN_KEYS:
            out += flat_keys(v, name + ".")
        else:
            out.append(name)
    return out


def _unknown(key: str, base: dict) -> ConfigError:
    import difflib

    keys = flat_keys(base)
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    guess = f" Did you mean {' or '.join(repr(k) for k in close)}?" if close else ""
    return ConfigError(f"Unknown config key {key!r}.{guess} Valid keys: {', '.join(keys)}")


def merge(base: dict, update: dict, prefix: str = "", root: dict | None = None) -> dict:
    """Recursively merge ``update`` into a copy of ``base``; unknown keys raise ConfigError."""
    root = base if root is None else root
    out = copy.deepcopy(base)
    for k, v in (update or {}).items():
        name = f"{prefix}{k}"
        if k not in out:
            raise _unknown(name, root)
        if isinstance(out[k], dict) and name not in OPEN_KEYS:
            if not isinstance(v, dict):
                raise ConfigError(f"Config key {name!r} is a section; give sub-keys ({', '.join(out[k])})")
            out[k] = merge(out[k], v, name + ".", root)
        else:
            out[k] = _check_type(name, out[k], v)
    return out


def _check_type(name: str, default: Any, value: Any) -> Any:
    """``value`` if it has the kind of the key's default (a number for numbers, a bool for
    bools, a list for lists, a string for strings; null always); else ConfigError naming the
    key, the kind needed and the value."""
    if value is None or default is None or name in OPEN_KEYS:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, (int, float)):  # numbers (epochs may be fractional)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple))
    elif isinstance(default, str):
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        raise ConfigError(
            f"Config key {name!r} needs a {'number' if isinstance(default, (int, float)) and not isinstance(default, bool) else type(default).__name__} "
            f"(default {default!r}), got {value!r}.")
    return float(value) if isinstance(default, float) else value


def parse_overrides(items: Iterable[str]) -> dict:
    """``["a.b=1", "c.d=[1,2]"]`` -> nested dict with YAML-parsed values.

    Raises:
        ConfigError: an item without ``=``.
    """
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"Override {item!r} must look like section.key=value")
        key, val = item.split("=", 1)
        parts = key.strip().split(".")
        d = out
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = yaml.safe_load(val) if val.strip() != "" else None
    return out


def load_config(path: str | Path | None = None, overrides: Iterable[str] = (), base: dict | None = None) -> dict:
    """Resolve a run configuration.

    Args:
        path: optional YAML file with a subset of the keys.
        overrides: ``section.key=value`` strings applied last.
        base: start from this config instead of the packaged default (used by
            ``posttrain``, which starts from the pretraining run's saved config).

    Returns:
        The merged nested dict.

    Raises:
        ConfigError: an unknown key (the message lists all valid keys).
        FileNotFoundError: ``path`` does not exist.
    """
    cfg = copy.deepcopy(base) if base is not None else default_config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"Config file not found: {p}")
        cfg = merge(cfg, yaml.safe_load(p.read_text()) or {})
    return merge(cfg, parse_overrides(overrides))


def save_config(cfg: dict, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(cfg, sort_keys=False))


def get(cfg: dict, dotted: str) -> Any:
    """``get(cfg, "optim.batch_size")``."""
    d: Any = cfg
    for p in dotted.split("."):
        d = d[p]
    return d


#: sections and keys that may change when a run is resumed (how it runs, not what it learns;
#: model.init only seeds a run's first step: a resumed run's weights come from its checkpoint)
RESUMABLE_SECTIONS = ("train", "monitor", "model.init")


def config_changes(old: dict, new: dict, ignore: Iterable[str] = RESUMABLE_SECTIONS) -> list[str]:
    """``"key: old -> new"`` for every leaf key whose value differs between two resolved
    configs, outside the ``ignore`` sections and keys; keys present in only one count as changed."""
    keys = sorted(set(flat_keys(old)) | set(flat_keys(new)))
    out = []
    for k in keys:
        if k in ignore or k.split(".", 1)[0] in ignore:
            continue
        try:
            a = get(old, k)
        except (KeyError, TypeError):
            a = "<absent>"
        try:
            b = get(new, k)
        except (KeyError, TypeError):
            b = "<absent>"
        if a != b and not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)):
            out.append(f"{k}: {a!r} -> {b!r}")
    return out

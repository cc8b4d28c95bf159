"""How a config check fails: a ConfigError that names the key and the value."""

from __future__ import annotations

import importlib.util

from finqa_exp.errors import BadInput


class ConfigError(BadInput, ValueError):
    """A configuration value is out of range or inconsistent. The message names key and value."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _module_exists(name: str) -> bool:
    # find_spec locates a module without running it (only its parent packages are imported).
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False

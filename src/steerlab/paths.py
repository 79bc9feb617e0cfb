"""Where steerlab keeps files on the user's machine (no side effects at import)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


def cache_dir() -> Path:
    """Converted model weights. ``STEERLAB_CACHE_DIR`` overrides."""
    env = os.environ.get("STEERLAB_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "steerlab"


def default_vectors_dir() -> Path:
    """Built vectors. ``STEERLAB_VECTORS`` overrides."""
    env = os.environ.get("STEERLAB_VECTORS")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base).expanduser() / "steerlab" / "vectors"


def user_personas_dir() -> Path:
    """User persona files (``*.toml``), searched after the built-in ones."""
    env = os.environ.get("STEERLAB_PERSONAS")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base).expanduser() / "steerlab" / "personas"


def wheel_file(package: str, relative: str, *, missing: str, reinstall: str) -> Path:
    """A file shipped inside an installed wheel, found without importing the package.

    The model wheels' ``__init__`` modules import packages steerlab does not install.
    ``missing``: the error when the package is absent; ``reinstall``: the command that repairs it.
    """
    from .errors import ModelLoadError

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.origin:
        raise ModelLoadError(missing)
    path = Path(spec.origin).parent / relative
    if not path.exists():
        raise ModelLoadError(f"{path} is missing: reinstall with `{reinstall}`")
    return path

"""An on-disk cache for expensive results (trained weights, learned curves).

A result is stored as ``<cache dir>/<kind>-<digest>.pt`` where the digest is a hash of a JSON
key holding everything that determines the result; the key is also stored inside the file and
checked when it is read. Files are written atomically (temporary file + ``os.replace``), so an
interrupted run never leaves a half-written entry under the real name. A file that cannot be
read or does not match is reported as :class:`CacheError` naming the file — it is never used
silently, nor silently recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["CacheError", "cache_dir", "key_digest", "cache_path", "atomic_save", "load_or_create"]

_FORMAT = "ccatoolkit-cache-v1"
_KIND = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class CacheError(RuntimeError):
    """A cache file exists but cannot be used (damaged, not a cache file, or for another key)."""


def cache_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder: ``path`` if given, else ``$CCATOOLKIT_CACHE``, else ``~/.cache/ccatoolkit``."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get("CCATOOLKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ccatoolkit"


def _canonical_json(key: Any) -> str:
    try:
        return json.dumps(key, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"a cache key must be JSON-able (dicts, lists, strings, finite numbers, bools, None): {err}"
        ) from None


def key_digest(key: dict[str, Any]) -> str:
    """A stable 20-hex-digit digest of a JSON-able key (dict order and tuple-vs-list do not matter)."""
    return hashlib.sha256(_canonical_json(key).encode()).hexdigest()[:20]


def cache_path(kind: str, key: dict[str, Any], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the result of ``kind`` for ``key`` is stored."""
    if not _KIND.match(kind):
        raise ValueError(f"cache kind must be a simple name (letters, digits, '_', '.', '-'), got {kind!r}")
    return _resolve_dir(cache_dir) / f"{kind}-{key_digest(key)}.pt"


def _resolve_dir(path: str | os.PathLike[str] | None) -> Path:
    return cache_dir(path)


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically: write a temporary file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def _broken(path: Path, problem: str) -> CacheError:
    return CacheError(
        f"cache file {path} {problem}. It is not used; delete it to recompute the result "
        f"(rm '{path}')."
    )


def load_or_create(
    kind: str,
    key: dict[str, Any],
    create: Callable[[], Any],
    cache_dir: str | os.PathLike[str] | None = None,
    validate: Callable[[Any], None] | None = None,
    weights_only: bool = True,
) -> Any:
    """The cached result of ``create()`` for ``key``: read from disk if present, else computed and saved.

    ``kind`` names the sort of result (a file-name prefix); ``key`` is a JSON-able dict of
    everything the result depends on. ``validate(value)`` may raise to reject a loaded value (e.g.
    weights that do not fit the model). Results must be ``torch.save``-able; with
    ``weights_only`` (the safe default) they must consist of tensors, dicts, lists, tuples,
    strings and numbers. Loaded tensors are on the CPU.

    Raises :class:`CacheError` naming the file when it is damaged, not a cache file, stored for
    another key, or rejected by ``validate``.
    """
    path = cache_path(kind, key, cache_dir)
    key_json = _canonical_json(key)
    if path.exists():
        try:
            payload = torch.load(path, map_location="cpu", weights_only=weights_only)
        except Exception as err:
            raise _broken(path, f"cannot be read (truncated or not a checkpoint: {type(err).__name__}: {err})") from err
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT or "value" not in payload:
            raise _broken(path, "is not a ccatoolkit cache file")
        if payload.get("key") != key_json:
            raise _broken(
                path, f"was stored for another key ({payload.get('key')!r}, expected {key_json!r})"
            )
        value = payload["value"]
        if validate is not None:
            try:
                validate(value)
            except Exception as err:
                raise _broken(path, f"does not fit ({type(err).__name__}: {err})") from err
        return value
    value = create()
    atomic_save(dict(format=_FORMAT, kind=kind, key=key_json, value=value), path)
    return value

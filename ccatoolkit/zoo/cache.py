"""An on-disk cache for expensive results (trained weights, learned curves).

A result is stored as ``<cache dir>/<kind>-<digest>.pt`` where the digest is a hash of a JSON
key holding everything that determines the result; the key is also stored inside the file and
checked when it is read. Files are written atomically (temporary file + ``os.replace``), so an
interrupted run never leaves a half-written entry under the real name. A file that cannot be
read or does not match is reported as :class:`CacheError` naming the file — it is never used
silently, nor silently recomputed.

Format ``ccatoolkit-cache-v2``: the result is serialised on its own (``torch.save``) and stored as
a byte tensor next to its SHA-256, which is verified on every load, so flipped bytes anywhere in
the result are caught rather than loaded as different weights. At save time the bytes are read
back as ``load_or_create`` will read them (``weights_only``), so a result that could never be
loaded (e.g. a whole ``nn.Module``) is refused then, with a clear error. Entries of the older
``v1`` format (the result stored directly, no checksum) are still read, unverified.

A finished computation is never lost to an unusable cache folder: the folder is checked before
``create()`` runs, and if it cannot be written (read-only, or a file) the result goes to a
temporary folder instead, with a warning naming both paths.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

__all__ = [
    "CacheError", "cache_dir", "key_digest", "cache_path", "writable_cache_path", "atomic_save", "load_or_create",
    "state_digest", "describe_data", "UnkeyableDataError", "source_digest",
]

_FORMAT = "ccatoolkit-cache-v2"
_OLD_FORMATS = ("ccatoolkit-cache-v1",)  # read without a checksum (unverified)
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


def _unwritable(directory: Path) -> str | None:
    """Why nothing can be written into ``directory`` (created if missing), or None when it can."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        return f"{type(err).__name__}: {err}"
    return None


def writable_cache_path(
    kind: str, key: dict[str, Any], cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Where the result of ``kind`` for ``key`` is read from or will be written, checked before any work.

    :func:`cache_path` when that file exists or its folder can be written; otherwise the same file
    name in ``<temporary folder>/ccatoolkit-cache``, with a ``RuntimeWarning`` naming both paths, so
    a long computation is not lost when it is finished.
    """
    path = cache_path(kind, key, cache_dir)
    if path.is_file():
        return path
    problem = _unwritable(path.parent)
    if problem is None:
        return path
    fallback = Path(tempfile.gettempdir()) / "ccatoolkit-cache"
    if _unwritable(fallback) is not None:
        fallback = Path(tempfile.mkdtemp(prefix="ccatoolkit-cache-"))
    warnings.warn(
        f"the cache folder {path.parent} cannot be written ({problem}); the result is stored in {fallback} "
        "instead. Set cache_dir= or $CCATOOLKIT_CACHE to a writable folder to keep results across sessions.",
        RuntimeWarning,
        stacklevel=3,
    )
    return fallback / path.name


def _serialise(value: Any, weights_only: bool) -> bytes:
    """``torch.save(value)`` as bytes, refused unless it loads back the way :func:`load_or_create` will load it."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    data = buffer.getvalue()
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=weights_only)
    except Exception as err:
        raise TypeError(
            f"cannot cache a result of type {type(value).__name__}: it would not load back with "
            f"weights_only={weights_only} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
            "Store tensors, dicts, lists, numbers and strings, e.g. model.state_dict() instead of a model."
        ) from err
    return data


def _read(path: Path, key_json: str, weights_only: bool) -> Any:
    """The value stored in ``path`` for ``key_json``, checksum verified (v2); :class:`CacheError` otherwise."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as err:
        raise _broken(path, f"cannot be read (truncated or not a checkpoint: {type(err).__name__}: {err})") from err
    if not isinstance(payload, dict) or payload.get("format") not in (_FORMAT, *_OLD_FORMATS):
        raise _broken(path, "is not a ccatoolkit cache file")
    if payload.get("key") != key_json:
        raise _broken(path, f"was stored for another key ({payload.get('key')!r}, expected {key_json!r})")
    if payload["format"] in _OLD_FORMATS:
        if "value" not in payload:
            raise _broken(path, "is not a ccatoolkit cache file")
        return payload["value"]
    blob = payload.get("payload")
    if not isinstance(blob, torch.Tensor) or blob.dtype != torch.uint8 or blob.dim() != 1:
        raise _broken(path, "is not a ccatoolkit cache file (no payload)")
    data = blob.numpy().tobytes()
    if hashlib.sha256(data).hexdigest() != payload.get("sha256"):
        raise _broken(path, "is damaged (its SHA-256 checksum does not match the stored result)")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=weights_only)
    except Exception as err:
        raise _broken(path, f"holds a result that cannot be read ({type(err).__name__}: {err})") from err


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
    strings and numbers (anything else is refused with a ``TypeError`` when it is saved). Loaded
    tensors are on the CPU. The folder is checked before ``create()`` runs (see
    :func:`writable_cache_path`).

    Raises :class:`CacheError` naming the file when it is damaged (checksum mismatch), not a cache
    file, stored for another key, or rejected by ``validate``. When the result cannot be written (a
    full disk), it is returned all the same, with a ``RuntimeWarning`` saying it was not cached and why.
    """
    key_json = _canonical_json(key)
    path = writable_cache_path(kind, key, cache_dir)
    if path.exists():
        value = _read(path, key_json, weights_only)
        if validate is not None:
            try:
                validate(value)
            except Exception as err:
                raise _broken(path, f"does not fit ({type(err).__name__}: {err})") from err
        return value
    value = create()
    data = _serialise(value, weights_only)
    blob = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    entry = dict(format=_FORMAT, kind=kind, key=key_json, sha256=hashlib.sha256(data).hexdigest(), payload=blob)
    try:
        atomic_save(entry, path)
    except (OSError, RuntimeError) as err:
        # The disk filled up (ENOSPC, or EFBIG past a file-size limit) or went away during create(): torch.save
        # reports it as an OSError or as a RuntimeError from its zip writer ("unexpected pos", "failed writing
        # file"). The bytes were already serialised and checked above, so nothing else fails here; atomic_save
        # removed its temporary file. Keep the finished result and say it was not cached, and why.
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        warnings.warn(f"could not write the cache file {path} ({type(err).__name__}: {reason}; is the disk full?); "
                      f"the result ({len(data) / 2**20:.1f} MiB) is returned but not cached", RuntimeWarning,
                      stacklevel=2)
    return value


# --------------------------------------------------------------------------- digests for cache keys


class UnkeyableDataError(ValueError):
    """Data whose effect on a cached result cannot be captured in a key (e.g. a lambda transform)."""


@functools.lru_cache(maxsize=None)
def source_digest(*folders: str) -> str:
    """SHA-256 of the package's sources in ``folders`` (e.g. ``"merging"``) plus the evaluation code they all use.

    Part of the key of a result that the library's own code computes (a merge, an alignment, a path), so that
    a result is only read back by the code that computed it: any change to that code computes it again.
    Read once per process (the files are the ones this process imported).
    """
    root = Path(__file__).resolve().parents[1]
    files = sorted([*(p for f in folders for p in (root / f).rglob("*.py")), root / "zoo" / "training.py",
                    root / "_utils.py"])
    h = hashlib.sha256()
    for path in files:
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def state_digest(model: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a model's state dict, or of a state (names, dtypes, shapes and bytes): a cache key's part for
    weights."""
    h = hashlib.sha256()
    state = model.state_dict() if isinstance(model, nn.Module) else model
    for name, tensor in sorted(state.items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _tensor_digest(h: "hashlib._Hash", t: torch.Tensor) -> None:
    t = torch.as_tensor(t).detach().cpu().contiguous()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def _dataset_digest(h: "hashlib._Hash", dataset: Any) -> bool:
    """Digest a dataset's in-memory tensors (TensorDataset, ccatoolkit ImageDataset, torchvision, Subset).

    Returns False (nothing digested) for a dataset whose tensors it cannot reach.
    """
    if hasattr(dataset, "dataset") and hasattr(dataset, "indices"):  # a Subset
        _tensor_digest(h, torch.as_tensor(np.asarray(dataset.indices, dtype=np.int64)))
        return _dataset_digest(h, dataset.dataset)
    tensors = getattr(dataset, "tensors", None)
    if tensors is None:
        for first, second in (("images", "targets"), ("data", "targets")):
            if hasattr(dataset, first) and hasattr(dataset, second):
                tensors = (getattr(dataset, first), getattr(dataset, second))
                break
    if tensors is None:
        return False
    h.update(f"{type(dataset).__name__}|{len(dataset)}|augment={getattr(dataset, 'augment', None)}|".encode())
    for attr in ("transform", "target_transform", "transforms"):  # torchvision-style per-sample functions
        function = getattr(dataset, attr, None)
        if function is not None:
            text = repr(function)
            if " at 0x" in text:  # a lambda or plain function: its repr says nothing of what it computes
                raise UnkeyableDataError(
                    f"the dataset's {attr} {text} cannot be part of a cache key (its repr names no settings): "
                    "pass cache=False, or a transform with a descriptive repr (torchvision's)")
            h.update(f"{attr}={text}|".encode())
    for attr in ("mean", "std"):
        if isinstance(getattr(dataset, attr, None), torch.Tensor):
            _tensor_digest(h, getattr(dataset, attr))
    for t in tensors:
        _tensor_digest(h, torch.as_tensor(np.asarray(t)) if not isinstance(t, torch.Tensor) else t)
    return True


def describe_data(data: Iterable[Any]) -> str:
    """A digest of a data set for cache keys: the dataset's tensors where reachable, else its batches' bytes."""
    h = hashlib.sha256()
    dataset = getattr(data, "dataset", None)
    if dataset is not None:
        h.update(f"loader|batch_size={getattr(data, 'batch_size', None)}|".encode())
        sampler = getattr(data, "sampler", None)  # which samples, in which order
        h.update(f"sampler={type(sampler).__name__}|drop_last={getattr(data, 'drop_last', None)}|".encode())
        for attr in ("indices", "weights"):
            if getattr(sampler, attr, None) is not None:
                _tensor_digest(h, torch.as_tensor(np.asarray(list(getattr(sampler, attr)))))
        if _dataset_digest(h, dataset):
            return h.hexdigest()
    for batch in data:  # a plain iterable (e.g. a list of batches)
        for t in batch if isinstance(batch, (tuple, list)) else (batch,):
            _tensor_digest(h, t)
    return h.hexdigest()

"""Local path or Hugging Face Hub name? Clear errors for typo'd paths and for Hub lookups that fail offline.

Rule for arguments that take "a folder or a hub id" (``--source``, ``convert --from``, ``eval --model``): an
argument that *looks like a path* is never sent to the Hub. It looks like a path when it starts with
``.``, ``/`` or ``~``, or when it contains a path separator and the part before the last separator is an
existing folder (``data/corpuss2`` with ``data/`` present). A missing path-like argument fails at once with
"no such file or directory" and, where one exists, the closest existing name.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

__all__ = ["looks_like_path", "check_local_path", "hub_reachable", "HubUnavailable", "hub_errors",
           "offline_if_unreachable"]

HUB_HOST = "huggingface.co"


def looks_like_path(spec: str) -> bool:
    """True when ``spec`` names a local path by its form (see the module docstring)."""
    spec = str(spec)
    if spec.startswith((".", "/", "~")) or (os.sep != "/" and spec.startswith(os.sep)):
        return True
    for sep in {"/", os.sep}:
        if sep in spec:
            parent = spec.rsplit(sep, 1)[0]
            if parent and Path(os.path.expanduser(parent)).is_dir():
                return True
    return False


def _closest(path: Path) -> str:
    parent = path.parent if str(path.parent) else Path(".")
    try:
        names = [p.name for p in parent.iterdir()]
    except OSError:
        return ""
    match = difflib.get_close_matches(path.name, names, n=1, cutoff=0.75)
    return f" (did you mean {parent / match[0]}?)" if match else ""


def check_local_path(spec: str | os.PathLike, argument: str, *, must_exist: bool = False) -> Path | None:
    """``Path(spec)`` when it exists; ``FileNotFoundError`` naming ``argument`` when it does not and either
    ``must_exist`` or :func:`looks_like_path`; None for a missing name that may be a Hub id."""
    path = Path(os.path.expanduser(str(spec)))
    if path.exists():
        return path
    if must_exist or looks_like_path(str(spec)):
        if not str(parent := path.parent) or parent == Path(".") or parent.is_dir():
            detail = _closest(path)
        else:
            detail = f" (its parent {parent} does not exist either)"
        raise FileNotFoundError(f"{argument} {spec}: no such file or directory{detail}")
    return None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub can be reached: False at once when ``HF_HUB_OFFLINE`` is set, else a TCP connect."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


_OFFLINE_FLAGS = (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                  ("datasets.config", "HF_DATASETS_OFFLINE"))


@contextlib.contextmanager
def offline_if_unreachable(timeout: float = 3.0) -> Iterator[bool]:
    """When the Hub cannot be reached, run the block with ``HF_HUB_OFFLINE=1`` and ``HF_DATASETS_OFFLINE=1``
    (the local cache still works; a miss fails at once instead of after ~30 s of retries). Yields whether
    the Hub is reachable. huggingface_hub and datasets read the flags at import, so their module copies are
    set too; everything is restored afterwards."""
    reachable = hub_reachable(timeout)
    if reachable:
        yield True
        return
    env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    modules = {}
    for module, name in _OFFLINE_FLAGS:
        mod = sys.modules.get(module)
        if mod is not None and isinstance(getattr(mod, name, None), bool):
            modules[(module, name)] = getattr(mod, name)
            setattr(mod, name, True)
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    try:
        yield False
    finally:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for (module, name), value in modules.items():
            setattr(sys.modules[module], name, value)


class HubUnavailable(ValueError):
    """A Hub lookup failed because the Hub could not be reached (or offline mode is on)."""


_OFFLINE_MARKERS = ("offline", "connectionerror", "connection refused", "connection aborted", "connection reset",
                    "failed to resolve", "name or service not known", "temporary failure in name resolution",
                    "max retries", "timed out", "timeouterror", "network is unreachable", "couldn't reach",
                    "could not reach", "couldn't connect", "could not connect", "localentrynotfound",
                    "outgoing traffic has been disabled")


def _looks_offline(err: BaseException) -> bool:
    seen = 0
    while err is not None and seen < 10:
        text = f"{type(err).__name__}: {err}".lower()
        if any(m in text for m in _OFFLINE_MARKERS):
            return True
        err = err.__cause__ or err.__context__
        seen += 1
    return False


@contextlib.contextmanager
def hub_errors(what: str, name: str, *, offline_message: str | None = None,
               only_offline: bool = False) -> Iterator[None]:
    """Turn a failed Hub lookup of ``what`` ``name`` into one line: :class:`HubUnavailable` when the Hub
    could not be reached (``offline_message`` replaces the default text), ``FileNotFoundError`` /
    ``ValueError`` otherwise (or the original error when ``only_offline``)."""
    try:
        yield
    except HubUnavailable:
        raise
    except Exception as err:  # noqa: BLE001 - hub / datasets / requests errors have many types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if _looks_offline(err):
            raise HubUnavailable(offline_message or (
                f"{what} {name!r} is not a local path, and the Hugging Face Hub could not be reached to fetch it "
                f"(offline, and not in the local cache). If it is a local path, check the spelling; else "
                "connect once to cache it")) from None
        if only_offline:
            raise
        if isinstance(err, FileNotFoundError):
            raise FileNotFoundError(f"{what} {name!r} is neither an existing local path nor found on the Hugging Face "
                                    f"Hub: {first[:300]}") from None
        raise ValueError(f"{what} {name!r} is not a local path and could not be loaded from the Hugging Face "
                         f"Hub: {type(err).__name__}: {first[:300]}") from None

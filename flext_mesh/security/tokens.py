"""Bearer tokens: the tokens file, its validation, and looking a token up in it.

The file (YAML or JSON) stores a SHA-256 hash per token, never the token itself::

    tokens:
      - name: payment-sidecar            # unique; what logs and limits call the caller
        sha256: 9f86d081884c7d65...      # 64 hex digits: sha256(token)
        scopes: [service:payment]        # admin | read | workflow | service:NAME
        created: "2025-01-31T12:00:00Z"  # optional, informational

``flext-mesh tokens create`` writes entries (and prints the token once); the control
plane's :class:`TokenFile` reads the file at start, validates every entry (a bad one
stops the start with a message naming it), and reads it again when it changes, so a
revoked token stops working without a restart.

Why a plain SHA-256 and not a slow password hash: tokens are 256 random bits
(``secrets.token_urlsafe(32)``), so guessing one from its hash is as hard as guessing
the token; a slow hash only protects low-entropy secrets such as passwords.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

from flext_mesh.errors import ConfigError
from flext_mesh.names import NAME as SERVICE_NAME
from flext_mesh.security.identity import Identity

__all__ = [
    "SCOPE_KINDS",
    "TOKEN_PREFIX",
    "TokenEntry",
    "TokenFile",
    "TokensFileError",
    "add_token",
    "check_scope",
    "hash_token",
    "load_entries",
    "new_token",
    "remove_token",
    "write_entries",
]

_log = logging.getLogger("flext_mesh.security.tokens")

#: Every token starts with this, so that a leaked one is easy to recognise (and grep).
TOKEN_PREFIX: Final = "fm_"
#: Scopes without a parameter; ``service:NAME`` is the one with.
SCOPE_KINDS: Final = ("admin", "read", "workflow", "service:NAME")
_TOKEN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_FIELDS = frozenset({"name", "sha256", "scopes", "created"})
#: A tokens file larger than this is refused: it is read on the event loop.
MAX_FILE_BYTES: Final = 1024 * 1024
#: Seconds between two checks of the file's modification time.
RELOAD_INTERVAL: Final = 1.0
#: Distinct valid tokens whose identity is remembered (each costs one hash otherwise).
_CACHE_SIZE: Final = 4096


class TokensFileError(ConfigError, ValueError):
    """The tokens file cannot be used; the message names the file and the entry."""


def check_scope(scope: str) -> str | None:
    """What is wrong with ``scope`` (None when it is valid)."""
    if scope in ("admin", "read", "workflow"):
        return None
    kind, sep, name = scope.partition(":")
    if kind == "service" and sep:
        if SERVICE_NAME.match(name):
            return None
        return f"{scope!r}: {name!r} is not a service name"
    return f"{scope!r} is not a scope: use one of {', '.join(SCOPE_KINDS)}"


def hash_token(token: str) -> str:
    """The hex SHA-256 stored in the file for ``token``."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A new random token: ``fm_`` and 43 URL-safe characters (256 bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class TokenEntry:
    """One token of the file: its name, hash, scopes and creation time."""

    name: str
    sha256: str
    scopes: tuple[str, ...]
    created: str = ""

    def to_data(self) -> dict[str, Any]:
        """The entry as written to the file."""
        data: dict[str, Any] = {
            "name": self.name,
            "sha256": self.sha256,
            "scopes": list(self.scopes),
        }
        if self.created:
            data["created"] = self.created
        return data


def _entry(path: Path, index: int, item: object) -> TokenEntry:
    where = f"{path}: tokens[{index}]"
    if not isinstance(item, dict):
        raise TokensFileError(f"{where} is not a mapping with name, sha256 and scopes")
    name = item.get("name")
    if isinstance(name, str) and name:
        where += f" (name {name!r})"
    unknown = sorted(str(key) for key in item if key not in _FIELDS)
    if unknown:
        raise TokensFileError(
            f"{where}: unknown field {', '.join(unknown)} (allowed: name, sha256, scopes, created)"
        )
    if not isinstance(name, str) or not _TOKEN_NAME.match(name):
        raise TokensFileError(
            f"{where}: name must be 1 to 128 letters, digits, '.', '_', '@' or '-', "
            "starting with a letter or digit"
        )
    digest = item.get("sha256")
    if not isinstance(digest, str) or not _HEX64.match(digest.lower()):
        raise TokensFileError(f"{where}: sha256 must be 64 hex digits (the token's SHA-256)")
    scopes = item.get("scopes")
    if isinstance(scopes, str):
        scopes = [scopes]
    if not isinstance(scopes, list) or not scopes:
        raise TokensFileError(f"{where}: scopes must be a non-empty list")
    for scope in scopes:
        problem = check_scope(scope) if isinstance(scope, str) else f"{scope!r} is not a string"
        if problem is not None:
            raise TokensFileError(f"{where}: scope {problem}")
    created = item.get("created", "")
    if isinstance(created, dt.datetime):  # YAML reads an unquoted timestamp as one
        created = created.isoformat()
    if not isinstance(created, str):
        raise TokensFileError(f"{where}: created must be a timestamp string")
    return TokenEntry(name, digest.lower(), tuple(dict.fromkeys(scopes)), created)


def _parse(path: Path, text: str) -> list[TokenEntry]:
    try:
        data = json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise TokensFileError(f"{path}: not valid YAML or JSON: {_one_line(str(exc))}") from None
    if data is None:
        return []
    if not isinstance(data, dict) or set(data) - {"tokens"}:
        raise TokensFileError(f"{path}: expected a mapping with one key, tokens: [...]")
    items = data.get("tokens") or []
    if not isinstance(items, list):
        raise TokensFileError(f"{path}: tokens must be a list")
    entries = [_entry(path, index, item) for index, item in enumerate(items)]
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        if entry.name in seen:
            raise TokensFileError(f"{path}: tokens[{index}] (name {entry.name!r}) is a duplicate")
        seen.add(entry.name)
    return entries


def _one_line(text: str) -> str:
    return " ".join(text.split())


def load_entries(path: str | Path, *, missing_ok: bool = False) -> list[TokenEntry]:
    """The validated entries of a tokens file (TokensFileError naming the bad entry)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise TokensFileError(f"{path}: {size} bytes; a tokens file holds at most 1 MiB")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if missing_ok:
            return []
        raise TokensFileError(
            f"{path}: no such tokens file (create one with `flext-mesh tokens create`)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TokensFileError(f"{path}: cannot read: {exc}") from None
    return _parse(path, text)


def write_entries(path: str | Path, entries: Iterable[TokenEntry]) -> None:
    """Replace the file atomically with ``entries`` (mode 0600; JSON for ``*.json``)."""
    path = Path(path)
    data = {"tokens": [entry.to_data() for entry in entries]}
    if path.suffix.lower() == ".json":
        text = json.dumps(data, indent=2) + "\n"
    else:
        text = "# flext-mesh tokens: SHA-256 hashes only (see `flext-mesh tokens --help`).\n"
        text += yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    # mkstemp creates the file with mode 0600; replacing keeps readers from ever
    # seeing half a file.
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    try:
        with contextlib.suppress(FileNotFoundError):  # keep a mode the operator chose
            os.chmod(temporary, path.stat().st_mode & 0o777)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def add_token(path: str | Path, name: str, scopes: Sequence[str]) -> str:
    """Create a token named ``name`` in the file (created if missing); returns the token.

    The token itself is returned once and stored nowhere: only its hash is written.
    """
    entries = load_entries(path, missing_ok=True)
    if any(entry.name == name for entry in entries):
        raise TokensFileError(f"{path}: a token named {name!r} exists; revoke it first")
    token = new_token()
    created = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    entry = _entry(
        Path(path),
        len(entries),
        {"name": name, "sha256": hash_token(token), "scopes": list(scopes), "created": created},
    )
    write_entries(path, [*entries, entry])
    return token


def remove_token(path: str | Path, name: str) -> TokenEntry:
    """Remove the token named ``name`` from the file; returns its entry."""
    entries = load_entries(path)
    kept = [entry for entry in entries if entry.name != name]
    if len(kept) == len(entries):
        raise TokensFileError(f"{path}: no token named {name!r}")
    write_entries(path, kept)
    return next(entry for entry in entries if entry.name == name)


_FileStamp = tuple[int, int, int]  # inode, mtime_ns, size


class TokenFile:
    """The control plane's view of a tokens file: token -> identity, kept up to date.

    :meth:`identify` is on the path of every authenticated RPC: a token seen before is
    one dict lookup; a new one costs one SHA-256 and a constant-time comparison with
    every entry. At most once per :data:`RELOAD_INTERVAL` it also checks the file's
    modification time (one ``stat``, microseconds on a local disk) and reads the file
    again when it changed; a file that became invalid is logged and the previous
    tokens stay in force.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._entries: list[tuple[bytes, Identity]] = []
        self._cache: dict[str, Identity] = {}
        self._stamp: _FileStamp | None = None
        self._next_check = 0.0
        self.generation = 0

    def load(self) -> None:
        """Read and validate the file now (TokensFileError names the problem)."""
        stamp = self._stat()
        entries = load_entries(self.path)
        self._entries = [
            (bytes.fromhex(entry.sha256), Identity(entry.name, frozenset(entry.scopes), "token"))
            for entry in entries
        ]
        self._cache = {}
        self._stamp = stamp
        self._next_check = time.monotonic() + RELOAD_INTERVAL
        self.generation += 1

    def __len__(self) -> int:
        return len(self._entries)

    def _stat(self) -> _FileStamp | None:
        try:
            info = os.stat(self.path)
        except OSError:
            return None
        return (info.st_ino, info.st_mtime_ns, info.st_size)

    def refresh(self, *, force: bool = False) -> None:
        """Read the file again if it changed (at most once per second unless ``force``)."""
        now = time.monotonic()
        if not force and now < self._next_check:
            return
        self._next_check = now + RELOAD_INTERVAL
        stamp = self._stat()
        if stamp == self._stamp:
            return
        if stamp is None:
            # Removed: nothing authenticates any more (fail closed).
            _log.warning("tokens file %s is gone: every token is refused", self.path)
            self._entries, self._cache, self._stamp = [], {}, None
            self.generation += 1
            return
        try:
            self.load()
        except TokensFileError as exc:
            self._stamp = stamp  # do not retry the same broken file every second
            _log.error("tokens file not reloaded, previous tokens stay in force: %s", exc)
            return
        _log.info("tokens file reloaded path=%s tokens=%d", self.path, len(self._entries))

    def identify(self, token: str) -> Identity | None:
        """The identity of ``token``, or None when no entry of the file matches it."""
        self.refresh()
        cached = self._cache.get(token)
        if cached is not None:
            return cached
        digest = hashlib.sha256(token.encode()).digest()
        found: Identity | None = None
        for stored, identity in self._entries:
            # Every entry is compared, in constant time, whatever matched.
            if hmac.compare_digest(stored, digest):
                found = identity
        if found is not None:
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.clear()
            self._cache[token] = found
        return found

"""API keys: ``Authorization: Bearer <key>`` maps to a tenant.

Keys are stored hashed (SHA-256) in a JSON file (a Kubernetes Secret mounted as
a file works), re-read when the file changes, so keys can be added or revoked
without a restart::

    {"keys": [{"sha256": "<hex>", "tenant": "acme", "name": "web", "revoked": false}]}

The tenant comes only from the key; nothing in a body or query can choose it.
``TIERMEM_AUTH=off`` turns authentication off for development, explicitly: every
request is then tenant ``TIERMEM_DEFAULT_TENANT``, and the app says so loudly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from infra.errors import TiermemError
from memory.keys import validate_id

log = logging.getLogger("tiermem.auth")

RELOAD_CHECK_S = 2.0


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class KeyEntry:
    tenant: str
    name: str
    revoked: bool


class AuthError(TiermemError):
    """No key, an unknown key, or a revoked one: 401 with a Bearer challenge."""

    code = "unauthorized"
    http_status = 401
    headers: Mapping[str, str] = MappingProxyType({"WWW-Authenticate": "Bearer"})


class ApiKeyAuth:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[str, KeyEntry] = {}
        self._mtime: float | None = None
        self._checked = 0.0
        self._reload(force=True)

    def _reload(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < RELOAD_CHECK_S:
            return
        self._checked = now
        try:
            mtime = self.path.stat().st_mtime
        except OSError:
            if force:
                raise
            return  # keep the last good set while the file is being replaced
        if mtime == self._mtime and not force:
            return
        try:
            entries = _parse(self.path.read_text())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            if force:
                raise
            # Caught half-written, or broken: keep serving with the last good set.
            log.error(
                "API key file %s unreadable (%s); keeping the last good keys",
                self.path,
                type(exc).__name__,
            )
            return
        self._entries = entries
        self._mtime = mtime
        log.info("API keys loaded", extra={"keys": len(entries), "path": str(self.path)})

    def tenant_for(self, authorization: str | None) -> str:
        self._reload()
        if not authorization:
            raise AuthError("missing API key: send Authorization: Bearer <key>")
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthError("send the API key as Authorization: Bearer <key>")
        entry = self._entries.get(hash_key(key.strip()))
        if entry is None or entry.revoked:
            raise AuthError("unknown or revoked API key")
        return entry.tenant


def _parse(text: str) -> dict[str, KeyEntry]:
    entries = {}
    for item in json.loads(text).get("keys", []):
        tenant = validate_id(str(item["tenant"]), "tenant")
        entries[str(item["sha256"]).lower()] = KeyEntry(
            tenant, str(item.get("name", "")), bool(item.get("revoked", False))
        )
    return entries


def ensure_dev_key(data_dir: Path, tenant: str) -> tuple[Path, str | None]:
    """The key file for development: created with one fresh key on first start.

    Only the key's hash is kept; the key itself is returned once (to be printed)
    and never again. Returns (path, key or None if the file already existed)."""
    path = data_dir / "api_keys.json"
    if path.exists():
        return path, None
    data_dir.mkdir(parents=True, exist_ok=True)
    key = "tm_dev_" + secrets.token_urlsafe(24)
    body = {"keys": [{"sha256": hash_key(key), "tenant": tenant, "name": "development"}]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(body, indent=2))
    os.chmod(tmp, 0o600)
    tmp.replace(path)
    return path, key

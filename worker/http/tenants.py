"""Tenants of the HTTP API and their keys: who may call, and how much.

The keys file (IVQ_API_KEYS_FILE, in Kubernetes a Secret) holds only SHA-256
hashes of the keys, never a key:

    {"tenants": {"acme": {"keys": [{"sha256": "<hex>"},
                                   {"sha256": "<hex>", "not_after": "2027-01-31T00:00:00Z"}],
                          "max_active": 1000, "rate_per_s": 20, "burst": 40,
                          "max_batch_jobs": 100000, "max_batch_bytes": 268435456,
                          "batch_rate_per_s": 0.5, "batch_burst": 5, "max_streams": 100}}}

Every limit is optional. A tenant that sets none gets the registry's defaults, and
`default_limits` bounds its batches to a share of Redis's memory (IVQ_API_TENANT_REDIS_SHARE
of Redis's maxmemory, or of IVQ_API_REDIS_MEMORY_BYTES), so no tenant left unconfigured
can fill Redis.

A tenant may have several live keys, so a key is rotated by adding the new one,
moving callers over, then removing (or letting `not_after` retire) the old one.
The file is read again when it changes, so a rotation needs no restart.
`internvl-queue api-key TENANT` makes a key and prints its entry.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from api_client.errors import Unauthorized
from api_client.keys import INTERNAL_TENANT
from api_client.quotas import Limits

KEY_PREFIX = "ivq_"


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Tenant:
    name: str
    limits: Limits
    key_hashes: tuple[tuple[str, float | None], ...] = field(default=())  # (sha256 hex, not_after unix s)


DEFAULT_REDIS_MEMORY_BYTES = 1 << 30  # when Redis has no maxmemory and none is configured


def default_limits(redis_memory_bytes: int, share: float) -> Limits:
    """Limits for a tenant whose entry sets none: its batches hold at most `share` of Redis."""
    budget = int(redis_memory_bytes * share)
    return replace(Limits(), max_batch_bytes=min(Limits.max_batch_bytes, budget))


def redis_memory_bytes(client, configured: int | None) -> int:
    """What the defaults share: the configured figure, else Redis's maxmemory, else 1 GiB."""
    if configured:
        return configured
    try:
        maxmemory = int(client.info("memory").get("maxmemory", 0))
    except Exception:  # noqa: BLE001 - an ACL may forbid INFO; fall back to the fixed figure
        maxmemory = 0
    return maxmemory or DEFAULT_REDIS_MEMORY_BYTES


_LIMIT_FIELDS = {f.name: f.type for f in fields(Limits)}


def _limits(name: str, spec: dict, defaults: Limits) -> Limits:
    given: dict[str, Any] = {}
    for key, value in spec.items():
        if key in _LIMIT_FIELDS:
            given[key] = float(value) if _LIMIT_FIELDS[key] in (float, "float") else int(value)
            if given[key] <= 0:
                raise ValueError(f"tenant {name!r}: {key} must be positive")
    return replace(defaults, **given)


def _parse(raw: dict, defaults: Limits | None = None) -> dict[str, Tenant]:
    defaults = defaults or Limits()
    tenants = {}
    for name, spec in raw.get("tenants", {}).items():
        if name == INTERNAL_TENANT or not name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"tenant name {name!r}: letters, digits, - and _ only, and not {INTERNAL_TENANT!r}")
        hashes = []
        for entry in spec.get("keys", []):
            not_after = entry.get("not_after")
            when = datetime.fromisoformat(not_after.replace("Z", "+00:00")).timestamp() if not_after else None
            digest = entry["sha256"].lower()
            if len(digest) != 64:
                raise ValueError(f"tenant {name!r}: a key hash must be 64 hex digits")
            hashes.append((digest, when))
        tenants[name] = Tenant(name, _limits(name, spec, defaults), tuple(hashes))
    return tenants


class TenantRegistry:
    """Bearer key -> tenant, from the keys file (re-read when its mtime changes, at most every 2 s)."""

    def __init__(self, path: Path | None, *, clock=time.time, defaults: Limits | None = None) -> None:
        self.path = path
        self._clock = clock
        self.defaults = defaults or Limits()
        self._tenants: dict[str, Tenant] = {}
        self._mtime: float | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        self._reload(force=True)

    @classmethod
    def of(cls, tenants: dict[str, Tenant]) -> TenantRegistry:
        registry = cls(None)
        registry._tenants = dict(tenants)
        return registry

    @classmethod
    def for_keys(cls, keys: dict[str, str], limits: Limits | None = None) -> TenantRegistry:
        """tenant -> its one plain key, all with `limits` (the demo, the bench and tests; no file)."""
        return cls.of({name: Tenant(name, limits or Limits(), ((key_hash(key), None),)) for name, key in keys.items()})

    def _reload(self, *, force: bool = False) -> None:
        if self.path is None:
            return
        now = time.monotonic()
        if not force and now - self._checked < 2.0:
            return
        self._checked = now
        mtime = os.stat(self.path).st_mtime
        if force or mtime != self._mtime:
            tenants = _parse(json.loads(Path(self.path).read_text()), self.defaults)
            with self._lock:
                self._tenants, self._mtime = tenants, mtime

    def names(self) -> list[str]:
        """Every tenant of the keys file: the only values the metrics' tenant label takes."""
        with self._lock:
            return sorted(self._tenants)

    def authenticate(self, authorization: str | None) -> Tenant:
        """The tenant whose live key this `Authorization: Bearer ivq_...` header carries."""
        if not authorization or not authorization.startswith("Bearer "):
            raise Unauthorized("an Authorization: Bearer ivq_... header is required")
        key = authorization[len("Bearer "):].strip()
        digest = key_hash(key)
        try:
            self._reload()
        except (OSError, ValueError):
            pass  # keep serving with the keys last read; a broken file is logged by the operator's tools
        now = self._clock()
        with self._lock:
            tenants = list(self._tenants.values())
        for tenant in tenants:
            for known, not_after in tenant.key_hashes:
                if hmac.compare_digest(known, digest) and (not_after is None or now < not_after):
                    return tenant
        raise Unauthorized("unknown, revoked or expired API key")


def key_entry(tenant: str, key: str) -> str:
    """The keys-file entry for a new key (what `internvl-queue api-key` prints)."""
    return json.dumps({"tenants": {tenant: {"keys": [{"sha256": key_hash(key)}]}}}, indent=2)

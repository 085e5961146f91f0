"""Every Redis client the service makes comes from one URL, here: `IVQ_REDIS_URL`.

    redis://[user:password@]host:port/DB            one endpoint (also rediss://, unix://)
    redis+sentinel://[user:password@]host:port[,host:port...]/SERVICE[/DB]

A Sentinel URL lists the sentinels and names the service (the `sentinel monitor`
name); the user and password reach both the sentinels and the primary, so a
deployment with `requirepass` or ACL users on both needs nothing more. Every
client asks the sentinels for the primary on each new connection.

Every client retries a command through a failover (redis-py `Retry` with
exponential backoff) on a dropped connection, a timeout and READONLY: a primary
demoted by a failover answers READONLY, and so does an endpoint that fails over by
DNS (a managed Redis) until the name moves. A retry disconnects first, so the next
try resolves the name again, or, with Sentinel, asks the sentinels again. A retried
script may therefore run twice: every transition script is safe to (lua/*.lua).

The Celery broker speaks kombu's `sentinel://` transport for the same URL
(`broker_url` and `broker_transport_options`).

Durability (`Durability`): with replicas, a submit waits (WAIT) until a replica has
its record before it is acknowledged; `default_durability` picks `replica` for a
Sentinel URL and `local` otherwise.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote, unquote, urlsplit

import redis
import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ReadOnlyError, ResponseError
from redis.retry import Retry
from redis.sentinel import SentinelManagedConnection

SENTINEL_SCHEME = "redis+sentinel"
DEFAULT_SENTINEL_PORT = 26379
RETRIED_ERRORS = (redis.ConnectionError, redis.TimeoutError, socket.timeout, ReadOnlyError)


class RedisUrlError(ValueError):
    """IVQ_REDIS_URL cannot be understood."""


@dataclass(frozen=True)
class RedisTarget:
    """What a Redis URL names: one endpoint, or a Sentinel service."""

    url: str
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def is_sentinel(self) -> bool:
        return bool(self.sentinels)


def parse_url(url: str) -> RedisTarget:
    """Parse a Redis URL; a `redis+sentinel://` one is split into sentinels, service and db."""
    if not url.startswith(f"{SENTINEL_SCHEME}://"):
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise RedisUrlError(f"not a Redis URL (redis://, rediss://, unix:// or {SENTINEL_SCHEME}://)")
        return RedisTarget(url=url)
    rest = url[len(SENTINEL_SCHEME) + 3:]
    netloc, _, path = rest.partition("/")
    userinfo, _, hosts = netloc.rpartition("@")
    username, password = None, None
    if userinfo:
        user, has_pw, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if has_pw else None
    sentinels = []
    for host in hosts.split(","):
        if not host:
            continue
        try:
            parts = urlsplit(f"//{host}")
            port = parts.port or DEFAULT_SENTINEL_PORT
        except ValueError:
            raise RedisUrlError(f"bad sentinel address {host!r}") from None
        if not parts.hostname:
            raise RedisUrlError(f"bad sentinel address {host!r}")
        sentinels.append((parts.hostname, port))
    segments = [s for s in path.split("?")[0].split("/") if s]
    if not sentinels or not segments or len(segments) > 2:
        raise RedisUrlError(f"{SENTINEL_SCHEME}://[user:password@]host:port[,host:port...]/SERVICE[/DB]")
    try:
        db = int(segments[1]) if len(segments) == 2 else 0
    except ValueError:
        raise RedisUrlError(f"the database must be a number, not {segments[1]!r}") from None
    return RedisTarget(url=url, sentinels=tuple(sentinels), service=unquote(segments[0]), db=db,
                       username=username, password=password)


class ReadOnlyAwareConnection(redis.Connection):
    """A connection that knows a script refused by a replica for READONLY: Redis 6 wraps that
    error in "Error running script", which redis-py reads as a plain ResponseError. Raised here as
    ReadOnlyError, it is retried on a fresh connection like any other READONLY (a demoted
    primary), and through Sentinel asks the sentinels again. Nothing ran: a replica refuses the
    script's first write."""

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)
        except ReadOnlyError:
            raise
        except ResponseError as exc:
            if "READONLY" in str(exc) and "read only replica" in str(exc):
                raise ReadOnlyError(str(exc)) from exc
            raise


class SentinelReadOnlyAwareConnection(SentinelManagedConnection, ReadOnlyAwareConnection):
    """Sentinel's connection (READONLY from the primary: disconnect, ask again), scripts included."""


def retry_policy(retries: int) -> Retry:
    """Exponential backoff from 0.1 s to 1 s per try: 6 tries wait about 3.5 s, 10 about 7.5 s."""
    return Retry(ExponentialBackoff(cap=1.0, base=0.1), retries, supported_errors=RETRIED_ERRORS)


def sync_client(url: str, *, socket_timeout: float | None = 10.0, socket_connect_timeout: float = 5.0,
                health_check_interval: int = 30, retries: int = 6, **extra: Any) -> redis.Redis:
    """A redis-py client for the URL: the primary of a Sentinel service, or the one endpoint."""
    target = parse_url(url)
    kw: dict[str, Any] = {"socket_timeout": socket_timeout, "socket_connect_timeout": socket_connect_timeout,
                          "health_check_interval": health_check_interval, "retry": retry_policy(retries), **extra}
    if not target.is_sentinel:
        if url.startswith("redis://"):  # rediss:// and unix:// keep their own connection classes
            kw["connection_class"] = ReadOnlyAwareConnection
        return redis.Redis.from_url(url, **kw)
    from redis.sentinel import Sentinel

    auth = {"username": target.username, "password": target.password}
    sentinel = Sentinel(list(target.sentinels), sentinel_kwargs=_sentinel_kwargs(auth, socket_connect_timeout),
                        db=target.db, **auth, **kw)
    return sentinel.master_for(target.service, redis_class=redis.Redis,
                               connection_class=SentinelReadOnlyAwareConnection)


def _sentinel_kwargs(auth: dict[str, Any], timeout: float) -> dict[str, Any]:
    """How to reach a sentinel: the URL's user and password, one try each (the sentinels are tried in
    turn, and the command's own retry tries them all again; redis-py's default would retry each one
    ten times, minutes in all when a password is wrong)."""
    return {**auth, "socket_timeout": timeout, "socket_connect_timeout": timeout, "retry": retry_policy(0)}


def async_client(url: str, *, max_connections: int | None = None, socket_connect_timeout: float = 5.0,
                 retries: int = 6) -> aioredis.Redis:
    """An asyncio client for the URL (the HTTP API's event streams). With `max_connections`, a
    plain endpoint's pool blocks for a free connection (30 s); a Sentinel pool refuses past it."""
    target = parse_url(url)
    kw: dict[str, Any] = {"socket_connect_timeout": socket_connect_timeout, "retry": _async_retry(retries)}
    if not target.is_sentinel:
        if max_connections is None:
            return aioredis.Redis.from_url(url, **kw)
        pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=30, **kw)
        return aioredis.Redis(connection_pool=pool)
    from redis.asyncio.sentinel import Sentinel

    auth = {"username": target.username, "password": target.password}
    sentinel = Sentinel(list(target.sentinels),
                        sentinel_kwargs={**_sentinel_kwargs(auth, socket_connect_timeout), "retry": _async_retry(0)},
                        db=target.db, **auth, **kw)
    if max_connections is None:
        return sentinel.master_for(target.service, redis_class=aioredis.Redis)
    return sentinel.master_for(target.service, redis_class=aioredis.Redis, max_connections=max_connections)


def _async_retry(retries: int) -> Any:
    from redis.asyncio.retry import Retry as AsyncRetry

    return AsyncRetry(ExponentialBackoff(cap=1.0, base=0.1), retries,
                      supported_errors=(redis.ConnectionError, redis.TimeoutError, ReadOnlyError))


def broker_url(url: str) -> str:
    """The Celery broker URL: the same URL, or kombu's `sentinel://h1:p1;sentinel://h2:p2` form."""
    target = parse_url(url)
    if not target.is_sentinel:
        return url
    auth = ""
    if target.username or target.password:
        auth = f"{quote(target.username or '', safe='')}:{quote(target.password or '', safe='')}@"
    return ";".join(f"sentinel://{auth}{host}:{port}/{target.db}" for host, port in target.sentinels)


def broker_options(url: str) -> dict[str, Any]:
    """kombu transport options the URL needs (merged into keys.broker_transport_options)."""
    target = parse_url(url)
    if not target.is_sentinel:
        return {}
    sentinel_kwargs = {k: v for k, v in (("username", target.username), ("password", target.password)) if v}
    return {"master_name": target.service, "sentinel_kwargs": sentinel_kwargs or None}


DurabilityMode = Literal["local", "replica"]


@dataclass(frozen=True)
class Durability:
    """How durable a submit's record is before it is acknowledged.

    `local`: the primary has it (and its AOF, as configured). `replica`: after the creating
    write, WAIT until `replicas` replicas have it, at most `timeout_ms`; if fewer do, the submit
    is refused as unavailable and its record withdrawn (api_client/jobstate.py `withdraw`)."""

    mode: DurabilityMode = "local"
    replicas: int = 1
    timeout_ms: int = 1000

    @property
    def waits(self) -> bool:
        return self.mode == "replica" and self.replicas > 0


LOCAL = Durability()


def default_durability(url: str, mode: str | None = None, *, timeout_ms: int = 1000) -> Durability:
    """`mode` if given; else `replica` for a Sentinel URL (it has replicas), `local` otherwise."""
    chosen = mode or ("replica" if parse_url(url).is_sentinel else "local")
    if chosen not in ("local", "replica"):
        raise RedisUrlError(f"durability must be local or replica, not {chosen!r}")
    return Durability(mode=chosen, timeout_ms=timeout_ms)  # type: ignore[arg-type]

"""kombu's Redis transports, less one way a lost Redis ends a worker.

When Redis goes away, Celery's consumer closes the broker connection and opens
another. kombu clears the closed connection's `client`; a channel of it that is
closed afterwards (restoring its unacked messages) or that acknowledges a task
that finished meanwhile builds a connection pool from that `client`, and raises
`AttributeError: 'NoneType' object has no attribute 'hostname'`
(`kombu/transport/redis.py` `_connparams`). That is no connection error, so the
consumer's restart reports an "Unrecoverable error" and the worker exits
(reproduced by tests/faults/test_redis_kill.py). Here it is a
`redis.ConnectionError`, which kombu's close ignores and Celery's ack logs
("Couldn't ack"): the message stays in `unacked`, kombu restores it after the
visibility timeout, and the job's fenced claim (lua/claim.lua) drops the
duplicate.

`create_app` (worker/celery_app.py) selects these by `broker_transport`, and
`register` makes them what the `redis://` and `sentinel://` schemes name in this
process: on a lost connection kombu switches to the next URL of a Sentinel list
and picks the transport from its scheme, not from `broker_transport`.
"""

from __future__ import annotations

from typing import Any

import redis
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis


class _ClosedConnectionIsAConnectionError:
    connection: Any

    def _connparams(self, asynchronous: bool = False) -> Any:
        if self.connection.client is None:  # the Connection was closed under this channel
            raise redis.ConnectionError("the broker connection was closed (Redis went away)")
        return super()._connparams(asynchronous)  # type: ignore[misc]


class Channel(_ClosedConnectionIsAConnectionError, kombu_redis.Channel):
    pass


class SentinelChannel(_ClosedConnectionIsAConnectionError, kombu_redis.SentinelChannel):
    pass


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel


def register() -> None:
    """The worker's broker connections use these transports, whichever URL of a list they switch to."""
    TRANSPORT_ALIASES["redis"] = f"{__name__}:Transport"
    TRANSPORT_ALIASES["sentinel"] = f"{__name__}:SentinelTransport"


def transport_for(broker_url: str) -> str:
    """The `broker_transport` for a broker URL (redis:// or kombu's sentinel://)."""
    return f"{__name__}:{'SentinelTransport' if broker_url.startswith('sentinel://') else 'Transport'}"

"""Server-Sent Events of one job: its state changes and its text as it grows.

Two kinds of event:
- `state`: one entry of the job's event list (queued, running, ..., the end), as JSON;
- `delta`: `{"text": ...}`, output text not sent before. Progress snapshots
  (worker/jobs/progress.py) are prefixes of the final text, and the last delta,
  sent just before the `succeeded` event, completes it: the deltas joined
  equal the result's `output_text`.

Every event's id is `<state events sent>:<characters sent>`, so a client that
reconnects with `Last-Event-ID` gets exactly what it has not seen. The stream
ends after the terminal state event. A comment line every 15 s keeps proxies
from closing an idle stream.

Streams share connections: one `Fanout` per API process holds the one pub/sub
connection, subscribed to the channels of the jobs being streamed (each once, however
many streams follow it), and wakes each stream when its job's channel speaks; the
stream then reads the job's list and record through the process's bounded pool.
500 open streams therefore cost one pub/sub connection plus at most the pool's size.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import redis.asyncio as aioredis
import structlog

from api_client import keys
from api_client.redis_conn import async_client
from api_client.schema import JobState

KEEPALIVE_S = 15.0
SUBSCRIBE_TIMEOUT_S = 5.0

log = structlog.get_logger(__name__)


class Fanout:
    """One pub/sub connection for every event stream of this process, fanned out in process."""

    def __init__(self, redis_url: str):
        self._client = async_client(redis_url)  # its own: the one connection
        self.pubsub = self._client.pubsub()
        self._lock = asyncio.Lock()  # one (un)subscribe at a time: the first one opens the connection
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._confirmed: dict[str, asyncio.Event] = {}
        self._reader: asyncio.Task | None = None

    @contextlib.asynccontextmanager
    async def watch(self, channel: str) -> AsyncIterator[asyncio.Event]:
        """An event set whenever `channel` publishes; subscribed (and confirmed) on entry."""
        wake = asyncio.Event()
        waiters = self._waiters.setdefault(channel, set())
        waiters.add(wake)
        if channel not in self._confirmed:
            self._confirmed[channel] = asyncio.Event()
            async with self._lock:
                await self.pubsub.subscribe(channel)
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read())
        try:
            # Subscribed before the stream reads the job: nothing published in between is missed.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._confirmed[channel].wait(), SUBSCRIBE_TIMEOUT_S)
            yield wake
        finally:
            waiters.discard(wake)
            if not waiters and self._waiters.get(channel) is waiters:
                del self._waiters[channel]
                self._confirmed.pop(channel, None)
                with anyio.CancelScope(shield=True):  # a client that hung up cancels the stream's task
                    async with self._lock:
                        await self.pubsub.unsubscribe(channel)

    async def _read(self) -> None:
        while self._waiters:
            try:
                message = await self.pubsub.get_message(timeout=1.0)
            except Exception as exc:  # noqa: BLE001 - the connection comes back; streams re-read on keepalive
                log.warning("events.fanout_read_failed", error=str(exc))
                await asyncio.sleep(0.5)
                continue
            if message is None:
                continue
            channel = message["channel"].decode() if isinstance(message["channel"], bytes) else message["channel"]
            if message["type"] == "subscribe" and channel in self._confirmed:
                self._confirmed[channel].set()
            elif message["type"] == "message":
                for wake in self._waiters.get(channel, ()):
                    wake.set()

    def channels(self) -> int:
        return len(self._waiters)

    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        await self.pubsub.aclose()
        await self._client.aclose()


def parse_last_event_id(value: str | None) -> tuple[int, int]:
    """(state events seen, characters seen) from a Last-Event-ID; (0, 0) when absent or foreign."""
    try:
        states, chars = (value or "").split(":")
        return max(0, int(states)), max(0, int(chars))
    except ValueError:
        return 0, 0


def _frame(event: str, data: dict, states: int, chars: int) -> str:
    return f"id: {states}:{chars}\nevent: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def event_stream(r: aioredis.Redis, fanout: Fanout, job_id: str, last_event_id: str | None, *,
                       renew: Callable[[], Awaitable[None]] | None = None,
                       closed: Callable[[], Awaitable[None]] | None = None) -> AsyncIterator[str]:
    """`renew` runs every KEEPALIVE_S while the stream is open (its place under the tenant's cap),
    `closed` once when it ends."""
    try:
        async with fanout.watch(keys.events_channel(job_id)) as wake:
            async for frame in _frames(r, wake, job_id, last_event_id, renew):
                yield frame
    finally:
        if closed is not None:
            with anyio.CancelScope(shield=True):  # a client that hung up cancels the stream's task
                await closed()


async def _frames(r: aioredis.Redis, wake: asyncio.Event, job_id: str, last_event_id: str | None,
                  renew: Callable[[], Awaitable[None]] | None) -> AsyncIterator[str]:
    seen_states, seen_chars = parse_last_event_id(last_event_id)
    async for kind, data, states, chars in job_updates(r, wake, job_id, seen_states, seen_chars, renew):
        yield ": keepalive\n\n" if kind == "keepalive" else _frame(kind, data, states, chars)


async def job_updates(r: aioredis.Redis, wake: asyncio.Event, job_id: str, states: int = 0, chars: int = 0,
                      renew: Callable[[], Awaitable[None]] | None = None,
                      ) -> AsyncIterator[tuple[str, dict, int, int]]:
    """(kind, data, state events sent, characters sent) until the job's terminal state event:
    kind "delta" ({"text"}), "state" (the event) or "keepalive" (every KEEPALIVE_S of silence).
    `wake` is the job channel's (Fanout.watch). Also the OpenAI routes' streams (openai_chat.py)."""
    record, events_key = keys.job(job_id), keys.events(job_id)
    loop = asyncio.get_running_loop()
    renewed = loop.time()
    while True:
        wake.clear()  # before reading: a message from now on wakes the next wait
        for raw in await r.lrange(events_key, states, -1):
            event = json.loads(raw)
            state = JobState(event["state"])
            if state is JobState.succeeded:
                result = await r.hget(record, "result")
                text = json.loads(result)["output_text"] if result else ""
                if len(text) > chars:
                    yield "delta", {"text": text[chars:]}, states, len(text)
                    chars = len(text)
            states += 1
            yield "state", event, states, chars
            if state.terminal:
                return
        progress = await r.hget(record, "progress_text")
        text = progress.decode() if isinstance(progress, bytes) else (progress or "")
        if len(text) > chars:
            yield "delta", {"text": text[chars:]}, states, len(text)
            chars = len(text)
        try:
            await asyncio.wait_for(wake.wait(), KEEPALIVE_S)
        except TimeoutError:
            yield "keepalive", {}, states, chars
        if renew is not None and loop.time() - renewed >= KEEPALIVE_S:
            await renew()
            renewed = loop.time()

"""The event log: NATS JetStream behind a small typed surface.

- :func:`connect` fails fast when no server answers, then reconnects forever once connected.
- :meth:`Bus.ensure_stream` creates (or checks) the append-only ``TASKS`` stream.
- :meth:`Bus.publish` sends one event with its deterministic id as ``Nats-Msg-Id`` and, when
  asked, an expected last sequence on the task's subjects (optimistic concurrency).
- :meth:`Bus.read` is the ordered reader of history (from a sequence or a time), optionally
  followed live.
- :class:`~shared.worker.Worker` (in ``worker.py``) runs durable pull consumers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import msgspec
import nats
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import (
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from shared import events as ev
from shared.errors import Conflict, Unavailable
from shared.settings import Settings

log = structlog.get_logger("sandstream.bus")

MAX_EVENT_BYTES: Final = 1024 * 1024
"""The stream's ``max_msg_size``: NATS's default payload limit, and more than any event we
publish is allowed to be (output batches, texts, diffs and lists are each capped below it)."""
READ_AHEAD: Final = 64
"""Messages a :meth:`Bus.read` holds for a caller that has not taken them yet."""
WRONG_LAST_SEQUENCE: Final = 10071
STREAM_NOT_FOUND: Final = 10059


class _ApiError(msgspec.Struct, frozen=True):
    code: int = 0
    err_code: int = 0
    description: str = ""


class PubAck(msgspec.Struct, frozen=True):
    """The stream's answer to one publish: where the event is, and whether it was a duplicate
    (an id already stored within the duplicate window: nothing was appended)."""

    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: _ApiError | None = None


class Record(msgspec.Struct, frozen=True):
    """One event as stored: its stream sequence, subject and time of storage."""

    seq: int
    subject: str
    stored_at: datetime
    event: ev.AnyEvent


class StreamSettings(msgspec.Struct, frozen=True, kw_only=True):
    name: str = "TASKS"
    subject_prefix: str = "tasks"
    replicas: int = 1
    duplicate_window_s: float = 6 * 3600.0

    @classmethod
    def of(cls, settings: Settings) -> StreamSettings:
        return cls(
            name=settings.stream,
            subject_prefix=settings.subject_prefix,
            replicas=settings.stream_replicas,
            duplicate_window_s=settings.duplicate_window_s,
        )


@dataclass
class Cursor:
    """How far a :meth:`Bus.read` got: the last stream sequence it was handed, including
    events it skipped (undecodable or untrusted), so "have I read up to X" has an answer
    even when the last event is one nobody may act on."""

    seq: int = 0
    caught_up: bool = False
    """The read ended because nothing was left to deliver (not by the caller stopping)."""


@dataclass(frozen=True)
class NatsAuth:
    """Who a connection is: an nkey seed file, or a credentials file (JWT accounts)."""

    nkey: Path | None = None
    creds: Path | None = None

    @classmethod
    def of(cls, settings: Settings) -> NatsAuth:
        return cls(nkey=settings.nats_nkey, creds=settings.nats_creds)

    def options(self) -> dict[str, str]:
        if self.creds is not None:
            return {"user_credentials": str(self.creds)}
        if self.nkey is not None:
            return {"nkeys_seed": str(self.nkey)}
        return {}


async def connect(
    url: str,
    *,
    name: str,
    auth: NatsAuth | None = None,
    connect_timeout: float = 2.0,
    on_state: Callable[[bool], Awaitable[None]] | None = None,
) -> NATS:
    """Connect to NATS or raise :class:`Unavailable` within about ``connect_timeout`` seconds.

    Once connected the client reconnects forever (a service outlives a NATS restart).
    ``on_state(connected)`` is called on every disconnect and reconnect. A server that refuses
    the identity (``auth``) is :class:`Unavailable` too, with the server's reason.
    """
    for path in (auth.nkey, auth.creds) if auth else ():
        if path is not None and not path.is_file():
            raise Unavailable(f"the NATS identity file {path} does not exist")

    async def disconnected() -> None:
        if nc_ref and nc_ref[0].is_closed:
            return  # our own close(), not an outage
        log.warning("nats disconnected")
        if on_state:
            await on_state(False)

    async def reconnected() -> None:
        log.info("nats reconnected")
        if on_state:
            await on_state(True)

    async def error(exc: Exception) -> None:
        log.debug("nats error", error=str(exc))

    servers = [s.strip() for s in url.split(",") if s.strip()]
    nc_ref: list[NATS] = []
    try:
        # The first connect is bounded: one pass over the servers. Only once connected does
        # the client switch to reconnecting forever (nats.py reads this option on each try).
        nc = await asyncio.wait_for(
            nats.connect(
                servers=servers,
                name=name,
                connect_timeout=connect_timeout,
                allow_reconnect=True,
                max_reconnect_attempts=1,
                reconnect_time_wait=0.2,
                ping_interval=5,
                max_outstanding_pings=2,
                disconnected_cb=disconnected,
                reconnected_cb=reconnected,
                error_cb=error,
                **(auth.options() if auth else {}),
            ),
            timeout=connect_timeout * (len(servers) + 1) + 1,
        )
    except (OSError, nats.errors.Error, TimeoutError) as exc:
        raise Unavailable(f"cannot reach NATS at {url}: {exc or type(exc).__name__}") from exc
    nc_ref.append(nc)
    nc.options["max_reconnect_attempts"] = -1
    nc.options["reconnect_time_wait"] = 0.5
    return nc


class Bus:
    """A connected JetStream context bound to one stream."""

    def __init__(self, nc: NATS, stream: StreamSettings | None = None) -> None:
        self.nc = nc
        self.js = nc.jetstream(timeout=5.0)
        self.stream = stream or StreamSettings()
        self._encoder = msgspec.json.Encoder()
        self._acks: dict[str, asyncio.Future[PubAck]] = {}
        self._ack_inbox: str | None = None
        self._ack_ready = asyncio.Lock()
        self._ack_numbers = itertools.count()
        self._ack_decoder = msgspec.json.Decoder(PubAck)

    @property
    def prefix(self) -> str:
        return self.stream.subject_prefix

    @property
    def connected(self) -> bool:
        return bool(self.nc.is_connected)

    def subject(self, task_id: str, event_type: str) -> str:
        return f"{self.prefix}.{task_id}.{event_type}"

    def task_filter(self, task_id: str) -> str:
        return f"{self.prefix}.{task_id}.>"

    def misfiled(self, subject: str, event: ev.AnyEvent) -> str | None:
        """Why ``event``, stored on ``subject``, must not be trusted; ``None`` when it may.

        Events are untrusted input: a task id that is not one (a path, a subject wildcard),
        or an event whose subject is not ``<prefix>.<its task_id>.<its type>``, or whose id is
        not its task's, is refused before any name, path or container is derived from it.
        """
        if not ev.is_task_id(event.task_id):
            return "task_id is not a task id"
        if subject != self.subject(event.task_id, ev.type_name(type(event))):
            return "the subject does not match the event's task_id and type"
        if not event.event_id.startswith(event.task_id + ":"):
            return "event_id does not belong to the event's task"
        return None

    @property
    def all_filter(self) -> str:
        return f"{self.prefix}.>"

    async def ensure_stream(self) -> None:
        """Create the stream, or check that the existing one has the settings we rely on."""
        s = self.stream
        config = StreamConfig(
            name=s.name,
            subjects=[self.all_filter],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=s.replicas,
            duplicate_window=s.duplicate_window_s,
            deny_delete=True,
            deny_purge=True,
            allow_direct=True,
            max_msg_size=MAX_EVENT_BYTES,
        )
        try:
            info = await self.js.stream_info(s.name)
        except nats.js.errors.NotFoundError:
            await self.js.add_stream(config)
            log.info("stream created", stream=s.name, subjects=config.subjects)
            return
        have = info.config
        if self.all_filter not in (have.subjects or []):
            raise RuntimeError(
                f"stream {s.name} exists with subjects {have.subjects}, not {self.all_filter}"
            )
        if not (have.deny_delete and have.deny_purge):
            raise RuntimeError(f"stream {s.name} exists but is not append-only (deny_delete/purge)")
        if not have.max_msg_size or have.max_msg_size < 0 or have.max_msg_size > MAX_EVENT_BYTES:
            log.warning(
                "stream accepts events larger than any component writes: set its "
                "max_msg_size (an operator's change; no component may edit the stream)",
                stream=s.name,
                max_msg_size=have.max_msg_size,
                wanted=MAX_EVENT_BYTES,
            )

    async def publish(
        self,
        event: ev.Event,
        *,
        msg_id: str | None = None,
        expected_last_subject_seq: int | None = None,
        timeout: float = 2.0,
        encoded: bytes | None = None,
    ) -> PubAck:
        """Append one event on ``<prefix>.<task_id>.<type>`` and wait for the stream's ack.

        With ``expected_last_subject_seq`` the append only happens if the last event on any of
        the task's subjects has that sequence (0: the task has no events yet); otherwise
        :class:`Conflict`. Raises :class:`Unavailable` when NATS is not connected, does not
        answer within ``timeout`` or says the stream cannot store now (503); nothing is
        buffered for later in that case. Any other refusal of the stream (an event over its
        size limit) is nats.py's ``APIError``. ``encoded`` is
        the event's encoding when the caller already made it (the gateway weighs it first).

        The ack comes back on one inbox subscription of this bus, matched by reply subject
        (nats.py's ``request`` makes an id from the system's randomness and a timeout task for
        each one: a tenth of the gateway's time per submission).
        """
        if not self.connected:
            raise Unavailable("the event log (NATS) is not connected")
        name = ev.type_name(type(event))
        headers = {"Nats-Msg-Id": msg_id or event.event_id}
        if expected_last_subject_seq is not None:
            headers["Nats-Expected-Last-Subject-Sequence"] = str(expected_last_subject_seq)
            headers["Nats-Expected-Last-Subject-Sequence-Subject"] = self.task_filter(event.task_id)
        data = encoded if encoded is not None else self._encoder.encode(event)
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[PubAck] = loop.create_future()
        timer = loop.call_at(loop.time() + timeout, _give_up, answer)
        reply = ""
        try:
            reply = await self._ack_subject()
            self._acks[reply] = answer
            await self.nc.publish(
                self.subject(event.task_id, name), data, reply=reply, headers=headers
            )
            ack = await answer
        except (nats.errors.NoRespondersError, TimeoutError) as exc:
            raise Unavailable("the event log (NATS) did not acknowledge in time") from exc
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError) as exc:
            raise Unavailable("the event log (NATS) connection is closed") from exc
        finally:
            timer.cancel()
            self._acks.pop(reply, None)
            if answer.done() and not answer.cancelled():
                answer.exception()  # taken: an answer given up on before it was awaited
        if ack.error is not None:
            if ack.error.err_code == WRONG_LAST_SEQUENCE:
                raise Conflict(f"task {event.task_id} moved on: {ack.error.description}")
            if ack.error.code == 503:  # no stream leader at the moment, for one
                raise Unavailable(f"the event log cannot store it now: {ack.error.description}")
            raise nats.js.errors.APIError(
                code=ack.error.code, err_code=ack.error.err_code, description=ack.error.description
            )
        return ack

    async def _ack_subject(self) -> str:
        """A reply subject no other publish of this bus has, on the bus's ack inbox."""
        if self._ack_inbox is None:
            async with self._ack_ready:
                if self._ack_inbox is None:
                    inbox = self.nc.new_inbox()
                    await self.nc.subscribe(f"{inbox}.*", cb=self._acked)
                    self._ack_inbox = inbox
        return f"{self._ack_inbox}.{next(self._ack_numbers)}"

    async def _acked(self, msg: Msg) -> None:
        answer = self._acks.get(msg.subject)
        if answer is None or answer.done():
            return  # given up on already
        if msg.headers and msg.headers.get("Status") == "503":
            answer.set_exception(nats.errors.NoRespondersError())
            return
        try:
            answer.set_result(self._ack_decoder.decode(msg.data))
        except msgspec.DecodeError as exc:
            answer.set_exception(Unavailable(f"the event log's ack is unreadable: {exc}"))

    async def last(self, task_id: str, event_type: str) -> Record | None:
        """The last event stored on one exact subject; ``None`` when there is none, or when
        it cannot be decoded or trusted (logged)."""
        subject = self.subject(task_id, event_type)
        try:
            raw = await self.js.get_last_msg(self.stream.name, subject, direct=True)
        except nats.js.errors.NotFoundError:
            return None
        except (nats.errors.TimeoutError, TimeoutError) as exc:
            raise Unavailable("the event log (NATS) did not answer in time") from exc
        assert raw.seq is not None and raw.data is not None
        stored_at = _parse_time(raw.headers.get("Nats-Time-Stamp") if raw.headers else None)
        try:
            event = ev.decode(raw.data)
        except msgspec.DecodeError as exc:
            log.warning("undecodable event ignored", seq=raw.seq, error=str(exc))
            return None
        if problem := self.misfiled(subject, event):
            log.warning("untrusted event ignored", seq=raw.seq, reason=problem)
            return None
        return Record(raw.seq, subject, stored_at, event)

    async def history(
        self, task_id: str, *, types: Sequence[str] | None = None, tries: int = 3
    ) -> list[ev.AnyEvent]:
        """A task's events in order (only ``types`` when given), read to its last stored one.

        The one way services read a task's past. Decisions on it can be destructive (a
        sandbox of an "unknown" task is removed, a result is built), so a read that stops
        short of the task's last stored sequence is read again, then :class:`Unavailable`.
        When the last event is of a type not read, the read cannot reach it: it then only
        must not come back empty.
        """
        last, last_subject = await self._last_of_task(task_id)
        if last == 0:
            return []
        subjects = [self.subject(task_id, name) for name in types] if types else None
        if subjects is not None and last_subject not in subjects:
            last = 1
        for _ in range(tries):
            cursor = Cursor()
            try:
                records = [
                    r
                    async for r in self.read(
                        self.task_filter(task_id), subjects=subjects, cursor=cursor
                    )
                ]
            except (nats.errors.Error, TimeoutError) as exc:
                raise Unavailable(f"cannot read the history of {task_id}: {exc}") from exc
            # Up to the last stored event, even when that one was skipped as untrusted.
            if cursor.caught_up and cursor.seq >= last:
                return [r.event for r in records]
            log.warning("history read incomplete, reading again", task_id=task_id)
        raise Unavailable(f"the history of {task_id} came back incomplete")

    async def last_of_task(self, task_id: str) -> int:
        """Stream sequence of the task's last event, 0 if it has none (one direct get)."""
        return (await self._last_of_task(task_id))[0]

    async def _last_of_task(self, task_id: str) -> tuple[int, str]:
        try:
            raw = await self.js.get_last_msg(
                self.stream.name, self.task_filter(task_id), direct=True
            )
        except nats.js.errors.NotFoundError:
            return 0, ""
        except (nats.errors.TimeoutError, TimeoutError) as exc:
            raise Unavailable("the event log (NATS) did not answer in time") from exc
        return int(raw.seq or 0), str(raw.subject or "")

    async def last_sequence(self) -> int:
        """The stream's last sequence number; ``Unavailable`` when NATS does not answer."""
        try:
            info = await self.js.stream_info(self.stream.name)
        except (nats.errors.TimeoutError, TimeoutError) as exc:
            raise Unavailable("the event log (NATS) did not answer in time") from exc
        return int(info.state.last_seq)

    async def read(
        self,
        filter_subject: str | None = None,
        *,
        subjects: Sequence[str] | None = None,
        from_seq: int | None = None,
        since: datetime | None = None,
        follow: bool = False,
        idle_heartbeat: float = 2.0,
        cursor: Cursor | None = None,
    ) -> AsyncGenerator[Record, None]:
        """Yield stored events in stream order through an ordered consumer.

        Without ``follow`` it stops once it has caught up with the stream as it was when the
        read began; with ``follow`` it goes on with live events until the caller stops.
        Events that cannot be decoded or are :meth:`misfiled` are skipped with a warning,
        never fatal.

        Memory is bounded whatever the caller's pace: at most :data:`READ_AHEAD` messages wait
        for it, and while they do, the subscription does not answer the server's flow control,
        so the server stops pushing (a slow SSE client holds back only its own read).

        ``subjects``, instead of ``filter_subject``: several filters, applied by the server
        (the lifecycle reads a task's history without its output batches).
        """
        subject = "" if subjects else filter_subject or self.all_filter
        if from_seq is not None:
            config = ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=max(1, from_seq)
            )
        elif since is not None:
            config = ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_TIME,
                opt_start_time=since,
            )
        else:
            config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        if subjects:
            config.filter_subjects = list(subjects)
        queue: asyncio.Queue[Msg] = asyncio.Queue(READ_AHEAD)

        async def on_msg(msg: Msg) -> None:
            await queue.put(msg)

        sub = await self.js.subscribe(
            subject,
            cb=on_msg,
            ordered_consumer=True,
            idle_heartbeat=idle_heartbeat,
            config=config,
            stream=self.stream.name,
        )
        try:
            if not follow:
                info = await sub.consumer_info()
                # Empty only if nothing was delivered either: messages already pushed can
                # still be on their way to ``queue`` (num_pending no longer counts them).
                delivered = info.delivered.consumer_seq if info.delivered else 0
                if info.num_pending == 0 and not delivered and queue.empty():
                    if cursor is not None:
                        cursor.caught_up = True
                    return
            # nats.py re-creates an ordered consumer that lost its server (a NATS restart)
            # from "the last sequence it delivered + 1", which is 1 when it had delivered
            # nothing yet: the history before ``from_seq``/``since`` would come again. So
            # nothing at or below what was already yielded, or before the start, is yielded.
            floor = from_seq - 1 if from_seq is not None else 0
            start = since if since is None or since.tzinfo else since.replace(tzinfo=UTC)
            while True:
                msg = await queue.get()
                seq, stored_at, pending = _position(msg)
                if seq <= floor or (start is not None and stored_at < start):
                    pass  # delivered again by a re-created consumer
                else:
                    floor = seq
                    if cursor is not None:
                        cursor.seq = seq
                    try:
                        event = ev.decode(msg.data)
                    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
                        log.warning("undecodable event skipped", seq=seq, error=str(exc))
                    else:
                        if problem := self.misfiled(msg.subject, event):
                            log.warning("untrusted event skipped", seq=seq, reason=problem)
                        else:
                            yield Record(seq, msg.subject, stored_at, event)
                if not follow and pending == 0:
                    if cursor is not None:
                        cursor.caught_up = True
                    return
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


def _position(msg: Msg) -> tuple[int, datetime, int]:
    """A delivered message's stream sequence, time of storage and messages still pending, from
    its reply subject: what ``msg.metadata`` says, read without building its objects (a replay
    reads every message of the stream this way)."""
    tokens = (msg.reply or "").split(".")
    if len(tokens) == 9 and tokens[0] == "$JS" and tokens[1] == "ACK":  # $JS.ACK.<stream>...
        seq, nanos, pending = tokens[5], tokens[7], tokens[8]
    elif len(tokens) >= 11 and tokens[0] == "$JS" and tokens[1] == "ACK":  # with a domain
        seq, nanos, pending = tokens[7], tokens[9], tokens[10]
    else:
        meta = msg.metadata  # raises as nats-py does for anything else
        return meta.sequence.stream, meta.timestamp, meta.num_pending
    return int(seq), datetime.fromtimestamp(int(nanos) / 1e9, UTC), int(pending)


def _parse_time(raw: str | None) -> datetime:
    if raw:
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(raw.replace("Z", "+00:00"))
    return ev.now()


_JSON: Final = msgspec.json.Encoder()


def record_json_line(record: Record) -> bytes:
    """One ``replay --json`` line: the event as stored, then ``seq`` and ``subject``."""
    event = _JSON.encode(record.event)  # an object: it ends with its closing brace
    return b'%s,"seq":%d,"subject":%s}\n' % (
        event[:-1],
        record.seq,
        _JSON.encode(record.subject),
    )


def _give_up(answer: asyncio.Future[PubAck]) -> None:
    if not answer.done():
        answer.set_exception(TimeoutError())

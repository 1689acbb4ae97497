"""A scripted fake of the Anthropic Messages API for driving the real Claude Code CLI offline.

A test starts a :class:`FakeModel`, points the CLI at it with ``ANTHROPIC_BASE_URL=fake.url``
and registers scripts: lists of replies (:class:`Text`, :class:`ToolUse`, or a :class:`Reply`
grouping several blocks) that are played, in order, to each CLI run (a *conversation*) whose
prompt matches. Every request is recorded so tests can assert what the CLI (or a proxy in
front of it) sent.

Which reply a request gets is derived from the request itself: the number of assistant turns
already in its ``messages``. A request the CLI retries (after a 5xx, a timeout, a restarted
proxy) therefore gets the same reply again instead of skipping one.

Requests that are not the main agent loop (quota and API-key probes with ``max_tokens: 1``,
tool-free helpers such as title generation, sub-agents and forks with another prompt) get a
short harmless text and never consume a script; see :meth:`FakeModel.classify`.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

from aiohttp import web

__all__ = [
    "Block",
    "FakeModel",
    "RecordedRequest",
    "Reply",
    "ReplyItem",
    "Script",
    "Text",
    "ToolUse",
]

DEFAULT_INPUT_TOKENS = 100
DEFAULT_OUTPUT_TOKENS = 20
FINAL_TEXT = "done"
SIDE_TEXT = "ok"

_CWD_RE = re.compile(r"Primary working directory:\s*(\S[^\n]*?)\s*$", re.MULTILINE)
_REMINDER_PREFIX = "<system-reminder>"
_PING_INTERVAL = 5.0

RequestKind = Literal["main", "side", "count_tokens", "other"]


@dataclass(frozen=True)
class Text:
    """A text content block; as a reply on its own it ends the turn (``end_turn``)."""

    text: str


@dataclass(frozen=True)
class ToolUse:
    """A ``tool_use`` content block.

    ``input`` is sent as given, except that the values of the keys named in ``resolve`` are
    taken as paths relative to the CLI's working directory (parsed from the request's
    "Primary working directory: ..." line) and made absolute.
    """

    name: str
    input: Mapping[str, Any]
    resolve: tuple[str, ...] = ()

    @classmethod
    def write(cls, path: str, content: str) -> ToolUse:
        """``Write`` of ``content`` to ``path`` (relative paths: in the CLI's working dir)."""
        return cls("Write", {"file_path": path, "content": content}, resolve=("file_path",))

    @classmethod
    def edit(cls, path: str, old: str, new: str, *, replace_all: bool = False) -> ToolUse:
        """``Edit`` replacing ``old`` by ``new`` in ``path`` (the CLI requires a Read first)."""
        args = {"file_path": path, "old_string": old, "new_string": new, "replace_all": replace_all}
        return cls("Edit", args, resolve=("file_path",))

    @classmethod
    def read(cls, path: str) -> ToolUse:
        """``Read`` of ``path`` (relative paths: in the CLI's working dir)."""
        return cls("Read", {"file_path": path}, resolve=("file_path",))

    @classmethod
    def bash(cls, command: str, description: str = "Run a command") -> ToolUse:
        """``Bash`` running ``command`` (denied under acceptEdits unless allowed)."""
        return cls("Bash", {"command": command, "description": description})

    def render_input(self, cwd: str | None) -> dict[str, Any]:
        """The tool input with the ``resolve`` keys made absolute against ``cwd``."""
        args = dict(self.input)
        for key in self.resolve:
            value = args.get(key)
            if isinstance(value, str) and cwd and not value.startswith("/"):
                args[key] = f"{cwd.rstrip('/')}/{value}"
        return args


Block: TypeAlias = Text | ToolUse


@dataclass(frozen=True, init=False)
class Reply:
    """One model turn: one or more blocks, plus how it is delivered.

    ``delay`` seconds pass (for streaming: after ``message_start``, with ``ping`` events)
    before the content is sent; when ``hold`` is given, the reply also waits until the
    event is set, so a test can keep the "model" thinking for exactly as long as it needs.
    Without ``pings``, it is silent meanwhile: a stalled model.
    ``input_tokens``/``output_tokens`` override the deterministic usage defaults.
    """

    blocks: tuple[Block, ...]
    delay: float
    hold: asyncio.Event | None
    input_tokens: int
    output_tokens: int
    pings: bool

    def __init__(
        self,
        *blocks: Block,
        delay: float = 0.0,
        hold: asyncio.Event | None = None,
        input_tokens: int = DEFAULT_INPUT_TOKENS,
        output_tokens: int = DEFAULT_OUTPUT_TOKENS,
        pings: bool = True,
    ) -> None:
        if not blocks:
            raise ValueError("Reply needs at least one Text or ToolUse block")
        for block in blocks:
            if not isinstance(block, (Text, ToolUse)):
                raise TypeError(f"Reply blocks must be Text or ToolUse, not {block!r}")
        object.__setattr__(self, "blocks", tuple(blocks))
        object.__setattr__(self, "delay", delay)
        object.__setattr__(self, "hold", hold)
        object.__setattr__(self, "input_tokens", input_tokens)
        object.__setattr__(self, "output_tokens", output_tokens)
        object.__setattr__(self, "pings", pings)

    @property
    def stop_reason(self) -> str:
        return "tool_use" if any(isinstance(b, ToolUse) for b in self.blocks) else "end_turn"


ReplyItem: TypeAlias = Reply | Block | Sequence[Block]
Matcher: TypeAlias = str | re.Pattern[str] | Callable[[str], bool] | None


def _as_reply(item: ReplyItem) -> Reply:
    if isinstance(item, str):
        raise TypeError(f"wrap reply text in Text(...): {item!r}")
    if isinstance(item, Reply):
        return item
    if isinstance(item, (Text, ToolUse)):
        return Reply(item)
    return Reply(*item)


@dataclass
class Script:
    """Replies played to every conversation whose prompt matches ``match``."""

    match: Matcher
    replies: list[Reply]
    conversations: list[str] = field(default_factory=list)

    def matches(self, prompt: str) -> bool:
        m = self.match
        if m is None:
            return True
        if isinstance(m, str):
            return m in prompt
        if isinstance(m, re.Pattern):
            return m.search(prompt) is not None
        return bool(m(prompt))


@dataclass
class RecordedRequest:
    """One HTTP request the fake received. Header names are lower-cased."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any
    kind: RequestKind
    conversation_id: str | None = None
    prompt: str | None = None
    cwd: str | None = None
    reply_index: int | None = None
    status: int = 200
    at: float = field(default_factory=time.monotonic)

    @property
    def api_key(self) -> str | None:
        return self.headers.get("x-api-key")

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")


@dataclass
class _Conversation:
    id: str
    prompt: str
    script: Script | None
    cwd: str | None


@dataclass
class _Failure:
    remaining: int
    status: int
    match: str | None


def _texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [
            b["text"] for b in content if isinstance(b, dict) and isinstance(b.get("text"), str)
        ]
    return []


def prompt_of(body: Mapping[str, Any]) -> str:
    """The user's prompt: the first user message's text, without ``<system-reminder>`` blocks."""
    for msg in body.get("messages") or []:
        if isinstance(msg, dict) and msg.get("role") == "user":
            texts = [
                t for t in _texts(msg.get("content")) if not t.lstrip().startswith(_REMINDER_PREFIX)
            ]
            return "\n".join(texts)
    return ""


def cwd_of(body: Mapping[str, Any]) -> str | None:
    """The working directory the CLI announced ("Primary working directory: ...")."""
    chunks = _texts(body.get("system"))
    for msg in body.get("messages") or []:
        if isinstance(msg, dict):
            chunks.extend(_texts(msg.get("content")))
    for chunk in chunks:
        if found := _CWD_RE.search(chunk):
            return found.group(1)
    return None


def assistant_turns(body: Mapping[str, Any]) -> int:
    """How many assistant turns ``messages`` already holds (consecutive ones count once)."""
    turns, previous = 0, None
    for msg in body.get("messages") or []:
        role = msg.get("role") if isinstance(msg, dict) else None
        if role == "assistant" and previous != "assistant":
            turns += 1
        if role in ("user", "assistant"):
            previous = role
    return turns


def _error_body(kind: str, message: str, request_id: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}, "request_id": request_id}


_ERROR_KINDS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


class FakeModel:
    """An aiohttp server on 127.0.0.1 that speaks enough of the Messages API for the CLI.

    Use ``async with FakeModel() as fake:`` or ``await fake.start()`` / ``await fake.stop()``.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        retry_after_ms: int = 10,
        classify: Callable[[Mapping[str, str], Mapping[str, Any]], RequestKind] | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._retry_after_ms = retry_after_ms
        self._classify_override = classify
        self._runner: web.AppRunner | None = None
        self._ids = itertools.count(1)
        self._changed = asyncio.Condition()
        self.url = ""
        self._scripts: list[Script] = []
        self._default: Script | None = None
        self._failures: list[_Failure] = []
        self._conversations: dict[str, _Conversation] = {}
        self.requests: list[RecordedRequest] = []

    # ---- lifecycle -------------------------------------------------------------------
    async def start(self) -> FakeModel:
        """Bind a free port (or the one given) and start serving; sets :attr:`url`."""
        if self._runner is not None:
            return self
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/v1/messages/count_tokens", self._count_tokens)
        app.router.add_route("*", "/{tail:.*}", self._other)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port)
        await site.start()
        self._runner = runner
        port = runner.addresses[0][1]
        self.url = f"http://{self._host}:{port}"
        return self

    async def stop(self) -> None:
        """Stop serving; open streams are cut. Safe to call twice."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> FakeModel:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- scripting -------------------------------------------------------------------
    def script(self, replies: Sequence[ReplyItem], *, match: Matcher = None) -> Script:
        """Register replies for conversations whose prompt matches ``match``.

        ``match`` is a substring of the prompt, a compiled regex, or a predicate; ``None``
        sets the default script, used when no other matches. Scripts are tried in the order
        they were registered. Each item of ``replies`` is one model turn: a :class:`Reply`,
        a single :class:`Text`/:class:`ToolUse`, or a list of blocks (several tool uses in
        one turn). After the last reply every further turn gets the text ``"done"``.
        """
        s = Script(match=match, replies=[_as_reply(r) for r in replies])
        if match is None:
            self._default = s
        else:
            self._scripts.append(s)
        return s

    def fail_next(self, count: int, *, status: int = 529, match: str | None = None) -> None:
        """Answer the next ``count`` ``/v1/messages`` requests with HTTP ``status``.

        With ``match``, only requests whose prompt contains that substring fail (and count).
        The error has Anthropic's shape and a short ``retry-after-ms`` so the CLI's retries
        are quick.
        """
        self._failures.append(_Failure(remaining=count, status=status, match=match))

    def reset(self) -> None:
        """Forget scripts, failures, recorded requests and conversations."""
        self._scripts = []
        self._default = None
        self._failures = []
        self._conversations = {}
        self.requests = []

    # ---- inspection ------------------------------------------------------------------
    @property
    def conversations(self) -> list[str]:
        """Ids of the conversations (CLI runs) seen, in order of their first main request."""
        return list(self._conversations)

    def conversations_matching(self, substring: str) -> int:
        """How many distinct CLI runs had a prompt containing ``substring``."""
        return sum(1 for c in self._conversations.values() if substring in c.prompt)

    def prompt(self, conversation_id: str) -> str:
        """The prompt of a conversation (KeyError when unknown)."""
        return self._conversations[conversation_id].prompt

    def main_requests(self, conversation_id: str | None = None) -> list[RecordedRequest]:
        """Recorded main-loop requests, optionally of one conversation."""
        return [
            r
            for r in self.requests
            if r.kind == "main"
            and (conversation_id is None or r.conversation_id == conversation_id)
        ]

    async def wait_for(self, predicate: Callable[[], bool], within: float = 10.0) -> None:
        """Wait until ``predicate()`` holds, re-checked after every request.

        Raises TimeoutError when it still does not hold after ``within`` seconds.
        """
        async with asyncio.timeout(within):
            async with self._changed:
                await self._changed.wait_for(predicate)

    # ---- classification --------------------------------------------------------------
    def classify(self, headers: Mapping[str, str], body: Mapping[str, Any]) -> RequestKind:
        """``"main"`` for the agent loop, ``"side"`` for everything else the CLI asks.

        Side requests seen in or read out of CLI 2.1.328: quota / API-key / model probes
        (``max_tokens: 1``, prompts "quota", "test", "Hi", "."), token counting through
        ``messages.create`` (``max_tokens: 1``), and tool-free helpers (session title, tool
        summaries, agent names: no ``tools``). The main loop always sends its tool list.
        Sub-agents and forks (tools, but another prompt in the same session) are told apart
        in :meth:`_messages` once the conversation's prompt is known.
        """
        if self._classify_override is not None:
            return self._classify_override(headers, body)
        max_tokens = body.get("max_tokens")
        if isinstance(max_tokens, int) and max_tokens <= 1:
            return "side"
        if not body.get("tools"):
            return "side"
        return "main"

    # ---- handlers --------------------------------------------------------------------
    def _record(self, request: web.Request, body: Any, kind: RequestKind) -> RecordedRequest:
        rec = RecordedRequest(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
            kind=kind,
        )
        self.requests.append(rec)
        return rec

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _request_id(self) -> str:
        return f"req_fake_{next(self._ids):08d}"

    def _error(self, rec: RecordedRequest, status: int, message: str) -> web.Response:
        rec.status = status
        headers = {"request-id": self._request_id()}
        if status in (408, 409, 429) or status >= 500:
            headers["retry-after-ms"] = str(self._retry_after_ms)
            headers["x-should-retry"] = "true"
        kind = _ERROR_KINDS.get(status, "api_error")
        return web.json_response(
            _error_body(kind, message, headers["request-id"]), status=status, headers=headers
        )

    def _take_failure(self, prompt: str) -> int | None:
        for f in self._failures:
            if f.remaining > 0 and (f.match is None or f.match in prompt):
                f.remaining -= 1
                return f.status
        return None

    async def _other(self, request: web.Request) -> web.Response:
        rec = self._record(request, await request.text() or None, "other")
        await self._notify()
        if request.path == "/api/hello":  # the CLI's connectivity probe (HEAD), when enabled
            return web.Response(status=200)
        return self._error(rec, 404, f"Not found: {request.method} {request.path}")

    async def _count_tokens(self, request: web.Request) -> web.Response:
        raw = await request.read()
        rec = self._record(request, None, "count_tokens")
        await self._notify()
        try:
            rec.body = json.loads(raw)
        except ValueError:
            return self._error(rec, 400, "request body is not valid JSON")
        # Deterministic and plausible: about four bytes of request per token.
        return web.json_response({"input_tokens": max(1, len(raw) // 4)})

    def _conversation(self, rec: RecordedRequest) -> _Conversation:
        """The conversation of a main request; its first request picks the script."""
        assert rec.conversation_id is not None and rec.prompt is not None
        conv = self._conversations.get(rec.conversation_id)
        if conv is None:
            script = next((s for s in self._scripts if s.matches(rec.prompt)), self._default)
            conv = _Conversation(rec.conversation_id, rec.prompt, script, rec.cwd)
            self._conversations[conv.id] = conv
            if script is not None:
                script.conversations.append(conv.id)
        return conv

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError:
            rec = self._record(request, raw.decode(errors="replace"), "side")
            await self._notify()
            return self._error(rec, 400, "request body must be a JSON object")
        headers = {k.lower(): v for k, v in request.headers.items()}
        kind = self.classify(headers, body)
        rec = self._record(request, body, kind)
        prompt = prompt_of(body)
        rec.prompt = prompt
        rec.cwd = cwd_of(body)
        rec.conversation_id = headers.get("x-claude-code-session-id") or (
            "h:" + hashlib.sha256(prompt.encode()).hexdigest()[:16]
        )
        conv = self._conversation(rec) if kind == "main" else None
        if conv is not None and prompt != conv.prompt:
            # The same run under another prompt: a sub-agent or a fork, not the main loop.
            rec.kind, conv = "side", None
        status = self._take_failure(prompt)
        if status is not None:
            await self._notify()
            return self._error(rec, status, "Overloaded" if status == 529 else "Injected failure")

        if conv is not None:
            rec.reply_index = index = assistant_turns(body)
            replies = conv.script.replies if conv.script is not None else []
            reply = replies[index] if index < len(replies) else Reply(Text(FINAL_TEXT))
            cwd = rec.cwd or conv.cwd
        else:
            reply = Reply(Text(SIDE_TEXT), input_tokens=0, output_tokens=0)
            cwd = rec.cwd
        await self._notify()

        message = self._message(body, reply, cwd)
        if body.get("stream"):
            return await self._stream(request, message, reply)
        await self._wait(reply)
        return web.json_response(message, headers={"request-id": self._request_id()})

    def _message(self, body: Mapping[str, Any], reply: Reply, cwd: str | None) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        for block in reply.blocks:
            if isinstance(block, Text):
                content.append({"type": "text", "text": block.text})
            else:
                content.append(
                    {
                        "type": "tool_use",
                        "id": f"toolu_fake{next(self._ids):016d}",
                        "name": block.name,
                        "input": block.render_input(cwd),
                    }
                )
        return {
            "id": f"msg_fake{next(self._ids):016d}",
            "type": "message",
            "role": "assistant",
            "model": body.get("model", "claude-fake"),
            "content": content,
            "stop_reason": reply.stop_reason,
            "stop_sequence": None,
            "usage": {
                "input_tokens": reply.input_tokens,
                "output_tokens": reply.output_tokens,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            },
        }

    async def _wait(self, reply: Reply, ping: Callable[[], Awaitable[None]] | None = None) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + reply.delay
        while (left := deadline - loop.time()) > 0:
            await asyncio.sleep(min(left, _PING_INTERVAL))
            if ping is not None and deadline - loop.time() > 0:
                await ping()
        if reply.hold is not None:
            while not reply.hold.is_set():
                try:
                    await asyncio.wait_for(reply.hold.wait(), _PING_INTERVAL)
                except TimeoutError:
                    if ping is not None:
                        await ping()

    async def _stream(
        self, request: web.Request, message: dict[str, Any], reply: Reply
    ) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "request-id": self._request_id(),
            }
        )
        await resp.prepare(request)

        async def send(event: str, data: Mapping[str, Any]) -> None:
            await resp.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())

        usage = message["usage"]
        start = dict(message, content=[], stop_reason=None, usage=dict(usage, output_tokens=1))
        await send("message_start", {"type": "message_start", "message": start})
        await send("ping", {"type": "ping"})
        await self._wait(reply, (lambda: send("ping", {"type": "ping"})) if reply.pings else None)
        for index, block in enumerate(message["content"]):
            if block["type"] == "text":
                await send(
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": index,
                        "content_block": {"type": "text", "text": ""},
                    },
                )
                for piece in _chunks(block["text"], 48):
                    delta = {"type": "text_delta", "text": piece}
                    await send(
                        "content_block_delta",
                        {"type": "content_block_delta", "index": index, "delta": delta},
                    )
            else:
                head = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
                await send(
                    "content_block_start",
                    {"type": "content_block_start", "index": index, "content_block": head},
                )
                for piece in _chunks(json.dumps(block["input"]), 48):
                    delta = {"type": "input_json_delta", "partial_json": piece}
                    await send(
                        "content_block_delta",
                        {"type": "content_block_delta", "index": index, "delta": delta},
                    )
            await send("content_block_stop", {"type": "content_block_stop", "index": index})
        await send(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                "usage": {"output_tokens": usage["output_tokens"]},
            },
        )
        await send("message_stop", {"type": "message_stop"})
        await resp.write_eof()
        return resp


def _chunks(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]

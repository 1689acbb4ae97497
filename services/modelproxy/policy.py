"""What the model proxy lets through (docs/api.md, "Limits, quotas and rate limits").

- Bodies: at most ``max_body_bytes`` (``SANDSTREAM_MAX_MODEL_BODY_BYTES``), read within
  ``body_timeout_s``; at most ``max_connections`` open connections per task.
- Fields: only the Messages API's own top-level fields are forwarded; ``mcp_servers``,
  ``container`` and typed tools (server-side tools such as web search, web fetch and code
  execution; the CLI's own tools are plain named tools) are removed unless
  ``SANDSTREAM_ALLOW_SERVER_TOOLS=1``. Unknown fields are removed, and named in the log.
- Models: ``SANDSTREAM_ALLOWED_MODELS``, comma-separated globs (default ``claude-*``).
- Budget: a task's ``max_tokens`` (all input, cache and output tokens over the run) and
  ``max_budget_usd`` (priced by :class:`Prices` from the usage the upstream reports); the first
  call once either is reached is refused.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Mapping, Sequence
from typing import Any, Final

import msgspec

MiB: Final = 1024 * 1024

# The Messages API's request fields (https://docs.anthropic.com/en/api/messages).
MESSAGES_FIELDS: Final = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "system",
        "metadata",
        "stop_sequences",
        "stream",
        "temperature",
        "top_k",
        "top_p",
        "tools",
        "tool_choice",
        "thinking",
        "service_tier",
        "context_management",
        "output_format",
        "output_config",
    }
)
SERVER_FIELDS: Final = frozenset({"mcp_servers", "container"})

# USD per million tokens: input, output, cache write, cache read. The first matching glob
# wins; a model matching none is priced as the dearest entry. List prices when written:
# override them with SANDSTREAM_MODEL_PRICES.
DEFAULT_PRICES: Final[dict[str, tuple[float, float, float, float]]] = {
    "claude-opus-4-5*": (5.0, 25.0, 6.25, 0.5),
    "claude-opus-4*": (15.0, 75.0, 18.75, 1.5),
    "claude-sonnet-4*": (3.0, 15.0, 3.75, 0.3),
    "claude-3-7-sonnet*": (3.0, 15.0, 3.75, 0.3),
    "claude-haiku-4*": (1.0, 5.0, 1.25, 0.1),
    "claude-3-5-haiku*": (0.8, 4.0, 1.0, 0.08),
}


class Prices:
    """Model globs to per-million-token prices."""

    def __init__(self, table: Mapping[str, Sequence[float]]) -> None:
        if not table:
            raise ValueError("the price table is empty")
        self._table: list[tuple[str, tuple[float, float, float, float]]] = []
        for glob, row in table.items():
            if len(row) != 4 or not all(
                isinstance(p, int | float) and not isinstance(p, bool) and p >= 0 for p in row
            ):
                raise ValueError(
                    f"price of {glob!r} must be 4 numbers >= 0 (input, output, cache write, "
                    "cache read, USD per million tokens)"
                )
            self._table.append((glob, (float(row[0]), float(row[1]), float(row[2]), float(row[3]))))
        self._dearest = max((row for _, row in self._table), key=lambda r: r[1])

    @classmethod
    def parse(cls, text: str | None) -> Prices:
        """``SANDSTREAM_MODEL_PRICES``: a JSON object of glob to 4 prices; empty: defaults."""
        if not text:
            return cls(DEFAULT_PRICES)
        try:
            table = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        if not isinstance(table, dict):
            raise ValueError("must be a JSON object of model glob to [in, out, write, read]")
        return cls(table)

    def cost(self, model: str, usage: Mapping[str, int]) -> float:
        row = next((r for glob, r in self._table if fnmatch.fnmatchcase(model, glob)), None)
        price_in, price_out, price_write, price_read = row or self._dearest
        return (
            usage.get("input_tokens", 0) * price_in
            + usage.get("output_tokens", 0) * price_out
            + usage.get("cache_creation_input_tokens", 0) * price_write
            + usage.get("cache_read_input_tokens", 0) * price_read
        ) / 1_000_000


class ProxyPolicy(msgspec.Struct, frozen=True, kw_only=True):
    max_body_bytes: int = 8 * MiB
    max_connections: int = 16
    """Open connections per task (the CLI uses a handful)."""
    body_timeout_s: float = 60.0
    allowed_models: tuple[str, ...] = ("claude-*",)
    allow_server_tools: bool = False
    prices: str = ""
    """``SANDSTREAM_MODEL_PRICES`` as given (empty: :data:`DEFAULT_PRICES`)."""


class Budget(msgspec.Struct, frozen=True, kw_only=True):
    """A task's caps on its model use (``None``: no cap)."""

    max_tokens: int | None = None
    max_budget_usd: float | None = None

    def exceeded(self, tokens: int, cost_usd: float) -> str:
        """Why the next call is refused, or ``""``."""
        if self.max_tokens is not None and tokens >= self.max_tokens:
            return f"the task used {tokens} model tokens, its max_tokens is {self.max_tokens}"
        if self.max_budget_usd is not None and cost_usd >= self.max_budget_usd:
            return (
                f"the task's model calls cost ${cost_usd:.4f}, its max_budget_usd is "
                f"${self.max_budget_usd:g}"
            )
        return ""


class Refused(Exception):
    """A request the policy does not forward; ``str()`` says why, for the agent to read."""


def shown(text: str, limit: int = 64) -> str:
    """Agent-written text as it may appear in a log line or an error: cut to ``limit``."""
    return text if len(text) <= limit else text[:limit] + "…"


def model_allowed(model: str, globs: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(model, glob) for glob in globs)


def screen(body: Any, policy: ProxyPolicy) -> tuple[dict[str, Any], list[str]]:
    """The body to forward and the names of what was removed; raises :class:`Refused`."""
    if not isinstance(body, dict):
        raise Refused("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise Refused("the request names no model")
    if not model_allowed(model, policy.allowed_models):
        raise Refused(
            f"model {shown(model)!r} is not allowed here "
            f"(allowed: {', '.join(policy.allowed_models)})"
        )
    kept = MESSAGES_FIELDS | (SERVER_FIELDS if policy.allow_server_tools else frozenset())
    removed = sorted(shown(k) for k in body if k not in kept)
    out = {k: v for k, v in body.items() if k in kept}
    tools = out.get("tools")
    if isinstance(tools, list) and not policy.allow_server_tools:
        plain = [t for t in tools if not isinstance(t, dict) or t.get("type") in (None, "custom")]
        if len(plain) != len(tools):
            removed += sorted(
                f"tools[{shown(str(t.get('type')))}]"
                for t in tools
                if isinstance(t, dict) and t.get("type") not in (None, "custom")
            )
            out["tools"] = plain
    return out, removed

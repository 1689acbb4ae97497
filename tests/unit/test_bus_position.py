"""A delivered message's place in the stream, read from its reply subject as nats-py reads it."""

from __future__ import annotations

import pytest
from nats.aio.msg import Msg
from nats.errors import NotJSMessageError

from shared.bus import _position

REPLIES = [
    "$JS.ACK.TASKS.c1.1.4187.12.1765100000123456789.0",  # without a domain
    "$JS.ACK.hub.ACCHASH.TASKS.c1.2.77.5.1765100000987654321.31.rand",  # with one
    "$JS.ACK._.ACCHASH.TASKS.c1.1.9.9.1765100000000000001.3",  # no domain, v2, no token
]


@pytest.mark.parametrize("reply", REPLIES)
def test_the_position_is_what_nats_py_reads(reply: str) -> None:
    msg = Msg(_client=None, subject="t.x", reply=reply, data=b"")  # type: ignore[arg-type]
    meta = msg.metadata
    assert _position(msg) == (meta.sequence.stream, meta.timestamp, meta.num_pending)


def test_a_reply_that_is_no_jetstream_position_is_refused_as_nats_py_refuses_it() -> None:
    msg = Msg(_client=None, subject="t.x", reply="_INBOX.abc", data=b"")  # type: ignore[arg-type]
    with pytest.raises(NotJSMessageError):
        _position(msg)

"""The exec output splitter: the same lines as a plain split, for any chunking; bounded."""

from __future__ import annotations

import random

from shared.sandbox import LineSplitter


def split_in_chunks(data: bytes, sizes: list[int], max_line: int = 1 << 20) -> list[bytes]:
    splitter = LineSplitter(max_line)
    out: list[bytes] = []
    start = 0
    for size in sizes:
        out += splitter.feed(data[start : start + size])
        start += size
    out += splitter.feed(data[start:])
    if (rest := splitter.rest()) is not None:
        out.append(rest)
    return out


def test_any_chunking_gives_the_lines_of_a_plain_split() -> None:
    rng = random.Random(7)
    for _ in range(200):
        data = b"".join(rng.choice([b"a", b"bc", b"\n", b"{}", b"\n\n"]) for _ in range(60))
        sizes = [rng.randint(0, 7) for _ in range(rng.randint(0, 20))]
        expected = data.split(b"\n")
        if expected[-1] == b"":
            expected.pop()  # a final newline ends the last line; it starts no new one
        assert split_in_chunks(data, sizes) == expected, (data, sizes)


def test_a_line_without_end_is_cut_and_the_stream_goes_on() -> None:
    splitter = LineSplitter(max_line=100)
    lines: list[bytes] = []
    for _ in range(1000):  # 64 MB of one line, in 64 KB chunks, never held at once
        lines += splitter.feed(b"x" * 65_536)
    lines += splitter.feed(b"tail of the long line\nnext\n")
    assert lines == [b"x" * 100, b"next"]
    assert splitter.cut == 1 and splitter.rest() is None


def test_a_line_of_exactly_the_limit_is_kept_whole() -> None:
    splitter = LineSplitter(max_line=4)
    assert splitter.feed(b"abcd\nabcde\nz") == [b"abcd", b"abcd"]
    assert splitter.cut == 1 and splitter.rest() == b"z"

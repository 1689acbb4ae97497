"""CPU time to split an agent's exec output into lines: the old split vs ``LineSplitter``.

An agent that writes N MiB without a newline, read in 64 KiB chunks (what the engine hands
over). The old code re-split the whole pending buffer on every chunk (quadratic); the splitter
scans each byte once and keeps at most ``MAX_LINE_BYTES``.

    python bench/line_split.py [--mib 12 25 50]
"""

from __future__ import annotations

import argparse
import time

from shared.sandbox import MAX_LINE_BYTES, LineSplitter

CHUNK = 64 * 1024


def old_split(total: int) -> float:
    started = time.process_time()
    pending = b""
    chunk = b"x" * CHUNK
    for _ in range(total // CHUNK):
        pending += chunk
        *_complete, pending = pending.split(b"\n")
    return time.process_time() - started


def splitter(total: int) -> float:
    started = time.process_time()
    lines = LineSplitter(MAX_LINE_BYTES)
    chunk = b"x" * CHUNK
    for _ in range(total // CHUNK):
        lines.feed(chunk)
    return time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, nargs="+", default=[12, 25, 50])
    args = parser.parse_args()
    print(f"{'MiB':>5} {'old split (s)':>14} {'LineSplitter (s)':>17}")
    for mib in args.mib:
        total = mib << 20
        print(f"{mib:>5} {old_split(total):>14.3f} {splitter(total):>17.4f}")


if __name__ == "__main__":
    main()

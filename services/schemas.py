"""Writes ``schemas/``: the JSON Schema of every event and of ``result.json``, and the HTTP API's
OpenAPI document, all generated from the msgspec types that the code itself uses.

``python -m services.schemas`` (``make schemas``) writes them; ``--check`` exits 1 when the files
on disk differ from what the code generates (a test runs that check).
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path
from typing import Any

from shared.events import event_schemas


def generated() -> dict[str, Any]:
    """Relative path → JSON document, for everything under ``schemas/``."""
    from services.gateway.openapi import openapi
    from shared.results import result_schema

    docs: dict[str, Any] = {
        f"events/{name}.json": schema for name, schema in event_schemas().items()
    }
    docs["result.json"] = result_schema()
    docs["openapi.json"] = openapi()
    return docs


def portable(doc: Any) -> Any:
    """``doc`` with every ``description`` cleaned the way ``inspect.cleandoc`` does.

    msgspec copies docstrings into schemas, and its releases differ in whether they dedent
    them; cleaning them ourselves makes the output the same whatever version generated it.
    """
    if isinstance(doc, dict):
        return {
            key: inspect.cleandoc(value)
            if key == "description" and isinstance(value, str)
            else portable(value)
            for key, value in doc.items()
        }
    if isinstance(doc, list):
        return [portable(item) for item in doc]
    return doc


def render(doc: Any) -> str:
    """The committed (and served) text of a schema document: stable across platforms."""
    return json.dumps(portable(doc), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, default=Path("schemas"))
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 on drift")
    args = parser.parse_args(argv)
    drift = []
    docs = generated()
    for rel, doc in docs.items():
        path = args.dir / rel
        text = render(doc)
        if args.check:
            if not path.exists() or path.read_text() != text:
                drift.append(rel)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    known = (
        {str(p.relative_to(args.dir)) for p in args.dir.rglob("*.json")}
        if args.dir.exists()
        else set()
    )
    stale = sorted(known - set(docs))
    if args.check and (drift or stale):
        print(
            f"schemas drifted from the code: {drift + stale}; run `make schemas`", file=sys.stderr
        )
        return 1
    if not args.check:
        for rel in stale:
            (args.dir / rel).unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())

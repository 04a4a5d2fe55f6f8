"""Generate the published wire contract: JSON Schema files from the pydantic models.

Why generated, and checked in: producers and consumers in other languages validate against
the JSON Schema, and the schema must never drift from what the worker actually accepts and
emits. The pydantic models in `schemas/events.py` are the single source; this script writes
`schemas/json/*.schema.json`, and `tests/test_wire_schemas.py` fails when the checked-in files
differ from what the models generate now (re-run this script after changing a model).

    .venv/bin/python scripts/gen_wire_schemas.py           # (re)write the files
    .venv/bin/python scripts/gen_wire_schemas.py --check   # exit 1 if any file is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

OUT_DIR = REPO / "schemas" / "json"
DRAFT = "https://json-schema.org/draft/2020-12/schema"


def _documents() -> dict[str, dict[str, Any]]:
    from schemas import events

    specs = [
        ("turns-topic.inbound.schema.json", events.INBOUND_EVENT_ADAPTER, "validation",
         "evostream turns topic: inbound event (tolerant reader)",
         "A turn or a delete, as producers publish it. Unknown fields are accepted "
         "(additionalProperties); see README 'Wire format'."),
        ("turns-topic.inbound-v1-strict.schema.json", events.INBOUND_EVENT_V1_ADAPTER, "validation",
         "evostream turns topic: inbound event, version-1 strict contract",
         "What EVOSTREAM_INPUT_STRICT=true accepts: no unknown fields, roles user/assistant only."),
        ("embeddings-topic.outbound.schema.json", events.OUTBOUND_EVENT_ADAPTER, "serialization",
         "evostream embeddings topic: outbound event",
         "An embedding of one turn, or a conversation_deleted tombstone."),
        ("dead-letter-topic.schema.json", events.DeadLetterEvent, "serialization",
         "evostream dead-letter topic: a record that could not be processed", None),
    ]
    docs = {}
    for filename, target, mode, title, description in specs:
        if hasattr(target, "json_schema"):
            schema = target.json_schema(mode=mode)
        else:
            schema = target.model_json_schema(mode=mode)
        head: dict[str, Any] = {"$schema": DRAFT, "$id": f"https://evostream.invalid/schemas/{filename}",
                                "title": title}
        if description:
            head["description"] = description
        schema.pop("title", None) if "oneOf" in schema or "anyOf" in schema else None
        docs[filename] = {**head, **{k: v for k, v in schema.items() if k not in head}}
    return docs


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 if a file is stale")
    args = parser.parse_args(argv)
    stale = []
    for filename, doc in _documents().items():
        path = OUT_DIR / filename
        text = render(doc)
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        stale.append(filename)
        if not args.check:
            OUT_DIR.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    if args.check and stale:
        print(f"stale wire schemas (run scripts/gen_wire_schemas.py): {stale}", file=sys.stderr)
        return 1
    print(("wrote " if stale and not args.check else "up to date: ") + ", ".join(stale or sorted(_documents())))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Our OpenAI-shaped answers checked against OpenAI's own OpenAPI document, strictly: the
component schemas of Chat Completions (whole and each stream chunk), embeddings, models
and errors, each object closed to the fields it names (`additionalProperties: false`
added where the document leaves it open), validated as JSON Schema 2020-12.

The schemas are taken once from openai/openai-openapi (`openapi.json`) with everything
they reference and kept in tests/golden/openai_schemas.json with the commit they came
from; `python -m tests.openai_spec <openapi.json> <commit>` writes it again. The
Responses API is checked against the Open Responses schema and the SDK's types instead
(tests/helpers.py): OpenAI's document composes it with allOf, which closing would break.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import jsonschema

SCHEMAS_FILE = Path(__file__).parent / "golden" / "openai_schemas.json"
ROOTS = ("CreateChatCompletionResponse", "CreateChatCompletionStreamResponse",
         "CreateEmbeddingResponse", "Model", "ListModelsResponse", "ErrorResponse")  # fmt: skip


def extract(document: dict[str, Any], commit: str) -> dict[str, Any]:
    """The root schemas and all they reference."""
    schemas = document["components"]["schemas"]
    kept: dict[str, Any] = {}

    def visit(value: Any) -> None:
        if isinstance(value, dict):
            ref = value.get("$ref")
            if isinstance(ref, str) and ref.split("/")[-1] not in kept:
                name = ref.split("/")[-1]
                kept[name] = schemas[name]
                visit(schemas[name])
            for item in value.values():
                visit(item)
        elif isinstance(value, list):
            for item in value:
                visit(item)

    for root in ROOTS:
        kept[root] = schemas[root]
        visit(schemas[root])
    source = f"openai/openai-openapi@{commit} openapi.json ({document['info']['version']})"
    return {"source": source, "schemas": dict(sorted(kept.items()))}


def _closed(value: Any) -> Any:
    """Every object schema that names its properties, closed to them; and OpenAPI 3.0's
    `nullable: true`, which the document still uses, as JSON Schema says it."""
    if isinstance(value, dict):
        out = {k: _closed(v) for k, v in value.items() if k != "nullable"}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        if value.get("nullable") is True:
            if "$ref" in out:
                return {"anyOf": [out, {"type": "null"}]}
            if isinstance(out.get("type"), str):
                out["type"] = [out["type"], "null"]
            if isinstance(out.get("enum"), list):
                out["enum"] = [*out["enum"], None]
        return out
    if isinstance(value, list):
        return [_closed(item) for item in value]
    return value


class OpenAISchemas:
    def __init__(self, data: dict[str, Any]) -> None:
        self.source = data["source"]
        self.components = {"schemas": _closed(data["schemas"])}

    def errors(self, value: Any, name: str) -> list[str]:
        """What of `value` is not the schema `name`; [] if it is."""
        schema = {"$ref": f"#/components/schemas/{name}", "components": self.components}
        validator = jsonschema.Draft202012Validator(schema)
        return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"[:300]
                for e in validator.iter_errors(value)]  # fmt: skip


def openai_schemas() -> OpenAISchemas:
    return OpenAISchemas(json.loads(SCHEMAS_FILE.read_text()))


if __name__ == "__main__":
    document = json.loads(Path(sys.argv[1]).read_text())
    SCHEMAS_FILE.write_text(json.dumps(extract(document, sys.argv[2]), indent=1) + "\n")

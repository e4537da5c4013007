"""Our Anthropic answers checked against the Anthropic TypeScript SDK's own types, strict:
every field an interface requires is there (null where it allows null), no field it does
not name, literals and enums respected, recursively.

The types are read once from the SDK's published declarations (`npm pack
@anthropic-ai/sdk`) and kept in tests/golden/anthropic_types.json, with the version
they came from; `python -m tests.sdk_types <unpacked package dir>` writes it again.
The TypeScript types are the stricter of the two SDKs': a field that Python gives a
default of None is one TypeScript requires, present.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

TYPES_FILE = Path(__file__).parent / "golden" / "anthropic_types.json"
DECLARATIONS = ("resources/messages/messages.d.ts", "resources/models.d.ts",
                "resources/shared.d.ts")  # fmt: skip

_INTERFACE = re.compile(r"^export interface (\w+) \{\n(.*?)^\}", re.M | re.S)
_NAMESPACE = re.compile(r"^export declare namespace (\w+) \{\n(.*?)^\}", re.M | re.S)
_INNER = re.compile(r"^    interface (\w+) \{\n(.*?)^    \}", re.M | re.S)
_ALIAS = re.compile(r"^export type (\w+) = (.*?);$", re.M)
_COMMENT = re.compile(r"/\*.*?\*/", re.S)


def _fields(body: str) -> dict[str, dict[str, Any]]:
    fields = {}
    for line in _COMMENT.sub("", body).splitlines():
        found = re.match(r"^\s*(\w+)(\??): (.*);$", line)
        if found:
            name, optional, kind = found.groups()
            fields[name] = {"required": not optional, "type": kind}
    return fields


def extract(package: Path) -> dict[str, Any]:
    """The interfaces and type aliases of the SDK's declarations."""
    interfaces: dict[str, Any] = {}
    aliases: dict[str, str] = {}
    for name in DECLARATIONS:
        text = (package / name).read_text()
        for found in _INTERFACE.finditer(text):
            interfaces[found.group(1)] = _fields(found.group(2))
        for space in _NAMESPACE.finditer(text):
            for inner in _INNER.finditer(space.group(2)):
                interfaces[f"{space.group(1)}.{inner.group(1)}"] = _fields(inner.group(2))
        for found in _ALIAS.finditer(text):
            aliases[found.group(1)] = found.group(2)
    version = json.loads((package / "package.json").read_text())["version"]
    return {"sdk": f"@anthropic-ai/sdk {version}", "interfaces": interfaces, "aliases": aliases}


def _split(kind: str) -> list[str]:
    """The alternatives of a union, at the top level (not inside <...>, (...), {...})."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(kind):
        if char in "<({":
            depth += 1
        elif char in ">)}":
            depth -= 1
        elif char == "|" and depth == 0:
            parts.append(kind[start:i].strip())
            start = i + 1
    parts.append(kind[start:].strip())
    return parts


class Types:
    def __init__(self, data: dict[str, Any]) -> None:
        self.interfaces: dict[str, dict[str, Any]] = data["interfaces"]
        self.aliases: dict[str, str] = data["aliases"]

    def errors(self, value: Any, kind: str, path: str = "") -> list[str]:
        """What of `value` is not `kind` (a TypeScript type expression); [] if it is."""
        alternatives = _split(kind)
        found: list[str] = []
        unknown = []
        for alternative in alternatives:
            try:
                wrong = self._one(value, alternative, path)
            except KeyError:  # an alternative from a module not extracted: not this one
                unknown.append(alternative)
                continue
            if not wrong:
                return []
            found = found or wrong
            # The alternative that names the value's own `type` says best what is wrong.
            named = self.interfaces.get(alternative.split(".")[-1]) or self.interfaces.get(
                alternative
            )
            own = (named or {}).get("type", {}).get("type", "")
            if isinstance(value, dict) and own == f"'{value.get('type')}'":
                found = wrong
        if len(unknown) == len(alternatives):
            raise KeyError(f"{path}: the type {kind!r} is not in the extracted types")
        return found or [f"{path}: {value!r} is not {kind}"]

    def _one(self, value: Any, kind: str, path: str) -> list[str]:
        kind = kind.strip()
        if kind.startswith("(") and kind.endswith(")") and "&" not in kind:
            return self.errors(value, kind[1:-1], path)
        if kind in ("unknown", "(string & {})") or kind.startswith("{ [key: string]"):
            return [] if kind == "unknown" or isinstance(value, str | dict) else [path]
        if kind == "null":
            return [] if value is None else [f"{path}: {value!r} is not null"]
        if kind == "string":
            return [] if isinstance(value, str) else [f"{path}: {value!r} is not a string"]
        if kind == "number":
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            return [] if ok else [f"{path}: {value!r} is not a number"]
        if kind == "boolean":
            return [] if isinstance(value, bool) else [f"{path}: {value!r} is not a boolean"]
        if kind.startswith("'"):
            return [] if value == kind[1:-1] else [f"{path}: {value!r} is not {kind}"]
        if kind.startswith("Array<") and kind.endswith(">"):
            if not isinstance(value, list):
                return [f"{path}: {value!r} is not a list"]
            return [
                e for i, v in enumerate(value) for e in self.errors(v, kind[6:-1], f"{path}.{i}")
            ]
        name = kind
        if name not in self.interfaces and name not in self.aliases and "." in name:
            name = name.split(".", 1)[1]  # MessagesAPI.Usage: a module's prefix
        if name in self.aliases:
            return self.errors(value, self.aliases[name], path)
        if name in self.interfaces:
            return self.check(value, name, path)
        raise KeyError(f"{path}: the type {kind!r} is not in the extracted types")

    def check(self, value: Any, interface: str, path: str = "") -> list[str]:
        """What of `value` is not the interface, strictly: no field it does not name."""
        fields = self.interfaces[interface]
        if not isinstance(value, dict):
            return [f"{path}: {value!r} is not an object ({interface})"]
        out = [f"{path}.{k}: not a field of {interface}" for k in value if k not in fields]
        for name, field in fields.items():
            if name not in value:
                if field["required"]:
                    out.append(f"{path}.{name}: required by {interface}, missing")
                continue
            out += self.errors(value[name], field["type"], f"{path}.{name}")
        return out


def anthropic_types() -> Types:
    return Types(json.loads(TYPES_FILE.read_text()))


if __name__ == "__main__":
    TYPES_FILE.write_text(json.dumps(extract(Path(sys.argv[1])), indent=1, sort_keys=True) + "\n")

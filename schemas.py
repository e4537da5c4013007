"""JSON Schema, the little this service needs of it: an instance made from a schema
(what `echo` answers a tool call or a structured-output request with, so a client
library can be tried with no provider key), and a schema cut down to what
Anthropic's structured outputs take.

`example` covers what tool and output schemas use in practice: objects with required
and optional properties, arrays, strings (enums, consts, formats, lengths), numbers
with bounds, booleans, nulls, `$ref` into `$defs`, `anyOf`/`oneOf`/`allOf` and type
lists, and `pattern`s made of literals, classes, repeats, groups and alternatives (one
with lookarounds or backreferences that the string made does not match is left to the
hint).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from re import _constants as sre  # type: ignore[attr-defined]  # a pattern parsed, as re reads it
from re import _parser  # type: ignore[attr-defined]
from typing import Any

_FORMATS = {
    "date-time": "2026-01-01T00:00:00Z",
    "date": "2026-01-01",
    "time": "00:00:00Z",
    "duration": "P1D",
    "email": "echo@example.com",
    "hostname": "example.com",
    "uri": "https://example.com/",
    "url": "https://example.com/",
    "ipv4": "192.0.2.1",
    "ipv6": "2001:db8::1",
    "uuid": "00000000-0000-4000-8000-000000000000",
}


class SchemaError(ValueError):
    """A schema this service cannot read (not an object, a `$ref` that goes nowhere)."""


def example(schema: Any, hint: str = "echo") -> Any:
    """An instance valid against `schema`, its strings made from `hint`."""
    if not isinstance(schema, Mapping):
        raise SchemaError("a schema must be a JSON object")
    try:
        return _Example(schema, hint or "echo").make(schema, 0)
    except SchemaError:
        raise
    except RecursionError:
        raise SchemaError("it nests too deep") from None
    except (TypeError, AttributeError, ValueError) as exc:
        # A keyword of the wrong kind ("properties": 5): the schema is malformed.
        raise SchemaError(f"it is not a well-formed JSON Schema ({exc})") from None


_KINDS = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})


class _Example:
    MAX_DEPTH = 8  # a recursive schema ends with its shortest instance here
    # What one example may take, whatever the schema asks (minItems 1000 eight deep, a
    # required field that is itself): past these, the schema is refused.
    MOST_DEPTH = 32
    MOST_VALUES = 10_000
    MOST_CHARS = 1_000_000

    def __init__(self, root: Mapping[str, Any], hint: str) -> None:
        self.root = root
        self.hint = hint
        self.values = 0
        self.chars = 0

    def resolve(self, schema: Mapping[str, Any]) -> Mapping[str, Any]:
        seen = 0
        while "$ref" in schema:
            ref = schema["$ref"]
            if not isinstance(ref, str) or not ref.startswith("#"):
                raise SchemaError(f"cannot follow $ref {ref!r}")
            target: Any = self.root
            for name in ref.lstrip("#/").split("/") if ref != "#" else ():
                name = name.replace("~1", "/").replace("~0", "~")
                if not isinstance(target, Mapping) or name not in target:
                    raise SchemaError(f"$ref {ref!r} points at nothing")
                target = target[name]
            if not isinstance(target, Mapping):
                raise SchemaError(f"$ref {ref!r} is not a schema")
            schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
            seen += 1
            if seen > 32:
                raise SchemaError(f"$ref {ref!r} loops")
        return schema

    def make(self, schema: Any, depth: int) -> Any:
        self.values += 1
        if depth > self.MOST_DEPTH or self.values > self.MOST_VALUES:
            raise SchemaError("its smallest instance is too large (does it require itself?)")
        if schema is True or not isinstance(schema, Mapping):
            return self.hint
        schema = self.resolve(schema)
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return schema["enum"][0]
        for key in ("anyOf", "oneOf"):
            options = schema.get(key)
            if isinstance(options, list) and options:
                # The first option that is not null, so that the instance says something.
                chosen = next(
                    (o for o in options if _types(self.resolve(o)) != ["null"]), options[0]
                )
                return self.make({**_without(schema, key), **self.resolve(chosen)}, depth)
        if isinstance(schema.get("allOf"), list):
            merged: dict[str, Any] = dict(_without(schema, "allOf"))
            for part in schema["allOf"]:
                part = self.resolve(part)
                properties = {**merged.get("properties", {}), **part.get("properties", {})}
                required = [*merged.get("required", []), *part.get("required", [])]
                merged.update(part)
                if properties:
                    merged["properties"] = properties
                if required:
                    merged["required"] = required
            return self.make(merged, depth)
        types = _types(schema)
        kind = next((t for t in types if t != "null"), types[0] if types else None)
        if kind is None:
            kind = (
                "object" if "properties" in schema else "array" if "items" in schema else "string"
            )
        make = getattr(self, "_" + kind) if kind in _KINDS else self._string
        return make(schema, depth)

    def _object(self, schema: Mapping[str, Any], depth: int) -> dict[str, Any]:
        properties = schema.get("properties") or {}
        required = set(schema.get("required") or ())
        out: dict[str, Any] = {}
        for name, sub in properties.items():
            if name in required or depth < self.MAX_DEPTH // 2:
                out[name] = self.make(sub, depth + 1)
        for name in required - out.keys():
            out[name] = self.hint
        return out

    def _array(self, schema: Mapping[str, Any], depth: int) -> list[Any]:
        items = schema.get("items", {})
        prefix = schema.get("prefixItems") or []
        count = max(
            int(schema.get("minItems") or 0), len(prefix), 1 if depth < self.MAX_DEPTH else 0
        )
        if count > self.MOST_VALUES:
            raise SchemaError(f"minItems {count} is more than an example may take")
        if isinstance(schema.get("maxItems"), int):
            count = min(count, schema["maxItems"])
        made = [self.make(p, depth + 1) for p in prefix[:count]]
        made += [self.make(items, depth + 1) for _ in range(count - len(made))]
        if schema.get("uniqueItems") and len(made) > 1 and all(m == made[0] for m in made):
            made = [f"{m}{i}" if isinstance(m, str) else m for i, m in enumerate(made)]
        return made

    def _string(self, schema: Mapping[str, Any], depth: int) -> str:
        text = _FORMATS.get(str(schema.get("format")), self.hint)
        pattern = schema.get("pattern")
        if isinstance(pattern, str):
            text = matching(pattern, text) or text
        low = schema.get("minLength")
        high = schema.get("maxLength")
        if isinstance(low, int) and len(text) < low:
            if low > self.MOST_CHARS:
                raise SchemaError(f"minLength {low} is more than an example may take")
            text = (text * (low // max(len(text), 1) + 1))[: max(low, 1)]
        if isinstance(high, int) and len(text) > high:
            text = text[:high]
        self.chars += len(text)
        if self.chars > self.MOST_CHARS:
            raise SchemaError("its smallest instance is too large")
        return text

    def _number(self, schema: Mapping[str, Any], depth: int) -> float | int:
        return _bounded(schema, integer=False)

    def _integer(self, schema: Mapping[str, Any], depth: int) -> int:
        return int(_bounded(schema, integer=True))

    def _boolean(self, schema: Mapping[str, Any], depth: int) -> bool:
        return True

    def _null(self, schema: Mapping[str, Any], depth: int) -> None:
        return None


def _types(schema: Mapping[str, Any]) -> list[str]:
    kind = schema.get("type")
    if isinstance(kind, str):
        return [kind]
    if isinstance(kind, list):
        return [k for k in kind if isinstance(k, str)]
    return []


def _without(schema: Mapping[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in schema.items() if k != key}


def _bounded(schema: Mapping[str, Any], *, integer: bool) -> float | int:
    """The number nearest 1 inside the schema's bounds, inclusive (`minimum`,
    `maximum`) and exclusive (`exclusiveMinimum`, `exclusiveMaximum`; draft 4's
    boolean form too), a multiple of `multipleOf` (and whole, for an integer)."""
    low, low_open = _bound(schema, "minimum", "exclusiveMinimum")
    high, high_open = _bound(schema, "maximum", "exclusiveMaximum")
    step = _num(schema.get("multipleOf"))
    unit = step if step is not None and step > 0 else None
    if integer:
        unit = 1 if unit is None else int(unit) if unit == int(unit) else _whole_multiple(unit)
    if unit is None:  # any number: 1, else the middle of the range, else next to its end
        if _inside(1, low, low_open, high, high_open):
            return 1
        if low is not None and high is not None:
            middle = (low + high) / 2
            if _inside(middle, low, low_open, high, high_open):
                return middle
            raise SchemaError("no number fits its bounds")
        if low is not None:
            return low + 1 if low_open else low
        assert high is not None
        return high - 1 if high_open else high
    first = -math.inf if low is None else math.ceil(low / unit)
    if low is not None and low_open and first * unit <= low:
        first += 1
    last = math.inf if high is None else math.floor(high / unit)
    if high is not None and high_open and last * unit >= high:
        last -= 1
    if first > last:
        raise SchemaError("no number fits its bounds and multipleOf")
    k = min(max(round(1 / unit) or 1, first), last)
    value = round(k * unit, 12)
    return int(value) if integer or value == int(value) else value


def _num(value: Any) -> float | None:
    """A JSON number (not a boolean), or None."""
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def _bound(schema: Mapping[str, Any], inclusive: str, exclusive: str) -> tuple[float | None, bool]:
    """A bound and whether it is exclusive: the tighter of the two keywords."""
    closed, opened = _num(schema.get(inclusive)), _num(schema.get(exclusive))
    if schema.get(exclusive) is True and closed is not None:  # draft 4: a flag
        return closed, True
    if opened is not None and closed is not None:
        tighter = opened >= closed if inclusive == "minimum" else opened <= closed
        return (opened, True) if tighter else (closed, False)
    if opened is not None:
        return opened, True
    return closed, False


def _inside(value: float, low: float | None, low_open: bool, high: float | None,
            high_open: bool) -> bool:  # fmt: skip
    if low is not None and (value < low or (low_open and value == low)):
        return False
    return not (high is not None and (value > high or (high_open and value == high)))


def _whole_multiple(step: float) -> int:
    """The least whole number that is a multiple of `step` (an integer's multipleOf)."""
    for n in range(1, 1001):
        if abs(round(n / step) * step - n) < 1e-9:
            return n
    raise SchemaError("no integer is a multiple of its multipleOf")


# --- what Anthropic's structured outputs take ---------------------------------------

_ANTHROPIC_FORMATS = {
    "date-time",
    "time",
    "date",
    "duration",
    "email",
    "hostname",
    "uri",
    "ipv4",
    "ipv6",
    "uuid",
}


def for_anthropic(schema: Any) -> dict[str, Any]:
    """`schema` cut down to what Anthropic's `output_config.format` takes, as its SDKs
    cut it: objects closed (`additionalProperties: false`), `oneOf` read as `anyOf`,
    and what it does not support (bounds, patterns, most formats) moved into the
    description, where the model may still follow it."""
    if not isinstance(schema, Mapping):
        raise SchemaError("a schema must be a JSON object")
    out: dict[str, Any] = {}
    rest = dict(schema)
    defs = rest.pop("$defs", None)
    if isinstance(defs, Mapping):
        out["$defs"] = {name: for_anthropic(sub) for name, sub in defs.items()}
    if "$ref" in rest:
        out["$ref"] = rest.pop("$ref")
        return out
    variants = rest.pop("anyOf", None) or rest.pop("oneOf", None)
    every = rest.pop("allOf", None)
    kind = rest.pop("type", None)
    if isinstance(variants, list):
        out["anyOf"] = [for_anthropic(v) for v in variants]
    elif isinstance(every, list):
        out["allOf"] = [for_anthropic(v) for v in every]
    elif isinstance(kind, list):  # ["string", "null"]: as the variants it means
        out["anyOf"] = [
            {"type": k} if k != "object" else for_anthropic({**rest, "type": k}) for k in kind
        ]
        return out
    elif kind is not None:
        out["type"] = kind
    for key in ("enum", "const", "description", "title"):
        if key in rest:
            out[key] = rest.pop(key)
    if kind == "object":
        out["properties"] = {
            k: for_anthropic(v) for k, v in (rest.pop("properties", None) or {}).items()
        }
        rest.pop("additionalProperties", None)
        out["additionalProperties"] = False
        if "required" in rest:
            out["required"] = rest.pop("required")
    elif kind == "string" and rest.get("format") in _ANTHROPIC_FORMATS:
        out["format"] = rest.pop("format")
    elif kind == "array":
        if "items" in rest:
            out["items"] = for_anthropic(rest.pop("items"))
        if rest.get("minItems") in (0, 1):
            out["minItems"] = rest.pop("minItems")
    rest.pop("$schema", None)
    if rest:
        extra = "{" + ", ".join(f"{k}: {v}" for k, v in rest.items()) + "}"
        out["description"] = f"{out['description']}\n\n{extra}" if "description" in out else extra
    return out


# --- a string that a pattern matches -------------------------------------------------


class _Unsolved(Exception):
    """A part of a pattern this maker does not write."""


_MOST_REPEATS = 1_000


def matching(pattern: str, hint: str) -> str | None:
    """A string `pattern` finds (JSON Schema's patterns are unanchored): `hint` if it
    does, else one made from the pattern's parts; None if none could be made."""
    try:
        compiled = re.compile(pattern)
        if compiled.search(hint):
            return hint
        made = "".join(_made(_parser.parse(pattern), {}))
    except (re.error, _Unsolved, RecursionError, OverflowError):
        return None
    return made if compiled.search(made) else None


def _made(parsed: Any, groups: dict[int, str]) -> list[str]:
    out: list[str] = []
    for op, arg in parsed:
        if op == sre.LITERAL:
            out.append(chr(arg))
        elif op == sre.NOT_LITERAL:
            out.append("a" if arg != ord("a") else "b")
        elif op == sre.ANY:
            out.append("a")
        elif op == sre.IN:
            out.append(_one_of(arg))
        elif op == sre.CATEGORY:
            out.append(_one_of([(op, arg)]))
        elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT):
            low, _, inner = arg
            if low > _MOST_REPEATS:
                raise _Unsolved("too many repeats")
            out += [piece for _ in range(low) for piece in _made(inner, groups)]
        elif op == sre.SUBPATTERN:
            group, _, _, inner = arg
            text = "".join(_made(inner, groups))
            if group is not None:
                groups[group] = text
            out.append(text)
        elif op == sre.ATOMIC_GROUP:
            out += _made(arg, groups)
        elif op == sre.BRANCH:
            out += _made(arg[1][0], groups)
        elif op == sre.GROUPREF:
            out.append(groups.get(arg, ""))
        elif op in (sre.AT, sre.ASSERT, sre.ASSERT_NOT):
            continue  # anchors and lookarounds write nothing: the match is checked after
        else:
            raise _Unsolved(str(op))
    return out


_CANDIDATES = "a0A_ -.x9Z"
_CATEGORIES: dict[Any, Callable[[str], bool]] = {
    sre.CATEGORY_DIGIT: str.isdigit,
    sre.CATEGORY_NOT_DIGIT: lambda c: not c.isdigit(),
    sre.CATEGORY_WORD: lambda c: c.isalnum() or c == "_",
    sre.CATEGORY_NOT_WORD: lambda c: not (c.isalnum() or c == "_"),
    sre.CATEGORY_SPACE: str.isspace,
    sre.CATEGORY_NOT_SPACE: lambda c: not c.isspace(),
}


def _class_test(op: Any, arg: Any) -> Callable[[str], bool]:
    """Whether a character is one item of a class: a literal, a range, a category."""
    if op == sre.LITERAL:
        return lambda c: ord(c) == arg
    if op == sre.RANGE:
        return lambda c: bool(arg[0] <= ord(c) <= arg[1])
    if op == sre.CATEGORY and arg in _CATEGORIES:
        return _CATEGORIES[arg]
    raise _Unsolved(str(op))


def _one_of(items: Any) -> str:
    """A character of a class ([a-z], [^0-9], \\d...)."""
    negated = bool(items) and items[0][0] == sre.NEGATE
    tests = [_class_test(op, arg) for op, arg in (items[1:] if negated else items)]
    if not negated and items:
        op, first = items[0]
        if op == sre.LITERAL:
            return chr(first)
        if op == sre.RANGE:
            return chr(first[0])
    for char in _CANDIDATES + "".join(map(chr, range(33, 127))):
        if any(test(char) for test in tests) != negated:
            return char
    raise _Unsolved("no character fits the class")

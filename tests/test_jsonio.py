"""The hot path's JSON: the same documents as the standard library's, compact, UTF-8."""

from __future__ import annotations

import json

import pytest

import jsonio


def test_dumps_reads_back_as_the_same_document() -> None:
    doc = {"text": 'é "quoted"\n', "n": 3, "cost_usd": 1.2e-6, "none": None, "list": [1, 2.5]}
    raw = jsonio.dumps(doc)
    assert json.loads(raw) == doc
    assert raw.decode() == json.dumps(doc, ensure_ascii=False, separators=(",", ":")).replace(
        "1.2e-06", "1.2e-6"
    )


def test_nan_and_infinity_become_null_not_invalid_json() -> None:
    assert json.loads(jsonio.dumps({"a": float("nan"), "b": float("inf")})) == {
        "a": None,
        "b": None,
    }


def test_loads_refuses_what_is_not_json() -> None:
    with pytest.raises(ValueError):
        jsonio.loads(b"<html>")
    with pytest.raises(ValueError):
        jsonio.loads(b"\xff\xfe")


def test_the_response_is_rendered_compact_with_a_content_length() -> None:
    response = jsonio.JSONResponse({"status": "ok"})
    assert response.body == b'{"status":"ok"}'
    assert dict(response.headers)["content-length"] == "15"

"""Provider keys never reach a client: the one redaction every answer passes.

A provider may echo the key it was called with (a proxy quoting the request in its
error, a misconfigured server, a hostile one), in an error body, an error event, a
header, or the text of an answer; and its words reach the client on many paths (a
Messages error returned as it came, a relayed stream, a translated answer). Rather
than trust each path to remember, this middleware masks every provider key the
process holds in every header and body message it sends, whatever route made it.

The mask is as long as the key, so a Content-Length already sent stays true. A key
shorter than MIN_SECRET is not masked: the placeholders local servers take
("EMPTY", "ollama") would otherwise blank ordinary words out of answers. A key a
model splits over two stream events is not found (each message is looked at alone):
what this guards against is a provider quoting its key, which it does whole.
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

MIN_SECRET = 8
MARK = b"[redacted]"


def mask(secret: bytes) -> bytes:
    """What stands for `secret`: as long as it, saying what happened where it fits."""
    if len(secret) < len(MARK):
        return b"*" * len(secret)
    return MARK + b"*" * (len(secret) - len(MARK))


class Redactor:
    """Every provider key the process holds, and the masking of them in bytes."""

    def __init__(self, secrets: Iterable[str]) -> None:
        kept = {s.encode() for s in secrets if len(s) >= MIN_SECRET}
        # The longest first: a key that contains another is masked whole.
        self.secrets = tuple((s, mask(s)) for s in sorted(kept, key=len, reverse=True))

    def __bool__(self) -> bool:
        return bool(self.secrets)

    def scrub(self, data: bytes) -> bytes:
        for secret, masked in self.secrets:
            if secret in data:
                data = data.replace(secret, masked)
        return data


class RedactionMiddleware:
    """Masks the provider keys in every response header and body this app sends."""

    def __init__(self, app: ASGIApp, *, redactor: Redactor) -> None:
        self.app = app
        self.redactor = redactor

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.redactor:
            await self.app(scope, receive, send)
            return
        redact = self.redactor.scrub

        async def send_redacted(message: Message) -> None:
            if message["type"] == "http.response.body":
                body = bytes(message.get("body", b""))  # the same object when it is bytes
                clean = redact(body)
                if clean is not body:
                    message = {**message, "body": clean}
            elif message["type"] == "http.response.start":
                headers = message.get("headers") or ()
                values = b"\n".join([bytes(value) for _, value in headers])
                if redact(values) is not values:  # one look at them all, most times
                    cleaned = [(name, redact(bytes(value))) for name, value in headers]
                    message = {**message, "headers": cleaned}
            await send(message)

        await self.app(scope, receive, send_redacted)

"""A small load generator for text-tool and its mock provider.

A raw asyncio HTTP/1.1 client (no framework, one connection per in-flight request)
so that one core can drive thousands of calls and streams: fixed concurrency, a
bounded number of requests and a time limit, SSE-aware (time to first token is the
arrival of the first `data:` line with text in it). Prints p50/p90/p99, throughput and failures by
status.

    python bench/load.py URL --path /complete --body '{"prompt": "hi"}' -c 64 -n 5000
    python bench/load.py URL --path /stream --stream -c 200 -n 200 --header "X-API-Key: k"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)  # seconds to the last byte
    ttfts: list[float] = field(default_factory=list)  # seconds to the first token
    statuses: Counter[int | str] = field(default_factory=Counter)
    wall: float = 0.0

    def summary(self) -> dict[str, object]:
        ok = self.statuses.get(200, 0)
        out: dict[str, object] = {
            "requests": sum(self.statuses.values()),
            "ok": ok,
            "failures": {str(k): v for k, v in self.statuses.items() if k != 200},
            "wall_s": round(self.wall, 3),
            "throughput_rps": round(ok / self.wall, 1) if self.wall else 0.0,
        }
        for name, values in (("latency", self.latencies), ("ttft", self.ttfts)):
            if values:
                out[name + "_ms"] = {
                    p: round(percentile(values, q) * 1000, 2)
                    for p, q in (("p50", 50), ("p90", 90), ("p99", 99))
                }
        return out


def percentile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


async def _read_headers(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("closed before the status line")
    status = int(status_line.split()[1])
    headers = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


def carries_text(chunk: bytes) -> bool:
    """Whether a piece of an event stream has a first token in it: the text of our
    own /stream, or a Chat Completions delta with content (not the role chunk that
    comes first, with an empty one)."""
    for line in chunk.split(b"\n"):
        if not line.startswith(b"data: {"):
            continue
        data = json.loads(line[6:])
        if data.get("text"):
            return True
        if any((c.get("delta") or {}).get("content") for c in data.get("choices") or ()):
            return True
    return False


async def one_request(
    host: str, port: int, request: bytes, stream: bool, result: Result, leave_after: int
) -> None:
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
    try:
        writer.write(request)
        status, headers = await _read_headers(reader)
        first: float | None = None
        seen = 0
        if headers.get("transfer-encoding") == "chunked":
            while True:
                size = int((await reader.readline()).split(b";")[0], 16)
                if size == 0:
                    break
                chunk = await reader.readexactly(size + 2)
                if stream and b"data:" in chunk:
                    if first is None and carries_text(chunk):
                        first = time.perf_counter()
                    seen += chunk.count(b"data:")
                    if leave_after and seen >= leave_after:
                        result.statuses["left"] += 1
                        return
        else:
            await reader.readexactly(int(headers.get("content-length", "0")))
        done = time.perf_counter()
        result.statuses[status] += 1
        if status == 200:
            result.latencies.append(done - started)
            if first is not None:
                result.ttfts.append(first - started)
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        result.statuses[type(exc).__name__] += 1
    finally:
        writer.close()


async def run(
    url: str,
    *,
    path: str,
    body: str,
    headers: list[str],
    concurrency: int,
    requests: int,
    stream: bool = False,
    time_limit_s: float = 120.0,
    leave_after: int = 0,
) -> Result:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    payload = body.encode()
    head = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(payload)}",
        "Connection: close",
        *headers,
    ]
    request = ("\r\n".join(head) + "\r\n\r\n").encode() + payload
    result = Result()
    remaining = requests
    started = time.perf_counter()

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0 and time.perf_counter() - started < time_limit_s:
            remaining -= 1
            await one_request(host, port, request, stream, result, leave_after)

    await asyncio.wait_for(
        asyncio.gather(*(worker() for _ in range(concurrency))), timeout=time_limit_s + 30
    )
    result.wall = time.perf_counter() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("--path", default="/complete")
    parser.add_argument("--body", default='{"prompt": "hello"}')
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument("-c", "--concurrency", type=int, default=1)
    parser.add_argument("-n", "--requests", type=int, default=100)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--time-limit", type=float, default=120)
    args = parser.parse_args()
    import uvloop

    result = uvloop.run(
        run(
            args.url,
            path=args.path,
            body=args.body,
            headers=args.header,
            concurrency=args.concurrency,
            requests=args.requests,
            stream=args.stream,
            time_limit_s=args.time_limit,
        )
    )
    print(json.dumps(result.summary(), indent=2))


if __name__ == "__main__":
    main()

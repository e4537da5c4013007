"""The benchmark: text-tool against a direct call to the mock provider, in one run.

    uv run python bench/run.py [--quick] [--json results.json]

Starts the mock provider and the service (auth and rate limiting on, limits set
high), pinned with taskset: the service on core 0, the mock and the load generator
on core 1. Runs S1-S7 against the mock directly and through the service with the
same load generator (wrk for S1 and S2, bench/load.py for the rest), and prints one
table with both columns and their ratio, then the service's memory. With --floor,
S1-S4, S6 and S7 also run through bench/floor.py (the same stack with none of the
service in it): the floor on the card's stack (one httpx.AsyncClient over
AiohttpTransport), with text-tool's ratio to it, and aiohttp called directly beside
it for reference.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from load import Result, run  # noqa: E402

KEY = "bench-key-0123456789abcdef"
CPUS = os.cpu_count() or 1
SERVICE_CPU, LOAD_CPU = ("0", "1") if CPUS >= 2 else ("0", "0")
ROUNDS = 3  # of S1 and S2, alternating between the columns


def median(rounds: list[dict[str, float]], figure: str) -> float:
    return statistics.median(r[figure] for r in rounds)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(cpu: str, args: list[str]) -> list[str]:
    return ["taskset", "-c", cpu, *args] if shutil.which("taskset") else args


@contextmanager
def process(args: list[str], health: str, env: dict[str, str] | None = None) -> Iterator[int]:
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(health, timeout=1).status_code < 500:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(log.read().decode(errors="replace")[-3000:])
            time.sleep(0.05)
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


@contextmanager
def rss_sampled(pid: int, every_s: float = 0.05) -> Iterator[list[float]]:
    """The process's resident memory, read every `every_s` while the block runs."""
    samples: list[float] = [rss_mb(pid)]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(every_s):
            samples.append(rss_mb(pid))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        done.set()
        thread.join(timeout=5)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Target:
    """Where the load goes: the mock directly, or text-tool in front of it."""

    def __init__(self, name: str, url: str, direct: bool) -> None:
        self.name, self.url, self.direct = name, url, direct

    def request(self, prompt: str, stream: bool) -> tuple[str, str, list[str]]:
        if self.direct:
            body: dict[str, object] = {
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": prompt}],
            }
            if stream:
                body |= {"stream": True, "stream_options": {"include_usage": True}}
            return "/v1/chat/completions", json.dumps(body), []
        path = "/stream" if stream else "/complete"
        return path, json.dumps({"prompt": prompt}), [f"X-API-Key: {KEY}"]


def mock_prompt(**options: object) -> str:
    return "mock:" + json.dumps(options) + "\nWrite one haiku about Nairobi."


def wrk(target: Target, connections: int, seconds: int) -> dict[str, float]:
    path, body, headers = target.request(mock_prompt(tokens=20), stream=False)
    script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
    lines = ['wrk.method = "POST"', f"wrk.body = {json.dumps(body)}",
             'wrk.headers["Content-Type"] = "application/json"']  # fmt: skip
    for header in headers:
        name, _, value = header.partition(": ")
        lines.append(f'wrk.headers["{name}"] = "{value}"')
    script.write("\n".join(lines) + "\n")
    script.close()
    threads = 1 if connections < 4 else 2
    out = subprocess.run(
        pinned(LOAD_CPU, ["wrk", "-t", str(threads), "-c", str(connections),
                          "-d", f"{seconds}s", "--latency", "-s", script.name,
                          target.url + path]),
        capture_output=True, text=True, timeout=seconds + 30,
    ).stdout  # fmt: skip
    os.unlink(script.name)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    figures: dict[str, float] = {"rps": float(rps.group(1)) if rps else 0.0}
    for pct in ("50", "90", "99"):
        match = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)", out, re.M)
        if match:
            scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[match.group(2)]
            figures[f"p{pct}_ms"] = float(match.group(1)) * scale
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    figures["failures"] = float(errors.group(1)) if errors else 0.0
    return figures


def load(target: Target, prompt: str, *, stream: bool, concurrency: int, requests: int,
         leave_after: int = 0) -> Result:  # fmt: skip
    path, body, headers = target.request(prompt, stream)
    import uvloop

    return uvloop.run(
        run(target.url, path=path, body=body, headers=headers, concurrency=concurrency,
            requests=requests, stream=stream, time_limit_s=120, leave_after=leave_after)
    )  # fmt: skip


def in_load_process(fn: str, *args: object) -> object:
    """Run a load function pinned to the load core, in its own process."""
    code = (
        "import json, sys; sys.path.insert(0, 'bench'); import run; "
        f"print(json.dumps(run._remote({fn!r}, {json.dumps(args)!r})))"
    )
    out = subprocess.run(pinned(LOAD_CPU, [sys.executable, "-c", code]), capture_output=True,
                         text=True, cwd=ROOT, timeout=600)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _remote(fn: str, args_json: str) -> object:
    name, url, direct, prompt, kwargs = json.loads(args_json)
    result = load(Target(name, url, direct), prompt, **kwargs)
    return result.summary()


def scenario_load(target: Target, prompt: str, **kwargs: object) -> dict[str, object]:
    summary = in_load_process("load", target.name, target.url, target.direct, prompt, kwargs)
    assert isinstance(summary, dict)
    return summary


def wall(summary: dict[str, object]) -> float:
    value = summary["wall_s"]
    assert isinstance(value, int | float)
    return float(value)


def ttft_p99(summary: dict[str, object]) -> float:
    ttft = summary["ttft_ms"]
    assert isinstance(ttft, dict)
    return float(ttft["p99"])


def failures(summary: dict[str, object]) -> float:
    """Failed calls, whatever their status."""
    by_status = summary["failures"]
    assert isinstance(by_status, dict)
    return float(sum(by_status.values()))


def stats(mock_url: str) -> dict[str, int]:
    return dict(httpx.get(mock_url + "/_stats").json())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs, smaller S6/S7")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--floor", action="store_true", help="columns for bench/floor.py")
    parser.add_argument(
        "--service-python",
        default=sys.executable,
        help="the Python of the service and floors: a production environment's "
        "(uv sync --no-dev) shows the memory a deployment has",
    )
    parser.add_argument(
        "--ledger",
        default="",
        help="the service's LEDGER_URL (default: an SQLite file in a temporary directory, "
        "as a deployment's default; off to compare without it)",
    )
    args = parser.parse_args()
    python = args.service_python
    seconds = 3 if args.quick else 6
    s6, s7 = (500, 300) if args.quick else (2000, 1000)

    mock_port, service_port, floor_port = free_port(), free_port(), free_port()
    mock_url, service_url = f"http://127.0.0.1:{mock_port}", f"http://127.0.0.1:{service_port}"
    env = {
        **os.environ,
        "API_KEYS": KEY,
        "RATE_LIMIT": "100000000/hour",
        "LLM_PROVIDER": "openai",
        "OPENAI_API_KEY": "sk-bench",
        "OPENAI_BASE_URL": mock_url + "/v1",
        "LLM_MODEL": "gpt-4o-mini",
        "MAX_INFLIGHT": "4096",
        "LOG_FORMAT": "json",
        "LEDGER_URL": args.ledger or str(Path(tempfile.mkdtemp()) / "text-tool.db"),
    }
    mock_cmd = pinned(
        LOAD_CPU, [sys.executable, "bench/mock_provider.py", "--port", str(mock_port)]
    )
    service_cmd = pinned(SERVICE_CPU, [python, "-m", "uvicorn", "server:app",
                                       "--port", str(service_port), "--no-access-log",
                                       "--loop", "uvloop", "--http", "protocol:BoundedHttpTools",
                                       "--backlog", "4096", "--log-level", "warning"])  # fmt: skip
    aiohttp_port = free_port()

    def floor_cmd(port: int, client: str) -> list[str]:
        command = [python, "bench/floor.py", "--port", str(port),
                   "--provider", mock_url + "/v1", "--client", client]  # fmt: skip
        return pinned(SERVICE_CPU, command)

    rows: list[tuple[str, str, list[float]]] = []

    def row(name: str, metric: str, *figures: float) -> None:
        rows.append((name, metric, list(figures)))
        shown = " ".join(f"{f:>10.2f}" for f in figures)
        print(f"  {name:<4} {metric:<26} {shown}", flush=True)

    with contextlib.ExitStack() as running:
        running.enter_context(process(mock_cmd, mock_url + "/_stats"))
        pid = running.enter_context(process(service_cmd, service_url + "/health", env))
        direct, service = Target("direct", mock_url, True), Target("text-tool", service_url, False)
        both = (direct, service)
        columns: list[tuple[Target, int | None]] = [(direct, None), (service, pid)]
        if args.floor:
            for port, client in ((floor_port, "httpx"), (aiohttp_port, "aiohttp")):
                url = f"http://127.0.0.1:{port}"
                floor_pid = running.enter_context(process(floor_cmd(port, client), url + "/health"))
                columns.append((Target(f"floor-{client}", url, False), floor_pid))
        httpx.post(service_url + "/complete", json={"prompt": "warm"}, headers={"X-API-Key": KEY})
        idle_mb = rss_mb(pid)

        # S1 and S2 run in rounds alternating between the columns, and each figure is
        # the median of its column's rounds: on a shared VM one round can land in a slow
        # spell of a few seconds.
        s1: list[list[dict[str, float]]] = [[] for _ in columns]
        for _ in range(ROUNDS):
            for column, (target, _pid) in enumerate(columns):
                s1[column].append(wrk(target, 1, seconds))
        for pct in ("p50", "p99"):
            row("S1", f"c=1 {pct} ms", *(median(s1[c], f"{pct}_ms") for c in range(len(columns))))

        s2: list[list[dict[str, float]]] = [[] for _ in columns]
        for _ in range(ROUNDS):
            for column, (target, served_by) in enumerate(columns):
                cpu_before = cpu_seconds(served_by) if served_by else 0.0
                figures = wrk(target, 64, seconds)
                if served_by:
                    cpu_s = cpu_seconds(served_by) - cpu_before
                    figures["cpu_ms"] = 1000 * cpu_s / max(1.0, figures["rps"] * seconds)
                s2[column].append(figures)
        row("S2", "c=64 req/s", *(median(s2[c], "rps") for c in range(len(columns))))
        cpu_ms = [median(s2[c], "cpu_ms") for c in range(1, len(columns))]
        row("S2", "service CPU ms/request", 0.0, *cpu_ms)
        row("S2", "failures", *(sum(f["failures"] for f in s2[c]) for c in range(len(columns))))

        slow = mock_prompt(ttft_ms=1000, tokens=20)
        s3 = [
            scenario_load(t, slow, stream=False, concurrency=500, requests=500) for t, _ in columns
        ]
        row("S3", "500 x 1 s calls: wall s", *(wall(r) for r in s3))
        row("S3", "failures", *(failures(r) for r in s3))

        streams = mock_prompt(ttft_ms=100, tokens=50, token_delay_ms=20)
        s4 = [
            scenario_load(t, streams, stream=True, concurrency=200, requests=200)
            for t, _ in columns
        ]
        row("S4", "200 streams: TTFT p99 ms", *(ttft_p99(r) for r in s4))
        row("S4", "200 streams: wall s", *(wall(r) for r in s4))

        long = mock_prompt(tokens=100, token_delay_ms=100)
        left = []
        for t in both:
            httpx.post(mock_url + "/_reset")
            scenario_load(t, long, stream=True, concurrency=50, requests=50, leave_after=3)
            time.sleep(2)
            left.append(stats(mock_url)["open"])
        row("S5", "upstream open 2 s after", left[0], left[1])

        s6r = [
            scenario_load(t, slow, stream=False, concurrency=s6, requests=s6) for t, _ in columns
        ]
        row("S6", f"{s6} x 1 s calls: wall s", *(wall(r) for r in s6r))
        row("S6", "failures", *(failures(r) for r in s6r))

        many = mock_prompt(tokens=200, token_delay_ms=10)
        s7r = []
        for t, _ in columns:
            with rss_sampled(pid) if t is service else contextlib.nullcontext([0.0]) as sampled:
                s7r.append(scenario_load(t, many, stream=True, concurrency=s7, requests=s7))
            if t is service:
                # An upper bound: what S7 took above the idle process, whatever an
                # earlier scenario left allocated.
                per_stream_kb = (max(sampled) - idle_mb) * 1024 / s7
        row("S7", f"{s7} streams: TTFT p99 ms", *(ttft_p99(r) for r in s7r))
        row("S7", f"{s7} streams: wall s", *(wall(r) for r in s7r))
        row("S7", "failures", *(failures(r) for r in s7r))
        peak_mb = rss_mb(pid, "VmHWM")

    def ratio(figure: float, direct: float) -> str:
        return f"{figure / direct:.2f}x" if direct else "-"

    print()
    if args.floor:
        print("| scenario | metric | mock direct | text-tool | vs direct | floor (httpx) "
              "| text-tool vs floor | aiohttp floor |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|")
    else:
        print("| scenario | metric | mock direct | text-tool | ratio |")
        print("|---|---|---|---|---|")
    for name, metric, values in rows:
        d, s = values[0], values[1]
        line = f"| {name} | {metric} | {d:,.2f} | {s:,.2f} | {ratio(s, d)} |"
        if args.floor:
            if len(values) > 2:
                f, a = values[2], values[3]
                line += f" {f:,.2f} | {ratio(s, f)} | {a:,.2f} |"
            else:
                line += " - | - | - |"
        print(line)
    print(f"\nservice resident memory: idle {idle_mb:.0f} MB, peak {peak_mb:.0f} MB, "
          f"{per_stream_kb:.0f} KB per open stream during S7")  # fmt: skip
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "rows": rows,
                    "idle_mb": idle_mb,
                    "peak_mb": peak_mb,
                    "per_stream_kb": per_stream_kb,
                },
                indent=2,
            )  # fmt: skip
        )


if __name__ == "__main__":
    main()

"""Through a real nginx with deploy/nginx.conf: tokens arrive as they are produced,
and client addresses from X-Forwarded-For are trusted only from the proxy."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import (
    AUTH_HEADERS,
    ROOT,
    Process,
    free_port,
    openai_env,
    start_service,
)

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
pytestmark = [
    pytest.mark.skipif(NGINX is None, reason="nginx is not installed (.ci/run installs it)"),
    pytest.mark.e2e,
]


@pytest.fixture
def service(tmp_path: Path, mock_provider: Process) -> Iterator[Process]:
    # nginx connects from 127.0.0.1; nobody else is a trusted proxy
    proc = start_service(tmp_path, openai_env(mock_provider, FORWARDED_ALLOW_IPS="127.0.0.1"))
    yield proc
    proc.stop()


@pytest.fixture
def nginx(tmp_path: Path, service: Process) -> Iterator[str]:
    assert NGINX is not None
    port = free_port()
    site = (ROOT / "deploy" / "nginx.conf").read_text()
    site = site.replace("server 127.0.0.1:8000;", f"server 127.0.0.1:{service.port};")
    site = site.replace("listen 80;", f"listen 127.0.0.1:{port};")
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    (prefix / "site.conf").write_text(site)
    (prefix / "nginx.conf").write_text(
        f"""
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
user root;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    include {prefix}/site.conf;
}}
"""
    )
    proc = subprocess.Popen(
        [NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, (
            prefix / "error.log"
        ).read_text()
        time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def test_tokens_arrive_through_nginx_as_they_are_produced(nginx: str) -> None:
    prompt = 'mock:{"tokens": 6, "token_delay_ms": 200}\nhi'
    arrivals = []
    started = time.monotonic()
    with (
        httpx.Client(timeout=15, headers=AUTH_HEADERS) as c,
        c.stream("POST", nginx + "/stream", json={"prompt": prompt}) as r,
    ):
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith('data: {"text"'):
                arrivals.append(time.monotonic() - started)
    assert len(arrivals) == 6
    # a buffering proxy would deliver all six at the end, together
    assert arrivals[-1] - arrivals[0] > 0.8
    assert arrivals[0] < arrivals[-1] - 0.8


def client_seen(service: Process, request_id: str) -> str:
    entry = service.access_lines(request_id).get(request_id)
    assert entry is not None, f"no access line for {request_id}"
    return str(entry["client"])


def test_forwarded_for_is_trusted_from_the_proxy_only(nginx: str, service: Process) -> None:
    spoof = {"X-Forwarded-For": "203.0.113.7"}
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.5")) as c:
        # Through nginx: nginx appends its peer, 127.0.0.5, to the spoofed header; the
        # service trusts nginx and takes the rightmost address it does not trust.
        c.get(nginx + "/health", headers={**spoof, "X-Request-ID": "via-nginx"})
        # Straight to the service from 127.0.0.5, not a trusted proxy: header ignored.
        c.get(service.url + "/health", headers={**spoof, "X-Request-ID": "direct"})
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.1")) as c:
        # From the trusted address itself the header is believed: that is the setting.
        c.get(service.url + "/health", headers={**spoof, "X-Request-ID": "trusted"})
    assert client_seen(service, "via-nginx") == "127.0.0.5"
    assert client_seen(service, "direct") == "127.0.0.5"
    assert client_seen(service, "trusted") == "203.0.113.7"


def test_nginx_passes_the_clients_request_id_or_makes_one(nginx: str) -> None:
    with httpx.Client() as c:
        kept = c.get(nginx + "/health", headers={"X-Request-ID": "from-client"})
        made = c.get(nginx + "/health")
    assert kept.headers["x-request-id"] == "from-client"
    assert len(made.headers["x-request-id"]) == 32  # nginx's $request_id

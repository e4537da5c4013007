# text-tool: two stages. The build stage resolves the locked dependencies into a
# virtualenv with uv; the final stage gets that virtualenv and the service's own
# modules, nothing else (no uv, no tests, no caches), and runs as a non-root user.
FROM python:3.11-slim AS build

ENV UV_PYTHON_DOWNLOADS=never \
    UV_LINK_MODE=copy \
    UV_COMPILE_BYTECODE=1 \
    UV_PROJECT_ENVIRONMENT=/app/.venv \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# binutils' strip: uvloop ships a 13.6 MB extension with its symbols, 1.6 MB without.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends binutils \
    && rm -rf /var/lib/apt/lists/* \
    && pip install "uv==0.13.9"
WORKDIR /app
COPY pyproject.toml uv.lock ./
# Optional extras, space-separated: --build-arg EXTRAS="redis otel" for a Redis
# rate-limit store (+6 MB) and OpenTelemetry traces over OTLP/HTTP.
ARG EXTRAS=""
# --no-install-project: the service's modules are copied into the final stage as they
# are, not installed, so the image needs no build backend and keeps the dependencies'
# layer when only the code changes; it runs `python server.py`, the same main() as the
# `text-tool` console script that `uv sync` installs on a developer's machine.
# hadolint ignore=SC2086
RUN extras=""; for extra in $EXTRAS; do extras="$extras --extra $extra"; done \
    && uv sync --frozen --no-dev --no-install-project $extras --python python3 \
    && find /app/.venv -name "*.so" -exec strip --strip-unneeded {} + \
    && find /app/.venv \( -name "*.pyx" -o -name "*.pxd" -o -name "*.pyi" \) -delete

FROM python:3.11-slim

ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FORWARDED_ALLOW_IPS=127.0.0.1
RUN useradd --system --uid 10001 --no-create-home --home-dir /nonexistent text-tool \
    && mkdir /data && chown 10001 /data
# The ledger of calls (store.py) in a volume, so that it outlives the container; mount
# one (-v text-tool-data:/data), or set LEDGER_URL to a PostgreSQL, or to off.
ENV LEDGER_URL=/data/text-tool.db
VOLUME ["/data"]
WORKDIR /app
COPY --from=build /app/.venv /app/.venv
COPY *.py ./
COPY dialects/ ./dialects/
COPY pages/ ./pages/
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2).status != 200)"]
# The one way to start it (server.main): proxy headers trusted only from
# FORWARDED_ALLOW_IPS (uvicorn reads it from the environment), request heads bounded
# (protocol.py), open streams given SHUTDOWN_GRACE_S to end on SIGTERM, uvicorn 5 s more.
CMD ["python", "server.py", "--host", "0.0.0.0", "--port", "8000"]

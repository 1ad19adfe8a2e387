# mini-scan: one image for every role (processor, scanner, setup, emulator, query tools).
# Build: docker compose build (or, with buildx, docker build -t mini-scan .)
# Run:   docker run mini-scan process|scan|setup|emulator|...
# No `# syntax=` line: Docker's built-in frontend runs RUN --mount, and pulling one from Docker
# Hub would make offline and air-gapped builds fail.

# ---- builder: resolve exactly uv.lock into /app/.venv --------------------------------------------
# Both stages use the same Python image, so the venv's interpreter symlink resolves in the final one.
FROM python:3.11-slim-bookworm AS builder

COPY --from=ghcr.io/astral-sh/uv:0.13.9 /uv /bin/uv

# Bytecode compiled at build time (faster start, read-only at run time); copy, not hard links,
# because the cache lives on another layer; never download a Python, use the image's.
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv

WORKDIR /src

# Dependencies first: this layer is rebuilt only when the lock changes, not on every code edit.
COPY pyproject.toml uv.lock ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-install-project --no-editable

# Then the project itself, installed as a wheel (no editable link back to /src), rebuilt every
# time: uv's cache keys a local project by its pyproject.toml alone, so without
# --reinstall-package a code change would ship the wheel built from the old sources.
COPY README.md ./
COPY processor ./processor
COPY scanner ./scanner
COPY emulator ./emulator
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable --reinstall-package mini-scan

# ---- runtime: the venv only, as a non-root user -----------------------------------------------
FROM python:3.11-slim-bookworm

RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home app \
    && mkdir -p /app/data \
    && chown app:app /app/data

COPY --from=builder /app/.venv /app/.venv

WORKDIR /app
ENV PYTHONUNBUFFERED=1 \
    PATH=/app/.venv/bin:$PATH \
    METRICS_PORT=9100
# Numeric, so a runtime (Kubernetes runAsNonRoot, compose) can tell it is not root.
USER 10001:10001

# 9100: the processor's /metrics, /healthz, /readyz; 8085: the emulator's gRPC port.
EXPOSE 9100 8085

# Right for every role the image runs (processor: /healthz; emulator: its port; other commands:
# running), read from the container's own command line; standard library only, so it is cheap.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["mini-scan", "healthcheck"]

ENTRYPOINT ["mini-scan"]
CMD ["process"]

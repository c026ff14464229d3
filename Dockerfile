# cascade: OpenAI-compatible cascading proxy.
#
#   docker build -t cascade .
#   docker run --rm -p 8000:8000 -e OPENAI_API_KEY \
#     -v "$PWD/config.yaml:/etc/cascade/config.yaml:ro" -v cascade-data:/app/data cascade
#
# scripts/check-image replays the builder's RUN steps below in a temporary venv and starts the
# result the way this image does (ENTRYPOINT, CMD, ENV, HEALTHCHECK): keep the steps in plain
# `RUN` lines that use $VENV, and keep the builder stage named "builder".

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- builder: build the wheel and install it with its dependencies into a venv ------------------
FROM ${PYTHON_IMAGE} AS builder
ENV VENV=/opt/venv \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Only what the package needs: no tests, data sets, benchmarks or VCS metadata (see .dockerignore).
COPY pyproject.toml README.md ./
COPY app ./app
RUN python -m venv "$VENV" \
 && "$VENV/bin/pip" wheel --no-deps --wheel-dir /src/dist . \
 && "$VENV/bin/pip" install /src/dist/*.whl

# ---- runtime -----------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="cascade" \
      org.opencontainers.image.description="OpenAI-compatible proxy that cascades chat requests from cheap to strong models" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN groupadd --system --gid 10001 cascade \
 && useradd --system --uid 10001 --gid cascade --home-dir /app --no-create-home \
      --shell /usr/sbin/nologin cascade \
 && mkdir -p /app/data /etc/cascade \
 && chown cascade:cascade /app/data

COPY --from=builder /opt/venv /opt/venv
# Default config: one cascade over OpenAI models, keys from the environment. Mount your own over it.
COPY deploy/docker/config.yaml /etc/cascade/config.yaml

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CASCADE_CONFIG=/etc/cascade/config.yaml \
    CASCADE_HOST=0.0.0.0 \
    CASCADE_PORT=8000 \
    CASCADE_WORKERS=1 \
    CASCADE_LOG_FORMAT=json

# The default sqlite learning store (sqlite:///./data/traces.db) lives here.
WORKDIR /app
VOLUME ["/app/data"]
USER 10001:10001
EXPOSE 8000

# python:slim has no curl: probe /healthz with the standard library, on the port actually served:
# `serve --port N` (read from PID 1's command line, also behind `docker run --init`), else CASCADE_PORT.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; a = open('/proc/1/cmdline', 'rb').read().decode(errors='replace').split(chr(0)); p = next((x[7:] for x in a if x.startswith('--port=')), None) or next((a[i + 1] for i, x in enumerate(a[:-1]) if x == '--port'), None) or os.environ.get('CASCADE_PORT', '8000'); r = urllib.request.urlopen('http://127.0.0.1:%s/healthz' % p, timeout=4); sys.exit(0 if r.status == 200 else 1)"]

# Exec form: `cascade` is PID 1 and receives SIGTERM itself (graceful drain, then exit 0).
# Set the drain window with server.shutdown_grace_s; give `docker stop -t` a few seconds more.
STOPSIGNAL SIGTERM
ENTRYPOINT ["cascade"]
CMD ["serve"]

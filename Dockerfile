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

# No CASCADE_HOST/PORT/WORKERS/LOG_FORMAT here: the environment beats the config file, so an image
# default would silently override a mounted config's `server` section (the app's own defaults are the
# same: 0.0.0.0, 8000, one worker, JSON logs).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CASCADE_CONFIG=/etc/cascade/config.yaml

# The default sqlite learning store (sqlite:///./data/traces.db) lives here.
WORKDIR /app
VOLUME ["/app/data"]
USER 10001:10001
EXPOSE 8000

# python:slim has no curl: probe /healthz with the standard library, on the port actually served:
# `serve --port N` (PID 1's command line, also behind `docker run --init`), else CASCADE_PORT, else the
# config file's server.port, else 8000 (app/healthcheck.py).
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-m", "app.healthcheck"]

# Exec form: `cascade` is PID 1 and receives SIGTERM itself (graceful drain, then exit 0).
# Set the drain window with server.shutdown_grace_s; give `docker stop -t` a few seconds more.
STOPSIGNAL SIGTERM
ENTRYPOINT ["cascade"]
CMD ["serve"]

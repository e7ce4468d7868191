# syntax=docker/dockerfile:1
# llm-gateway: REST facade and gRPC ChatService in one slim image.
#
#   docker build -t llm-gateway .
#   docker run --rm -p 8080:8080 -p 50051:50051 llm-gateway     # the built-in dummy model works as is
#
# Mount your own config at /app/config.yml, or anywhere with CONFIG_PATH set.

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- builder: a venv with the gateway installed
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Everything the wheel is built from (pyproject.toml lists the packages; readme = README.md).
COPY pyproject.toml README.md ./
# The OpenAPI spec the REST facade serves: rest_facade/openapi.yaml links to it, the wheel carries it.
COPY openapi.yaml ./
COPY gateway ./gateway
COPY service ./service
COPY rest_facade ./rest_facade
COPY gen ./gen
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && pip install /wheels/*.whl

# ---------------------------------------------------------------- runtime: the venv and a config, no build tools
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="llm-gateway" \
      org.opencontainers.image.description="An OpenAI-compatible LLM gateway: a gRPC ChatService behind a REST facade."
# Ports and host come from the config (default 0.0.0.0, 8080 and 50051) or SERVER_HOST, SERVER_PORT, GRPC_PORT.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid gateway --no-create-home --home-dir /app --shell /usr/sbin/nologin gateway
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
COPY config.yml ./config.yml
# The usage ledger's SQLite file lives in a volume the gateway user owns (set USAGE_DATABASE to a
# postgresql:// URL, or to "" to turn the ledger off).
RUN mkdir -p /var/lib/llm-gateway && chown gateway:gateway /var/lib/llm-gateway
ENV USAGE_DATABASE=sqlite:////var/lib/llm-gateway/usage.db
VOLUME /var/lib/llm-gateway
USER gateway:gateway
EXPOSE 8080 50051
# Slim images have no curl: ask /healthz with the standard library, on the REST port the gateway's own config
# loader resolves (CONFIG_PATH or ./config.yml, then SERVER_PORT).
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; from gateway.config import load; urllib.request.urlopen(f'http://127.0.0.1:{load().server.port}/healthz', timeout=2)"]
ENTRYPOINT ["llm-gateway"]
CMD []

# sigil-feed sidecar: serves tokenized, packed batches to the trainer in the same pod.
#
#   docker build -t sigil-feed .
#   docker run -p 50051:50051 -p 9464:9464 -v $PWD/trainer.yaml:/config/trainer.yaml:ro \
#       -e SIGIL_FEED_CONFIG=/config/trainer.yaml sigil-feed
#
# Environment (each also a `sigil-feed serve` flag):
#   SIGIL_FEED_CONFIG        trainer YAML to serve (mount it); unset: the embedded default dataset
#   SIGIL_FEED_HOST          address to listen on (0.0.0.0 here: probes reach the pod's IP; set a token then)
#   SIGIL_FEED_PORT          gRPC port, 50051
#   SIGIL_FEED_METRICS_PORT  Prometheus /metrics port, 9464 (empty: off)
#   SIGIL_FEED_LOG_JSON      1: one JSON object per log line
#   SIGIL_FEED_CACHE         token stores of cached-mode datasets (mount a volume: emptyDir or PVC)

FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sigil_feed sigil_feed
COPY protos protos
COPY server server
COPY client client
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir '.[server,s3]'

FROM python:3.11-slim
COPY --from=build /opt/venv /opt/venv
RUN useradd --create-home --uid 10001 feed && mkdir -p /cache && chown feed /cache
USER 10001
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SIGIL_FEED_HOST=0.0.0.0 \
    SIGIL_FEED_PORT=50051 \
    SIGIL_FEED_METRICS_PORT=9464 \
    SIGIL_FEED_LOG_JSON=1 \
    SIGIL_FEED_CACHE=/cache \
    HF_HOME=/cache/huggingface \
    HF_HUB_OFFLINE=1
EXPOSE 50051 9464
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 CMD ["sigil-feed", "health"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["sigil-feed", "serve"]

# sigil-feed sidecar: serves tokenized, packed batches to the trainer in the same pod.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sigil_feed sigil_feed
COPY protos protos
COPY server server
COPY client client
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir '.[server]'

FROM python:3.11-slim
COPY --from=build /opt/venv /opt/venv
RUN useradd --create-home --uid 10001 feed && mkdir -p /cache && chown feed /cache
USER feed
ENV PATH=/opt/venv/bin:$PATH \
    SIGIL_FEED_HOST=0.0.0.0 \
    SIGIL_FEED_PORT=50051 \
    HF_HUB_OFFLINE=1
# SIGIL_FEED_CONFIG: path of the trainer YAML (mount it); unset serves the embedded default dataset.
EXPOSE 50051
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s \
    CMD python -c "import grpc,os,sys;from grpc_health.v1 import health_pb2 as h,health_pb2_grpc as g;c=grpc.insecure_channel('127.0.0.1:'+os.environ['SIGIL_FEED_PORT']);s=g.HealthStub(c).Check(h.HealthCheckRequest(),timeout=2).status;sys.exit(0 if s==h.HealthCheckResponse.SERVING else 1)"
ENTRYPOINT ["sigil-feed", "serve"]

# The router (front door: auth, rate limits, cache, routing) and the autoscaler, which needs
# no torch either. Build from the repository root:
#   docker build -f deploy/docker/router.Dockerfile -t tandem-router:0.1.0 .
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/tandem
COPY pyproject.toml README.md ./
COPY protos protos
COPY core core
COPY model model
COPY cloud cloud
COPY control control
COPY autoscale autoscale
COPY edge edge
COPY router router
COPY federation federation
COPY tandem tandem
RUN pip install --no-cache-dir . \
    && useradd --create-home --uid 10001 tandem

USER 10001
# gRPC, the router's metrics, the autoscaler's metrics.
EXPOSE 50050 9190 9194
ENTRYPOINT ["tandem"]
CMD ["router", "serve", "--host", "0.0.0.0"]

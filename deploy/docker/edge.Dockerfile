# An edge node: ONNX Runtime on the CPU, no torch. Plain Linux hosts use the systemd unit
# (deploy/systemd); this image is for sites that run containers. Build from the repository root:
#   docker build -f deploy/docker/edge.Dockerfile -t tandem-edge:0.1.0 .
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
# The core install: onnxruntime, tokenizers, grpc; torch stays out (gigabytes). Sites that
# take part in federated fine-tuning build with --build-arg EXTRAS=federation: Flower and a
# CPU-only torch for the SuperNode's training.
ARG EXTRAS=""
# DL3013: the project itself is the package; pyproject.toml pins its dependencies.
# hadolint ignore=DL3013
RUN if [ -n "$EXTRAS" ]; then \
      pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"; \
    fi \
    && pip install --no-cache-dir ".${EXTRAS:+[$EXTRAS]}" \
    && useradd --create-home --uid 10001 tandem \
    && mkdir -p /var/lib/tandem-edge && chown tandem /var/lib/tandem-edge

USER 10001
# The node's config, credential and models: keep them on a volume. Enroll once with
#   docker run --rm -v tandem-edge:/var/lib/tandem-edge tandem-edge:0.1.0 edge install \
#     --cloud CONTROL:50052 --token TOKEN --data-dir /var/lib/tandem-edge --no-systemd \
#     --host 0.0.0.0 --advertise THIS_HOST:50061
VOLUME ["/var/lib/tandem-edge"]
EXPOSE 50061 9192
ENTRYPOINT ["tandem"]
CMD ["edge", "run", "--data-dir", "/var/lib/tandem-edge"]

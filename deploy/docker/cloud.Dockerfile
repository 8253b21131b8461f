# The cloud tier: PyTorch on a CUDA GPU, continuous batching, plus the control plane and the
# Flower SuperLink (same image, other commands). Build from the repository root:
#   docker build -f deploy/docker/cloud.Dockerfile -t tandem-cloud:0.1.0 .
# The base image carries torch built for CUDA 12.4 (needs an NVIDIA driver >= 550 on the node);
# pip then finds torch>=2.4 satisfied and installs no second copy.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

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
# .[federation] is .[cloud] plus Flower, for the SuperLink that runs from this image too.
# DL3013 reads the local project ".[federation]" as an unpinned package; pyproject.toml pins.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[federation]" \
    && useradd --create-home --uid 10001 tandem \
    && mkdir -p /var/lib/tandem && chown tandem /var/lib/tandem

USER 10001
# gRPC inference, control plane, Flower SuperLink, and the metrics ports of cloud and control.
EXPOSE 50051 50052 8000 9191 9193
ENTRYPOINT ["tandem"]
CMD ["cloud", "serve", "--host", "0.0.0.0", "--device", "cuda"]

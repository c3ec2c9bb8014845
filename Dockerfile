# trimode: OpenAI-compatible server for tri-mode diffusion LMs.
#
#   CPU image (default):  docker build -t trimode:cpu .
#   CUDA image:           docker build --build-arg VARIANT=cuda -t trimode:cuda .
#
# Both images run `trimode serve` as a non-root user, listen on 0.0.0.0:8000, read checkpoints from the /models
# volume and take their configuration from arguments and TRIMODE_* environment variables (docker/entrypoint.sh).
# Needs BuildKit (the default builder since Docker 23): COPY --chmod, stage chosen by a build argument.
# See docs/deployment.md.

ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim
ARG CUDA_DEVEL_IMAGE=nvidia/cuda:12.8.1-devel-ubuntu24.04
ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------------------------
# CPU: python:3.11-slim, CPU-only torch wheel, trimode in a virtual environment copied into a clean runtime stage.
# ---------------------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu-build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first and on its own: the largest layer, cached across source changes
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
WORKDIR /src
COPY pyproject.toml README.md* ./
COPY engine ./engine
COPY server ./server
COPY loadtest ./loadtest
COPY bench ./bench
COPY convert ./convert
COPY trimode_cli.py ./
RUN pip install . && python -c "import engine, server; import torch; print('torch', torch.__version__)"

FROM ${PYTHON_IMAGE} AS cpu-base
# g++ builds trimode's CPU kernels on the first start of a container (engine/cpu_kernels.py, about 30 s, for the
# host's CPU; ninja comes with the Python dependencies). Without a compiler the server runs eager torch ops.
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
COPY --from=cpu-build /opt/venv /opt/venv

# ---------------------------------------------------------------------------------------------------------------
# CUDA: build in the devel image (nvcc, for flash-attn when no prebuilt wheel matches), run in the runtime image.
# ---------------------------------------------------------------------------------------------------------------
FROM ${CUDA_DEVEL_IMAGE} AS cuda-build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# flash-attn compiles for these GPU architectures when it has to build from source (Ampere, Ada, Hopper)
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0"
ARG MAX_JOBS=8
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} MAX_JOBS=${MAX_JOBS}
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}" \
    && pip install packaging ninja wheel setuptools psutil
WORKDIR /src
COPY pyproject.toml README.md* ./
COPY engine ./engine
COPY server ./server
COPY loadtest ./loadtest
COPY bench ./bench
COPY convert ./convert
COPY trimode_cli.py ./
# flash-attn needs torch at build time, hence no build isolation
RUN pip install --no-build-isolation ".[gpu]" \
    && python -c "import engine, server, flash_attn; import torch; print('torch', torch.__version__, torch.version.cuda)"

FROM ${CUDA_RUNTIME_IMAGE} AS cuda-base
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
COPY --from=cuda-build /opt/venv /opt/venv
ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility

# ---------------------------------------------------------------------------------------------------------------
# Final image: the chosen variant plus the runtime layout shared by both.
# ---------------------------------------------------------------------------------------------------------------
FROM ${VARIANT}-base AS final
ARG VARIANT=cpu
ARG UID=10001
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/trimode \
    HF_HOME=/home/trimode/.cache/huggingface \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TRIMODE_IMAGE_VARIANT=${VARIANT}
RUN groupadd --gid ${UID} trimode \
    && useradd --uid ${UID} --gid ${UID} --create-home --home-dir /home/trimode --shell /usr/sbin/nologin trimode \
    && mkdir -p /models /app/configs \
    && chown trimode:trimode /models
COPY configs /app/configs
COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/trimode-entrypoint
COPY --chmod=0755 docker/healthcheck.py /usr/local/bin/trimode-healthcheck
WORKDIR /app
VOLUME ["/models"]
USER trimode:trimode
EXPOSE 8000
# Liveness: /health answers 200 while the engine thread is alive (503 once it has died). The port is read from
# the server's own command line (--port), so the check follows `docker run ... --port 9000`.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "/usr/local/bin/trimode-healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["trimode-entrypoint"]
CMD ["--host", "0.0.0.0", "--port", "8000"]

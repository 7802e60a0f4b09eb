# moeharden on a CUDA-capable PyTorch base image.
#
#   docker build -t moeharden .
#   docker run --rm --gpus all -v "$PWD:/work" -e HF_TOKEN moeharden scan mistralai/Mixtral-8x7B-v0.1 \
#       --task glue-sst2 --out /work/scan
#
# The base image brings Python, CUDA 12.8 runtime libraries and a CUDA build of PyTorch; pip keeps
# that torch (it satisfies torch>=2.4) and installs moeharden with the signing, LoRA and ROUGE extras.
FROM pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Install as root into the image's Python; only the package sources are copied (see .dockerignore).
WORKDIR /opt/moeharden
COPY pyproject.toml README.md ./
COPY scripts/constraints.txt ./scripts/
COPY src ./src
# the transformers the families registry was checked against (scripts/constraints.txt)
RUN pip install -c scripts/constraints.txt ".[sign,recover,rouge]" && moeharden --version

# Run as an unprivileged user; model downloads and the demo cache go to its home.
RUN useradd --create-home --uid 1000 --shell /bin/bash moeharden && mkdir -p /work \
    && chown moeharden:moeharden /work
USER moeharden
ENV HOME=/home/moeharden \
    HF_HOME=/home/moeharden/.cache/huggingface
WORKDIR /work

ENTRYPOINT ["moeharden"]
CMD ["--help"]

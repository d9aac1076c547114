# blurctl on CUDA. Build from the repository root:
#   docker build -t blurctl .
#   docker run --gpus all -v "$PWD/runs:/runs" -v "$HOME/.cache/huggingface:/data/hf" \
#     -e HF_TOKEN blurctl run /opt/blurctl/recipes/demo.yaml output_dir=/runs/demo
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/data/hf \
    BLURCTL_CACHE=/data/blurctl

WORKDIR /opt/blurctl
COPY requirements.lock ./
RUN pip install --no-cache-dir -r requirements.lock
COPY pyproject.toml README.md ./
COPY blurctl ./blurctl
COPY recipes ./recipes
RUN pip install --no-cache-dir --no-deps . \
    && useradd --create-home --uid 1000 blurctl \
    && mkdir -p /data/hf /data/blurctl /runs \
    && chown -R blurctl:blurctl /data /runs

USER 1000:1000
WORKDIR /runs
VOLUME ["/data/hf", "/data/blurctl", "/runs"]
ENTRYPOINT ["blurctl"]
CMD ["--help"]

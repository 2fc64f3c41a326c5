# switchyard images (the Helm chart's defaults). Two targets:
#
#   docker build --target sidecar -t switchyard:0.1.0 .          # `serve`, `envoy render`, `policy`: no torch
#   docker build --target scorer  -t switchyard-scorer:0.1.0 .   # + torch and the ml extra: `scorer serve`
#
# The install steps are the ones `make setup` and the tests run: `pip install .` installs
# the package with its runtime dependencies; the scorer first installs torch==2.13.0 (the
# Makefile's pin; PyPI's Linux wheel brings CUDA for GPU nodes), then the `ml` extra.
# Both run as uid 10001 with nothing to write: the chart mounts a read-only root filesystem.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The CA bundle that `switchyard envoy render --tls` points Envoy at (the chart's caFile).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin switchyard
WORKDIR /src
COPY pyproject.toml README.md ./
COPY extproc ./extproc
COPY routers ./routers
COPY switchyard ./switchyard

FROM base AS sidecar
RUN pip install . && rm -rf /src
WORKDIR /
USER 10001
ENTRYPOINT ["switchyard"]
CMD ["--help"]

FROM base AS scorer
RUN pip install torch==2.13.0 \
 && pip install '.[ml]' \
 && rm -rf /src
ENV HF_HUB_OFFLINE=1 \
    HF_HOME=/tmp/hf
WORKDIR /
USER 10001
ENTRYPOINT ["switchyard"]
CMD ["scorer", "serve", "--help"]

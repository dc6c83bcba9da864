# bids_app as a BIDS App container: `docker run IMAGE BIDS_DIR OUTPUT_DIR {participant,group} [options]`.
# Runs as any UID on a read-only root filesystem with only /tmp and the bound folders writable, no network.
# Building, GPU variant and the local-wheel route: docs/containers.md.

# The base is Debian 12 so the image's Python (3.11) is the distribution's, patched by Debian security updates.
ARG BASE_IMAGE=debian:bookworm-slim

# ---------------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS builder

# An index holding a torch build without CUDA (a 190 MB wheel instead of several GB of CUDA wheels). Set it
# to a CUDA index (.../whl/cu128) for a GPU image, or to "" to take torch from PyPI alone. Not used when the
# build context holds wheels/torch-*.whl: those wheels are then used instead (offline or mirrored builds).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# Versions are not pinned: the base image's release pins the Debian packages (python3 is 3.11 on bookworm).
# ca-certificates also adds any site CA found in /usr/local/share/ca-certificates (TLS-intercepting proxies).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

# pip trusts the system CA bundle (the distribution's, plus site CAs) instead of its own copy.
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

# The lock file alone decides this layer, so code changes never reinstall the dependencies.
# `wheel[s]` is a glob so a context without wheels/ still builds; matching wheels land beside the lock file.
COPY requirements.lock wheel[s] /build/

RUN set -- ; \
    if [ -n "$(find /build -maxdepth 1 -name '*.whl' -print -quit)" ]; then set -- "$@" --find-links=/build; fi; \
    if [ -z "$(find /build -maxdepth 1 -name 'torch-*.whl' -print -quit)" ] && [ -n "${TORCH_INDEX_URL}" ]; then \
        set -- "$@" --extra-index-url="${TORCH_INDEX_URL}"; \
    fi; \
    python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --no-compile "$@" -r /build/requirements.lock \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)" \
    # Bytecode compiled once and trusted without timestamp checks: the runtime file system is read-only.
    # torch ships one test helper in Python 3.12 syntax; it is never imported.
    && /opt/venv/bin/python -m compileall -q -j 0 --invalidation-mode unchecked-hash \
        -x '/torch/testing/_internal/py312_intrinsics[.]py$' /opt/venv/lib

# ---------------------------------------------------------------------------------------------------------
# The package itself, as a wheel: a code change rebuilds this stage and one small layer of the final image,
# never the 1.5 GB environment. The venv's setuptools (a torch dependency) builds it, offline.
FROM builder AS package
COPY pyproject.toml version README.m[d] /src/
COPY bids_app /src/bids_app
RUN /opt/venv/bin/pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /dist /src

# ---------------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE}

# Only the interpreter: the virtual environment comes from the builder. Versions pinned by the base release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/*

COPY --from=builder /opt/venv /opt/venv

# The single source of the version is the repository's `version` file; the build fails below if this
# default drifts from it. Override with --build-arg BIDS_APP_VERSION="$(cat version)" (the Makefile does).
ARG BIDS_APP_VERSION=0.1.0
# Where the image is published; recorded in every output's dataset_description.json (GeneratedBy.Container).
ARG IMAGE_NAME=ghcr.io/bids-apps/bids_app
# "-cuda" for a GPU build, so the recorded tag names the image that really ran.
ARG TAG_SUFFIX=""

LABEL org.opencontainers.image.title="bids_app" \
      org.opencontainers.image.description="A BIDS App for reproducible, leak-proof deep learning on neuroimaging data" \
      org.opencontainers.image.version="${BIDS_APP_VERSION}" \
      org.opencontainers.image.source="https://github.com/bids-apps/bids_app" \
      org.opencontainers.image.url="https://github.com/bids-apps/bids_app" \
      org.opencontainers.image.licenses="MIT"

COPY --from=package /dist /tmp/dist
RUN /opt/venv/bin/pip install --no-cache-dir --no-compile --no-deps --disable-pip-version-check \
        --root-user-action=ignore /tmp/dist/*.whl \
    && /opt/venv/bin/pip check --disable-pip-version-check \
    && /opt/venv/bin/python -m compileall -q --invalidation-mode unchecked-hash \
        /opt/venv/lib/python3.11/site-packages/bids_app \
    && rm -rf /tmp/dist

COPY version /version
RUN test "$(cat /version)" = "${BIDS_APP_VERSION}" \
    || { echo "BIDS_APP_VERSION=${BIDS_APP_VERSION} differs from the version file ($(cat /version)):" \
              "build with --build-arg BIDS_APP_VERSION=\"\$(cat version)\" or update the Dockerfile default." >&2; \
         exit 1; }

# Everything a library might write goes under /tmp (a tmpfs in `docker run --read-only --tmpfs /tmp`), so
# the image works for any UID, with no home folder and no network: HOME for ~-expanding code, XDG for
# caches (torch hub, pybids), matplotlib's font cache, nilearn's data folder (the app only uses the
# templates nilearn ships, never a download), deno's code cache for bids-validator-deno.
ENV PATH=/opt/venv/bin:${PATH} \
    HOME=/tmp \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    XDG_CONFIG_HOME=/tmp/.config \
    MPLCONFIGDIR=/tmp/matplotlib \
    NILEARN_DATA=/tmp/nilearn_data \
    DENO_DIR=/tmp/deno \
    DENO_NO_UPDATE_CHECK=1 \
    DENO_NO_PROMPT=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BIDS_APP_CONTAINER=docker:${IMAGE_NAME}:${BIDS_APP_VERSION}${TAG_SUFFIX}

# Self-test of the final image: the app starts, --help stays light, the validator binary runs.
RUN bids_app --version \
    && python -c "import sys, bids_app.cli.main, bids_app.cli.arguments as a; a.build_parser(); sys.exit('--help imports torch' if 'torch' in sys.modules else 0)" \
    && bids-validator-deno --version \
    && rm -rf /tmp/* /tmp/.[!.]*

ENTRYPOINT ["bids_app"]

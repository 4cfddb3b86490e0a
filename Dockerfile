# datapin's one image: the operator, the node agent and the injected sidecar.
#
# Design, and why:
# - One image for all three programs. The operator injects the sidecar with `args: ["run"]` or
#   `["once"]` and no command, so the entrypoint is `datapin-sidecar` and `run` the default; the
#   chart's operator and agent containers name their program with `command:`.
# - Two stages. The builder makes a virtualenv at /opt/datapin from the source tree (a real,
#   non-editable install with no dev extras); the runtime stage copies only that venv, so no
#   source tree, build backend or pip cache reaches the image. Both stages use the same base, so
#   the venv's interpreter symlinks resolve in the runtime stage.
# - The venv is made --without-pip and filled by the base image's pip (`pip --python`): the
#   programs never install anything, so the venv holds only what they import.
# - Bytecode is compiled in the builder, because the pods run with readOnlyRootFilesystem and
#   could otherwise never cache it (every start would recompile every import). The pycs are
#   `unchecked-hash`: they do not depend on the sources' mtimes, which a build that rewrites
#   timestamps for reproducibility (SOURCE_DATE_EPOCH) changes after compiling; a timestamp pyc
#   would then be stale and silently recompiled in memory at every start.
# - Non-root (65532, numeric so kubelet's runAsNonRoot can verify it without a passwd lookup),
#   read-only root filesystem: HOME=/tmp (the chart mounts an emptyDir there for the operator;
#   git's missing global config is fine), no bytecode writes, no cwd on sys.path.
# - Runtime system packages are the programs' own subprocesses: git (the operator resolves tags
#   and branches with the git CLI), openssh-client (ssh:// and git@host: repositories) and
#   ca-certificates (https remotes, for git; Python's TLS uses certifi).
#
# tests/test_image.py lints this file with hadolint, checks these facts, and builds the same
# venv without Docker to run every program the chart and the operator invoke, read-only.

FROM python:3.11-slim-bookworm AS builder

WORKDIR /src
# Only what `pip install .` reads (pyproject's packages live under sidecar/ and operator/;
# setup.py generates the CSI message modules from their .proto files); .dockerignore keeps
# caches, egg-info and any generated modules of the source tree out of these.
COPY pyproject.toml setup.py README.md ./
COPY sidecar/ sidecar/
COPY operator/ operator/

# Build isolation stays on: pip fetches the build backend pyproject.toml asks for, whatever the
# base image's setuptools is. --no-compile: compileall below writes the pycs, in one mode.
RUN python -m venv --without-pip /opt/datapin \
    && python -m pip --python /opt/datapin/bin/python install --no-cache-dir --no-compile . \
    && python -m compileall -q -j 0 --invalidation-mode unchecked-hash /opt/datapin/lib


FROM python:3.11-slim-bookworm

LABEL org.opencontainers.image.title="datapin" \
      org.opencontainers.image.description="Pinned DVC dataset revisions for Kubernetes training pods: operator, node agent and sidecar in one image." \
      org.opencontainers.image.source="https://github.com/datapin/datapin" \
      org.opencontainers.image.licenses="Apache-2.0"

# Debian versions are not pinned (DL3008): bookworm replaces a package's version on every
# security update and drops the old one from the mirrors, so a pinned version breaks the build
# within weeks; the base image tag already fixes the Debian release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates git openssh-client \
    && rm -rf /var/lib/apt/lists/*

# A home directory owned by root: nothing is written there (HOME=/tmp), but ssh and git look up
# the passwd entry, and a missing directory would make them warn.
RUN groupadd --system --gid 65532 datapin \
    && useradd --system --uid 65532 --gid 65532 --home-dir /home/datapin --no-create-home \
       --shell /usr/sbin/nologin datapin \
    && mkdir -p /home/datapin

COPY --from=builder /opt/datapin /opt/datapin

ENV PATH="/opt/datapin/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONSAFEPATH=1 \
    HOME=/tmp

USER 65532:65532

ENTRYPOINT ["datapin-sidecar"]
CMD ["run"]

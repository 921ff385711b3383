# NOVA: one image for both commands. The entry point is `twist`; the
# command picks the plugin:
#   docker run --rm nova:0.1.0 novac --check      # with the NOVAC_* variables
#   docker run -d nova:0.1.0 novas                 # with the NOVAS_* variables
# Build from the repository root (BuildKit: DOCKER_BUILDKIT=1 with Docker
# 20.10, the default since 23.0; podman/buildah build it as it is):
#   DOCKER_BUILDKIT=1 docker build -t nova:0.1.0 .
# Behind a TLS-inspecting proxy or a private index, hand the build stage the
# CA bundle and the index as a secret and a build argument; neither reaches
# the image (the run stage only copies /opt/nova):
#   docker build --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt \
#       --build-arg PIP_INDEX_URL=https://pypi.example.internal/simple -t nova:0.1.0 .
# The Python dependencies are pinned by etc/docker/constraints.txt (`pip
# freeze` of the image's /opt/nova); the PostgreSQL audit store's driver
# (the `postgresql` extra) is included.
# etc/docker/*-compose.yml and etc/kubernetes/*.yaml run this image.
#
# BASE: any Debian-based image with python3 (3.11+) and its venv module.
# The steps call `python3` and create their own venv, so they work the same
# on python:3.11-slim (/usr/local/bin/python3) and on Debian's own python3
# (/usr/bin/python3), which is what the tests build from (no registry there).
ARG BASE=python:3.11-slim

# --- Build: the package and its dependencies in /opt/nova -----------------
FROM ${BASE} AS build
ARG PIP_INDEX_URL=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_INDEX_URL=${PIP_INDEX_URL}
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY etc/docker/constraints.txt ./etc/docker/constraints.txt
COPY nova ./nova
COPY twisted/plugins ./twisted/plugins
RUN --mount=type=secret,id=ca,required=false \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && if [ -z "$PIP_INDEX_URL" ]; then unset PIP_INDEX_URL; fi \
 && python3 -m venv /opt/nova \
 && /opt/nova/bin/python -m pip install --constraint etc/docker/constraints.txt '.[postgresql]'

# --- Run --------------------------------------------------------------------
FROM ${BASE}
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/nova/bin:$PATH
# A fixed, numeric, unprivileged user: Kubernetes' runAsNonRoot can check it.
RUN groupadd --system --gid 10001 nova \
 && useradd --system --uid 10001 --gid nova --home-dir /var/lib/nova --shell /usr/sbin/nologin nova \
 && install -d -o nova -g nova -m 0700 /var/lib/nova
COPY --from=build /opt/nova /opt/nova
# Twisted's plugin cache, written now because the root file system is
# read-only at run time; then the install is tried.
RUN /opt/nova/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
 && test -s /opt/nova/lib/python3*/site-packages/twisted/plugins/dropin.cache \
 && twist novas --help > /dev/null && twist novac --help > /dev/null
USER 10001:10001
WORKDIR /var/lib/nova
# 9022: agents dial NOVAS; 9023: NOVAS admin; 8080: NOVAC probes (when
# NOVAC_HEALTH_PORT=8080).
EXPOSE 9022 9023 8080
ENTRYPOINT ["twist"]
CMD ["novac"]

# NOVA: one image for both commands. The entry point is `twist`; the
# command picks the plugin:
#   docker run --rm nova:0.1.0 novac --check      # with the NOVAC_* variables
#   docker run -d nova:0.1.0 novas                 # with the NOVAS_* variables
# Build from the repository root:  docker build -t nova:0.1.0 .
# etc/docker/*-compose.yml and etc/kubernetes/*.yaml run this image.

# --- Build: a wheel of this package ----------------------------------------
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY nova ./nova
COPY twisted/plugins ./twisted/plugins
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- Run --------------------------------------------------------------------
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# A fixed, numeric, unprivileged user: Kubernetes' runAsNonRoot can check it.
RUN groupadd --system --gid 10001 nova \
 && useradd --system --uid 10001 --gid nova --home-dir /var/lib/nova --shell /usr/sbin/nologin nova \
 && install -d -o nova -g nova -m 0700 /var/lib/nova
COPY --from=build /wheels /wheels
# The package and its dependencies; then Twisted's plugin cache, written
# now because the root file system is read-only at run time.
RUN python -m pip install --no-cache-dir /wheels/*.whl \
 && rm -rf /wheels \
 && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
 && twist novas --help > /dev/null && twist novac --help > /dev/null
USER 10001:10001
WORKDIR /var/lib/nova
# 9022: agents dial NOVAS; 9023: NOVAS admin; 8080: NOVAC probes (when
# NOVAC_HEALTH_PORT=8080).
EXPOSE 9022 9023 8080
ENTRYPOINT ["twist"]
CMD ["novac"]

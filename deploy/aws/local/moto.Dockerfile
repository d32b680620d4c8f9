# moto's server as a container: the DynamoDB stand-in `sam local` reaches on a Docker network
# (docs/aws.md, "Run it locally under SAM"); with registry access, motoserver/moto is the same.
# images.sh moto builds it from wheels made on this machine (wheels/: moto and what its server
# and DynamoDB need), so pip needs no package index here. BASE: Debian bookworm, whose
# python3 (3.11) must be the Python the wheels were made for; installed if missing.
ARG BASE=debian:bookworm-slim
FROM ${BASE}
RUN python3 -c 'import venv, ensurepip' 2>/dev/null \
    || { apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; }
COPY wheels /tmp/wheels
RUN python3 -m venv /opt/moto \
    && /opt/moto/bin/pip install --quiet --no-index /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels
EXPOSE 5000
ENTRYPOINT ["/opt/moto/bin/moto_server", "-H", "0.0.0.0", "-p", "5000"]

# moto's server as a container: the DynamoDB stand-in `sam local` reaches on a Docker network
# (docs/aws.md, "Run it locally under SAM"); with registry access, motoserver/moto is the same.
# images.sh moto builds it from wheels made on this machine (wheels/: moto and what its server
# and DynamoDB need), so the build needs no package index. BASE: a Debian with python3 and
# python3-venv, of the Python the wheels are for.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}
COPY wheels /tmp/wheels
RUN python3 -m venv /opt/moto \
    && /opt/moto/bin/pip install --quiet --no-index /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels
EXPOSE 5000
ENTRYPOINT ["/opt/moto/bin/moto_server", "-H", "0.0.0.0", "-p", "5000"]

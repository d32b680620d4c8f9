# A stand-in for AWS's Lambda base image public.ecr.aws/lambda/python:3.12, for
# `sam local ... --invoke-image` where no image registry is reachable (docs/aws.md, "Run it
# locally under SAM"). Same layout as AWS's: CPython 3.12 in /var/lang, the runtime interface
# client (awslambdaric) and boto3 in /var/runtime with the bootstrap, the code in /var/task,
# /lambda-entrypoint.sh. images.sh runtime builds it; its context holds lang/ (a CPython 3.12
# copied from this machine) and runtime/ (pip install --target).
ARG BASE=debian:bookworm-slim
FROM ${BASE}
# The shared libraries CPython's extension modules link to (ssl, sqlite3, ctypes, lzma, ...).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libssl3 libsqlite3-0 libffi8 \
        libbz2-1.0 liblzma5 zlib1g libexpat1 libreadline8 libncursesw6 libuuid1 \
    && rm -rf /var/lib/apt/lists/*
COPY lang /var/lang
COPY runtime /var/runtime
COPY bootstrap /var/runtime/bootstrap
COPY lambda-entrypoint.sh /lambda-entrypoint.sh
# AWS's image sets these (LD_LIBRARY_PATH also finds a shared libpython in /var/lang/lib).
ENV LANG=en_US.UTF-8 \
    TZ=:/etc/localtime \
    PATH=/var/lang/bin:/usr/local/bin:/usr/bin/:/bin:/opt/bin \
    LD_LIBRARY_PATH=/var/lang/lib:/lib64:/usr/lib64:/var/runtime:/var/runtime/lib:/var/task:/var/task/lib:/opt/lib \
    LAMBDA_TASK_ROOT=/var/task \
    LAMBDA_RUNTIME_DIR=/var/runtime
# Compiled as in AWS's image (pip installed for another Python: --no-compile). The import
# fails the build, not the first invocation, if the copied Python misses a library.
RUN chmod 755 /lambda-entrypoint.sh /var/runtime/bootstrap && mkdir -p /var/task \
    && /var/lang/bin/python3.12 -m compileall -q /var/runtime \
    && PYTHONPATH=/var/runtime /var/lang/bin/python3.12 -c \
        "import ssl, sqlite3, ctypes, lzma, bz2, zlib, decimal, uuid, awslambdaric, boto3"
WORKDIR /var/task
ENTRYPOINT ["/lambda-entrypoint.sh"]

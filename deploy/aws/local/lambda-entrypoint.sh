#!/bin/sh
# The image's entrypoint, as in AWS's Lambda images: `docker run IMAGE HANDLER` starts the
# runtime under the runtime interface emulator when one is in the image (AWS's images carry
# it at /usr/local/bin; sam local adds it at /var/rapid and runs it directly), or on Lambda
# (AWS_LAMBDA_RUNTIME_API set) the bootstrap alone.
if [ $# -ne 1 ]; then
    echo "entrypoint requires the handler name to be the first argument" 1>&2
    exit 142
fi
export _HANDLER="$1"
RUNTIME_ENTRYPOINT=/var/runtime/bootstrap
if [ -n "${AWS_LAMBDA_RUNTIME_API:-}" ]; then
    exec "$RUNTIME_ENTRYPOINT"
fi
for rie in /usr/local/bin/aws-lambda-rie /var/rapid/aws-lambda-rie; do
    [ -x "$rie" ] && exec "$rie" "$RUNTIME_ENTRYPOINT"
done
echo "no runtime interface emulator in the image (sam local adds one)" 1>&2
exit 1

#!/usr/bin/env bash
# The images `sam local` needs where no image registry is reachable (docs/aws.md, "Run it
# locally under SAM"); the Makefile's lambda-runtime-image and moto-image targets call this.
#
#   images.sh runtime --python PATH --base IMAGE --tag TAG --pip PYTHON [REQUIREMENT ...]
#       AWS's python3.12 Lambda image rebuilt on IMAGE (Debian bookworm): the CPython 3.12 of
#       PATH copied into /var/lang (a self-contained install such as pyenv's, of this
#       machine's architecture), the REQUIREMENTs (default: awslambdaric, AWS's runtime
#       interface client, and boto3, which the runtime provides) installed into /var/runtime
#       by PYTHON's pip for Python 3.12 (binary wheels only: nothing is compiled).
#   images.sh moto --base IMAGE --tag TAG --pip PYTHON [REQUIREMENT ...]
#       moto's server for DynamoDB on IMAGE (Debian bookworm; python3 and python3-venv are
#       installed if missing, and must be PYTHON's version), from wheels PYTHON's pip makes
#       here of the REQUIREMENTs (default: moto, flask, flask-cors, py-partiql-parser: what
#       the server and its DynamoDB need, without moto[server]'s extras for other services,
#       which triple the image).
# The builds use the host's network (apt-get reaches the base image's Debian mirror).
set -euo pipefail

die() {
    echo "images.sh: $*" >&2
    exit 1
}

HERE=$(cd "$(dirname "$0")" && pwd)
CMD=${1:-}
[ $# -gt 0 ] && shift
PYTHON="" BASE="" TAG="" PIP="" REQUIREMENTS=()
while [ $# -gt 0 ]; do
    case $1 in
    --python) PYTHON=$2; shift 2 ;;
    --base) BASE=$2; shift 2 ;;
    --tag) TAG=$2; shift 2 ;;
    --pip) PIP=$2; shift 2 ;;
    -*) die "unknown argument $1 (see the top of $0)" ;;
    *) REQUIREMENTS+=("$1"); shift ;;
    esac
done
[ -n "$BASE" ] || die "$CMD needs --base IMAGE"
[ -n "$TAG" ] || die "$CMD needs --tag TAG"
[ -n "$PIP" ] || die "$CMD needs --pip PYTHON (a Python whose pip reaches the package index)"

CONTEXT=$(mktemp -d "${TMPDIR:-/tmp}/comeapi-image.XXXXXX")
trap 'rm -rf "$CONTEXT"' EXIT

runtime() {
    [ -n "$PYTHON" ] || die "runtime needs --python PATH (a CPython 3.12)"
    local version prefix machine platform
    version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])') \
        || die "$PYTHON does not run"
    [ "$version" = 3.12 ] || die "$PYTHON is Python $version, the runtime is 3.12"
    prefix=$("$PYTHON" -c 'import sys; print(sys.base_prefix)')
    case $prefix in
    /usr | /usr/local) die "$PYTHON is installed in $prefix with other software: copy a self-contained one (pyenv's)" ;;
    esac
    [ -x "$prefix/bin/python3.12" ] && [ -f "$prefix/lib/python3.12/os.py" ] \
        || die "$prefix does not look like a CPython 3.12 installation"
    machine=$(uname -m)
    case $machine in
    x86_64) platform=manylinux2014_x86_64 ;;
    aarch64) platform=manylinux2014_aarch64 ;;
    *) die "no Lambda architecture for $machine" ;;
    esac
    # The interpreter, its shared library and the standard library, without what a Lambda
    # function never imports (tests, IDLE, Tk, pip and its installer, the static library).
    mkdir "$CONTEXT/lang"
    tar -C "$prefix" -cf - \
        --exclude=./lib/python3.12/test --exclude=./lib/python3.12/idlelib \
        --exclude=./lib/python3.12/tkinter --exclude=./lib/python3.12/turtledemo \
        --exclude=./lib/python3.12/ensurepip --exclude=./lib/python3.12/lib2to3 \
        --exclude='./lib/python3.12/config-3.12-*' --exclude='./lib/python3.12/site-packages/*' \
        --exclude='./lib/python3.12/lib-dynload/_test*' --exclude='./lib/python3.12/lib-dynload/_tkinter*' \
        ./bin/python3.12 ./lib | tar -C "$CONTEXT/lang" -xf -
    ln -s python3.12 "$CONTEXT/lang/bin/python3"
    ln -s python3.12 "$CONTEXT/lang/bin/python"
    [ ${#REQUIREMENTS[@]} -gt 0 ] || REQUIREMENTS=(awslambdaric boto3)
    "$PIP" -m pip install --quiet --target "$CONTEXT/runtime" --only-binary=:all: --no-compile \
        --implementation cp --python-version 3.12 --platform "$platform" "${REQUIREMENTS[@]}"
    cp "$HERE/runtime.Dockerfile" "$CONTEXT/Dockerfile"
    cp "$HERE/bootstrap" "$HERE/lambda-entrypoint.sh" "$CONTEXT/"
}

moto() {
    [ ${#REQUIREMENTS[@]} -gt 0 ] || REQUIREMENTS=(moto flask flask-cors py-partiql-parser)
    "$PIP" -m pip wheel --quiet --wheel-dir "$CONTEXT/wheels" "${REQUIREMENTS[@]}"
    cp "$HERE/moto.Dockerfile" "$CONTEXT/Dockerfile"
}

case $CMD in
runtime) runtime ;;
moto) moto ;;
*) die "usage: images.sh runtime|moto ... (see the top of $0)" ;;
esac
docker build --network host --build-arg "BASE=$BASE" -t "$TAG" "$CONTEXT"

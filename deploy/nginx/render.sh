#!/bin/sh
# Render the comeapi nginx configuration into OUT_DIR (POSIX sh + awk: it also runs inside
# the official nginx image). Settings come from the environment; see docs/nginx.md.
#
#   COMEAPI_VARIANT_SECRET=... deploy/nginx/render.sh /etc/nginx/comeapi
#   nginx -c /etc/nginx/comeapi/nginx.conf
set -eu

usage() {
    echo "usage: COMEAPI_VARIANT_SECRET=... $0 OUT_DIR" >&2
    exit 2
}
[ $# -eq 1 ] || usage
OUT_DIR=$1
SRC_DIR=$(cd "$(dirname "$0")" && pwd)

: "${COMEAPI_UPSTREAM:=127.0.0.1:9000}"
: "${COMEAPI_VARIANTS:=5}"
: "${COMEAPI_DEFAULT_MODEL:=smollm2-135m-instruct-q4_1.gguf}"
: "${COMEAPI_MAX_TOKENS_LIMIT:=2048}"
: "${NGINX_LISTEN:=127.0.0.1:8000}"
: "${NGINX_WARMUP_LISTEN:=127.0.0.1:8001}"
: "${NGINX_CACHE_DIR:=/var/cache/nginx/comeapi}"
: "${NGINX_CACHE_MAX_SIZE:=1g}"
: "${NGINX_MAX_BODY:=256k}"
: "${NGINX_GENERATION_TIMEOUT:=600s}"
# How long the raw-body layer answers a body without asking the canonical cache again: also
# how long a purged (rejected) answer may still be served on the public listener.
: "${NGINX_RAW_CACHE_VALID:=10s}"
: "${NGINX_STATE_DIR:=/var/lib/nginx/comeapi}"
: "${NGINX_LOG_DIR:=/var/log/nginx}"
: "${NGINX_JS_MODULE:=}" # empty: the first of the places Debian's and nginx.org's packages use
# DNS server for a COMEAPI_UPSTREAM given by name (Docker: 127.0.0.11). Empty: an address.
: "${NGINX_RESOLVER:=}"
# The worker user must own NGINX_CACHE_DIR. Empty: no `user` line (nginx not run as root).
: "${NGINX_USER=www-data}"

die() {
    echo "render.sh: $*" >&2
    exit 1
}

if [ -z "$NGINX_JS_MODULE" ]; then
    for module in /usr/lib/nginx/modules/ngx_http_js_module.so \
        /etc/nginx/modules/ngx_http_js_module.so; do
        if [ -f "$module" ]; then NGINX_JS_MODULE=$module && break; fi
    done
    [ -n "$NGINX_JS_MODULE" ] || die "njs (ngx_http_js_module.so) not found: install it or set NGINX_JS_MODULE"
fi

secret=${COMEAPI_VARIANT_SECRET:-}
[ -n "$secret" ] || die "COMEAPI_VARIANT_SECRET is not set (the same value as comeapi's --variant-secret)"
[ "${#secret}" -ge 16 ] || die "COMEAPI_VARIANT_SECRET must be at least 16 characters"
case $secret in
*[!A-Za-z0-9._~+/=-]*) die "COMEAPI_VARIANT_SECRET may only use A-Z a-z 0-9 . _ ~ + / = -" ;;
esac
case $COMEAPI_VARIANTS in
'' | *[!0-9]*) die "COMEAPI_VARIANTS must be a number from 1 to 100" ;;
esac
[ "$COMEAPI_VARIANTS" -ge 1 ] && [ "$COMEAPI_VARIANTS" -le 100 ] \
    || die "COMEAPI_VARIANTS must be a number from 1 to 100"
case $COMEAPI_MAX_TOKENS_LIMIT in
'' | *[!0-9]*) die "COMEAPI_MAX_TOKENS_LIMIT must be a whole number (comeapi's max_tokens_limit)" ;;
esac
for name in COMEAPI_UPSTREAM COMEAPI_DEFAULT_MODEL NGINX_LISTEN NGINX_WARMUP_LISTEN \
    NGINX_CACHE_DIR NGINX_CACHE_MAX_SIZE NGINX_MAX_BODY NGINX_GENERATION_TIMEOUT \
    NGINX_RAW_CACHE_VALID NGINX_STATE_DIR NGINX_LOG_DIR NGINX_JS_MODULE NGINX_USER NGINX_RESOLVER; do
    eval "value=\${$name}"
    case $value in
    *[\;\"\'\{\}\ \$\\]*) die "$name=$value: no spaces, quotes, ; { } \$ or \\ allowed" ;;
    esac
done

mkdir -p "$OUT_DIR/njs"
OUT_DIR=$(cd "$OUT_DIR" && pwd)

# split_clients buckets of equal size (the last one takes the rounding rest) and the
# accepted values of X-Comeapi-Variant on the internal listener.
COMEAPI_VARIANT_BUCKETS=$(awk -v n="$COMEAPI_VARIANTS" 'BEGIN {
    share = int(10000 / n) / 100
    for (i = 0; i < n - 1; i++) printf "    %.2f%% %d;\n", share, i
    printf "    * %d;", n - 1
}')
COMEAPI_VARIANT_CHOICES=$(awk -v n="$COMEAPI_VARIANTS" 'BEGIN {
    for (i = 0; i < n; i++) printf "    \"%d\" %d;%s", i, i, (i < n - 1 ? "\n" : "")
}')
NGINX_USER_LINE=""
[ -z "$NGINX_USER" ] || NGINX_USER_LINE="user $NGINX_USER;"
# COMEAPI_API_KEYS: comma-separated, as comeapi reads it. One map entry per key, then any
# other bearer key ("wrong") and no bearer key ("missing", the default), as comeapi tells
# them apart; without keys every request is authorised.
api_keys=${COMEAPI_API_KEYS:-}
if [ -z "$(printf '%s' "$api_keys" | tr -d ', ')" ]; then
    COMEAPI_API_KEY_ENTRIES="    default 1;"
else
    case $api_keys in
    *[!A-Za-z0-9._~+/=,-]*) die "COMEAPI_API_KEYS: keys may only use A-Z a-z 0-9 . _ ~ + / = - (comma-separated)" ;;
    esac
    # Regular expressions: nginx compares plain map strings case-insensitively, which
    # would accept a key with its letters' case changed. The scheme's case does not matter.
    COMEAPI_API_KEY_ENTRIES=$(printf '%s' "$api_keys" | tr ',' '\n' | awk 'NF {
        key = $1; gsub(/[.]/, "[.]", key); gsub(/[+]/, "[+]", key)
        printf "    \"~^[Bb][Ee][Aa][Rr][Ee][Rr] +%s *$\" 1;\n", key
    } END {
        printf "    \"~^[Bb][Ee][Aa][Rr][Ee][Rr] +[^ ]\" wrong;\n    default missing;"
    }')
fi
# COMEAPI_CORS_ORIGINS: comma-separated, as comeapi reads it (--cors-origin); "*" is any
# origin, empty is none. One map entry per origin, a regular expression because nginx
# compares plain map strings case-insensitively and comeapi compares origins exactly.
cors_origins=$(printf '%s' "${COMEAPI_CORS_ORIGINS:-}" | tr ',' '\n' \
    | awk '{ gsub(/^[ \t]+|[ \t]+$/, "") } length { print }')
COMEAPI_CORS_VARY=Origin
if [ -z "$cors_origins" ]; then
    COMEAPI_CORS_ORIGIN_ENTRIES="    default \"\";"
    COMEAPI_CORS_VARY=""
elif printf '%s\n' "$cors_origins" | grep -qx '[*]'; then
    COMEAPI_CORS_ORIGIN_ENTRIES="    default \"*\";"
else
    printf '%s\n' "$cors_origins" | grep -qv '^[a-z][a-z0-9+.-]*://[A-Za-z0-9.:-]*[A-Za-z0-9]$' \
        && die "COMEAPI_CORS_ORIGINS: each origin is scheme://host[:port] (A-Z a-z 0-9 . : -), or * for any; comma-separated"
    COMEAPI_CORS_ORIGIN_ENTRIES=$(printf '%s\n' "$cors_origins" | awk '{
        origin = $1; gsub(/[.]/, "[.]", origin); gsub(/[+]/, "[+]", origin)
        printf "    \"~^%s$\" 1;\n", origin
    } END { printf "    default 0;" }')
fi
NGINX_RESOLVER_LINE=""
# A short resolver_timeout: with comeapi's container stopped, Docker's DNS forwards its name
# to the host's DNS servers, and a miss would wait for their answer (30 s by default, or
# forever-like where they are unreachable) before its 502.
[ -z "$NGINX_RESOLVER" ] \
    || NGINX_RESOLVER_LINE="resolver $NGINX_RESOLVER valid=10s ipv6=off; resolver_timeout 3s;"
NGINX_CONF_DIR=$OUT_DIR
export COMEAPI_UPSTREAM COMEAPI_DEFAULT_MODEL COMEAPI_MAX_TOKENS_LIMIT COMEAPI_VARIANT_BUCKETS COMEAPI_VARIANT_CHOICES \
    COMEAPI_VARIANT_SECRET NGINX_LISTEN NGINX_WARMUP_LISTEN NGINX_CACHE_DIR \
    NGINX_CACHE_MAX_SIZE NGINX_MAX_BODY NGINX_GENERATION_TIMEOUT NGINX_RAW_CACHE_VALID \
    NGINX_STATE_DIR NGINX_LOG_DIR NGINX_JS_MODULE NGINX_USER_LINE NGINX_RESOLVER_LINE NGINX_CONF_DIR COMEAPI_API_KEY_ENTRIES \
    COMEAPI_CORS_ORIGIN_ENTRIES COMEAPI_CORS_VARY

# Replace @NAME@ with ENVIRON[NAME] (plain string operations: values are never patterns).
fill() {
    awk '{
        out = ""; line = $0
        while (match(line, /@[A-Z_]+@/)) {
            name = substr(line, RSTART + 1, RLENGTH - 2)
            if (!(name in ENVIRON)) { print "render.sh: no value for @" name "@" > "/dev/stderr"; exit 1 }
            out = out substr(line, 1, RSTART - 1) ENVIRON[name]
            line = substr(line, RSTART + RLENGTH)
        }
        print out line
    }' "$1" >"$2.tmp"
    mv "$2.tmp" "$2"
}

umask 077 # the rendered files hold the variant secret
fill "$SRC_DIR/nginx.conf" "$OUT_DIR/nginx.conf"
fill "$SRC_DIR/comeapi.conf" "$OUT_DIR/comeapi.conf"
fill "$SRC_DIR/comeapi-locations.conf" "$OUT_DIR/comeapi-locations.conf"
fill "$SRC_DIR/comeapi-cors.conf" "$OUT_DIR/comeapi-cors.conf"
umask 022
cp "$SRC_DIR"/njs/*.js "$OUT_DIR/njs/"
mkdir -p "$NGINX_STATE_DIR" "$NGINX_LOG_DIR" "$NGINX_CACHE_DIR"
# The raw-body cache (comeapi.conf) holds bodies the front door validated: a new
# configuration may validate differently, so it starts empty (it refills from the
# canonical cache, without comeapi).
rm -rf "$NGINX_STATE_DIR/raw-cache"
echo "render.sh: wrote $OUT_DIR/nginx.conf (cache $NGINX_CACHE_DIR, $COMEAPI_VARIANTS variants," \
    "public $NGINX_LISTEN, warmup $NGINX_WARMUP_LISTEN, upstream $COMEAPI_UPSTREAM)"

#!/bin/sh
# The nginx container's entry point: render the configuration from the environment (see
# render.sh), give the cache to the worker user, then exec nginx in the foreground.
set -eu
CONF_DIR=/etc/nginx/comeapi
: "${NGINX_CACHE_DIR:=/var/cache/nginx/comeapi}"
# The official image's worker user is nginx, Debian's www-data.
if [ -z "${NGINX_USER:-}" ]; then
    if id -u nginx >/dev/null 2>&1; then NGINX_USER=nginx; else NGINX_USER=www-data; fi
fi
export NGINX_CACHE_DIR NGINX_USER
/opt/comeapi-nginx/render.sh "$CONF_DIR"
# An imported cache may belong to another uid (cache.sh gives it 101:101, the official
# image's nginx): a worker that cannot read an entry answers MISS, or 502 without comeapi.
find "$NGINX_CACHE_DIR" ! -user "$NGINX_USER" -exec chown "$NGINX_USER:$(id -g "$NGINX_USER")" {} +
exec nginx -c "$CONF_DIR/nginx.conf" -g 'daemon off;'

#!/usr/bin/env bash
# Move nginx's comeapi cache between machines: a plain directory (host mode) or a Docker
# named volume (Docker mode). The Makefile's cache-* targets call this.
#
#   cache.sh export (--dir DIR | --volume NAME) --file FILE
#   cache.sh import (--dir DIR | --volume NAME) --file FILE [--owner USER[:GROUP]] [--pid-file PID]
#   cache.sh copy   --file FILE --remote USER@HOST --remote-path PATH
#   cache.sh remote-import --file FILE --remote USER@HOST --remote-path PATH
#                   (--dir DIR | --volume NAME) [--owner USER[:GROUP]]
#   cache.sh count  (--dir DIR | --volume NAME)
#   cache.sh purge  (--dir DIR | --volume NAME) --key KEY [--key KEY ...]
#                   (every stored answer of those prompts, all slots and routes; KEY is the
#                   prompt's cache key, `comeapi cache review --json` shows it)
# Docker mode runs tar in a throwaway container of --image (default alpine; any image with
# sh, tar, gzip, find and chown). --ssh-opts "OPTIONS" go to ssh and scp (e.g. "-F FILE",
# or "-o Port=2222 -i KEY"; -o options work for both, -p/-P do not).
#
# nginx only sees cache files that are in place when it starts (its cache loader indexes
# the directory once; later it looks at the disk only for keys it does not know), and its
# worker must be able to read them. So import refuses while nginx runs on the cache and
# gives every file to the worker user.
set -euo pipefail

die() {
    echo "cache.sh: $*" >&2
    exit 1
}

CMD=${1:-}
[ $# -gt 0 ] && shift
DIR="" VOLUME="" FILE="" OWNER="" PID_FILE="" REMOTE="" REMOTE_PATH="" IMAGE=alpine SSH_OPTS=""
KEYS=()
while [ $# -gt 0 ]; do
    case $1 in
    --dir) DIR=$2; shift 2 ;;
    --volume) VOLUME=$2; shift 2 ;;
    --file) FILE=$2; shift 2 ;;
    --owner) OWNER=$2; shift 2 ;;
    --pid-file) PID_FILE=$2; shift 2 ;;
    --remote) REMOTE=$2; shift 2 ;;
    --remote-path) REMOTE_PATH=$2; shift 2 ;;
    --image) IMAGE=$2; shift 2 ;;
    --ssh-opts) SSH_OPTS=$2; shift 2 ;;
    --key) KEYS+=("$2"); shift 2 ;;
    *) die "unknown argument $1 (see the top of $0)" ;;
    esac
done

# The official nginx image runs its workers as nginx (101:101); Debian's nginx as www-data.
DOCKER_OWNER=101:101
HOST_OWNER=www-data:www-data
# Cache files are named by the MD5 of their key (32 hex digits); anything with a dot is a
# response nginx is still writing (use_temp_path=off keeps those beside the entries).
# (Not '*.*': that also matches the archive's top directory '.'.)
ENTRY_PATTERN='[0-9a-f]*'
TEMP_PATTERN='?*.*'

need_target() {
    [ -n "$DIR" ] || [ -n "$VOLUME" ] || die "$CMD needs --dir DIR (host mode) or --volume NAME (Docker mode)"
    [ -z "$DIR" ] || [ -z "$VOLUME" ] || die "give --dir or --volume, not both"
}

need_file() {
    [ -n "$FILE" ] || die "$CMD needs --file FILE"
}

docker_helper() { # run a throwaway container of $IMAGE with the volume at /cache
    command -v docker >/dev/null || die "docker is not installed (host mode: use CACHE_DIR=...)"
    docker info >/dev/null 2>&1 ||
        die "the Docker engine is not running (docker info fails): start it (docs/nginx.md, \"Docker mode\": systemctl start docker, or dockerd by hand), or use host mode: CACHE_DIR=..."
    # docker run would pull a missing image and print the registry's error: say what to set.
    if ! docker image inspect "$IMAGE" >/dev/null 2>&1 &&
        ! timeout 600 docker pull --quiet "$IMAGE" >/dev/null 2>&1; then
        local here
        # (grep finds nothing on an engine with no tagged image: not an error here.)
        here=$(docker images --format '{{.Repository}}:{{.Tag}}' | { grep -v '<none>' || true; } | head -5 | paste -sd ' ' -)
        die "the helper image $IMAGE is not on this machine and cannot be pulled (no registry?): set HELPER_IMAGE=IMAGE (cache.sh: --image IMAGE), any local image with sh, tar, gzip, find and chown${here:+; images here: $here}"
    fi
    docker run --rm -v "$VOLUME:/cache" "$@"
}

# ssh and scp with --ssh-opts (split on spaces) and a connection timeout.
remote_ssh() {
    local opts
    read -r -a opts <<<"$SSH_OPTS"
    ssh -o ConnectTimeout=15 "${opts[@]}" "$@"
}
remote_scp() {
    local opts
    read -r -a opts <<<"$SSH_OPTS"
    scp -o ConnectTimeout=15 "${opts[@]}" "$@"
}

count() {
    if [ -n "$DIR" ]; then
        [ -d "$DIR" ] || { echo 0; return; }
        find "$DIR" -type f -name "$ENTRY_PATTERN" ! -name "$TEMP_PATTERN" | wc -l | tr -d ' '
    else
        docker_helper "$IMAGE" sh -c "find /cache -type f ! -name '$TEMP_PATTERN' | wc -l"
    fi
}

# Reject archives that could write outside the target: absolute paths, "..", links.
check_archive() {
    # Each listing is read whole before it is searched: in "tar | grep -q" grep stops at its
    # first match, tar dies of SIGPIPE on a long listing, and under pipefail the match is
    # lost (tests/deploy/test_nginx.py, "among many entries").
    local listing names others
    listing=$(tar tzvf "$FILE") || die "$FILE is not a readable tar.gz archive"
    others=$(grep -Ev '^[-d]' <<<"$listing" || true)
    if [ -n "$others" ]; then
        die "$FILE holds links or special files; a cache archive holds only files and directories"
    fi
    names=$(tar tzf "$FILE") || die "$FILE is not a readable tar.gz archive"
    if grep -Eq '(^/|(^|/)\.\.(/|$))' <<<"$names"; then
        die "$FILE holds absolute or parent (..) paths"
    fi
}

nginx_running() {
    if [ -n "$DIR" ]; then
        [ -n "$PID_FILE" ] && [ -s "$PID_FILE" ] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null
    else
        [ -n "$(docker ps -q --filter "volume=$VOLUME" 2>/dev/null)" ]
    fi
}

do_export() {
    need_target
    need_file
    local out_dir out_name
    out_dir=$(cd "$(dirname "$FILE")" && pwd)
    out_name=$(basename "$FILE")
    if [ -n "$DIR" ]; then
        [ -d "$DIR" ] || die "cache directory $DIR does not exist"
        tar czf "$out_dir/$out_name.tmp" --exclude="$TEMP_PATTERN" -C "$DIR" .
        mv "$out_dir/$out_name.tmp" "$out_dir/$out_name"
    else
        docker_helper -v "$out_dir:/backup" "$IMAGE" \
            tar czf "/backup/$out_name" --exclude="$TEMP_PATTERN" -C /cache .
    fi
    local n
    n=$(tar tzf "$out_dir/$out_name" | grep -c '[^/]$' || true)
    [ "$n" -gt 0 ] || echo "cache.sh: warning: ${DIR:-volume $VOLUME} holds no cache entries (run make warmup first)" >&2
    echo "cache.sh: exported $n cache entries from ${DIR:-volume $VOLUME} to $FILE"
}

do_import() {
    need_target
    need_file
    [ -f "$FILE" ] || die "$FILE does not exist (run: make cache-export, then cache-copy)"
    check_archive
    if nginx_running; then
        die "nginx is running on ${DIR:-volume $VOLUME}: stop it first (entries imported while it runs are not seen until a restart)"
    fi
    local in_dir in_name
    in_dir=$(cd "$(dirname "$FILE")" && pwd)
    in_name=$(basename "$FILE")
    if [ -n "$DIR" ]; then
        local owner=${OWNER:-$HOST_OWNER}
        mkdir -p "$DIR"
        tar xzf "$in_dir/$in_name" --no-same-owner -C "$DIR"
        if [ "$(id -u)" = 0 ]; then
            chown -R "$owner" "$DIR"
        else
            echo "cache.sh: not root, files stay owned by $(id -un): nginx's worker must be that user" >&2
        fi
        find "$DIR" -type d -exec chmod 700 {} + && find "$DIR" -type f -exec chmod 600 {} +
    else
        local owner=${OWNER:-$DOCKER_OWNER}
        docker volume create "$VOLUME" >/dev/null
        docker_helper -v "$in_dir:/backup:ro" "$IMAGE" sh -c \
            "tar xzf '/backup/$in_name' -C /cache && chown -R '$owner' /cache"
    fi
    echo "cache.sh: imported $FILE into ${DIR:-volume $VOLUME}: $(count) cache entries; start nginx now"
}

do_copy() {
    need_file
    [ -n "$REMOTE" ] || die "copy needs --remote USER@HOST (REMOTE_HOST)"
    [ -n "$REMOTE_PATH" ] || die "copy needs --remote-path PATH (REMOTE_PATH)"
    [ -f "$FILE" ] || die "$FILE does not exist (run: make cache-export)"
    remote_ssh "$REMOTE" "mkdir -p '$REMOTE_PATH'"
    remote_scp "$FILE" "$REMOTE:$REMOTE_PATH/"
    echo "cache.sh: copied $FILE to $REMOTE:$REMOTE_PATH/"
}

do_remote_import() {
    need_target
    need_file
    if [ -z "$REMOTE" ] || [ -z "$REMOTE_PATH" ]; then
        die "remote-import needs --remote USER@HOST and --remote-path PATH"
    fi
    local args=(import --file "$REMOTE_PATH/$(basename "$FILE")")
    if [ -n "$DIR" ]; then args+=(--dir "$DIR"); else args+=(--volume "$VOLUME" --image "$IMAGE"); fi
    [ -z "$OWNER" ] || args+=(--owner "$OWNER")
    # This script itself runs on the remote host: nothing to install there but bash and tar.
    remote_ssh "$REMOTE" "bash -s -- $(printf '%q ' "${args[@]}")" <"$0"
}

# Delete the entries of some prompts while nginx runs: an entry's file starts with a header
# holding its cache key ("KEY: <route>:<prompt key>:<format>:<slot>"), and nginx treats a
# known key whose file is gone as a MISS, so the next request for that slot goes to comeapi,
# which answers it with a variant it serves (and warmup.sh fills it again).
do_purge() {
    need_target
    [ ${#KEYS[@]} -gt 0 ] || die "purge needs --key KEY (a prompt's cache key, 64 hex digits)"
    local key pattern="" listed n=0
    for key in "${KEYS[@]}"; do
        [[ $key =~ ^[0-9a-f]{64}$ ]] || die "--key $key is not a cache key (64 lowercase hex digits)"
        pattern="$pattern${pattern:+|}$key"
    done
    # The files of those keys (those with a dot are still being written), listed, then deleted.
    local find_keys="find . -type f ! -name '$TEMP_PATTERN' -exec grep -lE '^KEY: [^ ]*:($pattern):' {} +"
    if [ -n "$DIR" ]; then
        [ -d "$DIR" ] || die "cache directory $DIR does not exist"
        listed=$(cd "$DIR" && sh -c "$find_keys" || true)
        [ -z "$listed" ] || (cd "$DIR" && xargs rm -f <<<"$listed")
    else
        listed=$(docker_helper -w /cache "$IMAGE" sh -c \
            "$find_keys >/tmp/purge; cat /tmp/purge; xargs rm -f </tmp/purge")
    fi
    [ -z "$listed" ] || n=$(wc -l <<<"$listed" | tr -d ' ')
    echo "cache.sh: purged $n cache entries of ${#KEYS[@]} prompt(s) from ${DIR:-volume $VOLUME}"
}

case $CMD in
export) do_export ;;
purge) do_purge ;;
import) do_import ;;
copy) do_copy ;;
remote-import) do_remote_import ;;
count) need_target && count ;;
*) die "usage: cache.sh export|import|copy|remote-import|count|purge ... (see the top of $0)" ;;
esac

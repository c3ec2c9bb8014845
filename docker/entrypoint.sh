#!/usr/bin/env bash
# trimode container entrypoint: TRIMODE_* environment variables -> `trimode serve` flags.
#
#   TRIMODE_CONFIG             --config FILE            (a TOML preset, e.g. /app/configs/nemotron-labs-diffusion-8b.toml)
#   TRIMODE_MODEL              --model PATH             (a checkpoint directory, normally under /models)
#   TRIMODE_SERVED_MODEL_NAME  --served-model-name NAME
#   TRIMODE_LOG_LEVEL          --log-level LEVEL
#   TRIMODE_SHUTDOWN_TIMEOUT   --shutdown-timeout SECONDS
#   TRIMODE_API_KEY            read by `trimode serve` itself (kept off the command line, so `ps` never shows it)
#   TRIMODE_API_KEY_FILE       file holding the key (Docker/Kubernetes secrets); exported as TRIMODE_API_KEY
#   TRIMODE_EXTRA_ARGS         more flags, split on whitespace (e.g. "--engine.max_num_seqs 32")
#
# Flags from the environment come first and the container's arguments (CMD, or what follows the image name in
# `docker run`) after them, so an explicit argument wins. Arguments that do not start with '-' are run as a
# command instead (`docker run -it trimode:cpu bash`, `... trimode generate "Hello"`).
set -euo pipefail

if [[ $# -gt 0 && $1 != -* ]]; then
    exec "$@"
fi

if [[ -n ${TRIMODE_API_KEY_FILE:-} ]]; then
    if [[ ! -r $TRIMODE_API_KEY_FILE ]]; then
        echo "trimode-entrypoint: TRIMODE_API_KEY_FILE=$TRIMODE_API_KEY_FILE is not readable" >&2
        exit 2
    fi
    TRIMODE_API_KEY=$(tr -d '\r\n' <"$TRIMODE_API_KEY_FILE")
    export TRIMODE_API_KEY
fi
if [[ -z ${TRIMODE_API_KEY:-} ]]; then
    unset TRIMODE_API_KEY  # an empty key is "no key", not an invalid one
fi

flags=()
[[ -n ${TRIMODE_CONFIG:-} ]] && flags+=(--config "$TRIMODE_CONFIG")
[[ -n ${TRIMODE_MODEL:-} ]] && flags+=(--model "$TRIMODE_MODEL")
[[ -n ${TRIMODE_SERVED_MODEL_NAME:-} ]] && flags+=(--served-model-name "$TRIMODE_SERVED_MODEL_NAME")
[[ -n ${TRIMODE_LOG_LEVEL:-} ]] && flags+=(--log-level "$TRIMODE_LOG_LEVEL")
[[ -n ${TRIMODE_SHUTDOWN_TIMEOUT:-} ]] && flags+=(--shutdown-timeout "$TRIMODE_SHUTDOWN_TIMEOUT")
if [[ -n ${TRIMODE_EXTRA_ARGS:-} ]]; then
    read -r -a extra <<<"$TRIMODE_EXTRA_ARGS"
    flags+=("${extra[@]}")
fi

# exec: trimode becomes PID 1 and receives SIGTERM from `docker stop` / Kubernetes directly (graceful drain)
exec trimode serve "${flags[@]}" "$@"

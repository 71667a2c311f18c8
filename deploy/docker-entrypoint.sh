#!/bin/sh
# The container's PID 1: picks the model, then becomes `edgevl serve` (exec, so SIGTERM from
# `docker stop` reaches the server, which drains in-flight answers and exits 0).
set -eu
MOUNT=/models/qwen3-vl
if [ -z "${EDGEVL_MODEL:-}" ]; then
  # Docker creates an empty folder for a bind mount whose host path is missing: that is "no model".
  if [ -d "$MOUNT" ] && [ -n "$(ls -A "$MOUNT" 2>/dev/null)" ]; then
    export EDGEVL_MODEL="$MOUNT"
  else
    echo "edgevl: nothing mounted at $MOUNT: serving the demo model (random weights)" >&2
  fi
fi
exec edgevl serve "$@"

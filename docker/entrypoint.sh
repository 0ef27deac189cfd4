#!/bin/sh
# The image's entry point (under tini): TorchServe in the foreground, stopped cleanly on SIGTERM/SIGINT.
#   (no arguments)               serve $TS_CONFIG_FILE: every .mar in its model_store (load_models=all)
#   torchserve [--start] ARGS    serve with TorchServe's own arguments (KServe's ServingRuntime passes these)
#   anything else                run it (e.g. bash, python -m vision_attribution.clients.readiness)
# TorchServe's launcher does not pass signals on to its JVM, so a SIGTERM here runs `torchserve --stop`,
# which stops the frontend and its workers and waits for them, before the container exits.
set -eu
if [ "$#" -gt 0 ] && [ "$1" != torchserve ]; then
  exec "$@"
fi
[ "$#" -gt 0 ] && shift
# TorchServe refuses to start without its temp directory: create them (a Kubernetes emptyDir home is empty).
mkdir -p "${TMPDIR:-/tmp}" "${TEMP:-/tmp}" "${LOG_LOCATION:-logs}"
stopping=false
stop() {
  stopping=true
  torchserve --stop --foreground || true
}
trap stop TERM INT
torchserve --start --foreground --ncs "$@" &
server=$!
status=0
wait "$server" || status=$?
if [ "$stopping" = true ]; then  # the wait was cut short by the signal: the launcher's own exit status
  status=0
  wait "$server" || status=$?
fi
exit "$status"

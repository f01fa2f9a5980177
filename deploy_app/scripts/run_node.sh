#!/usr/bin/env bash
# Run the CT-FM DICOM node (`python -m deploy_app serve`, deploy_app/node) in the MAP image `make map` builds: the
# same image, base and wheelhouse as the MAP, its entrypoint passing `serve ...` / `status ...` to the node.
#
#   deploy_app/scripts/run_node.sh IMAGE SPOOL [MODELS] [-- SERVE_OPTIONS...]
#
# SPOOL (a writable host folder: instances, queue, results, logs) is mounted at /var/holoscan/spool and given to the
# node as --spool; the container runs as SPOOL's owner (chown it to the image's user, 1000:1000, or any other).  The
# models are the image's /opt/holoscan/models (HOLOSCAN_MODEL_PATH, the app's default -m), or MODELS mounted there in
# their place.  NODE_CONFIG=FILE mounts a TOML settings file read-only and passes it as --config; SERVE_OPTIONS go
# after it (flags override the file).  The node's DICOM port (--port / port) and its health port are the host's
# by default (--network host: nothing to map, the node binds where its settings say); NODE_NETWORK changes it, e.g.
# NODE_NETWORK="bridge -p 104:11112" publishes the container's 11112 as the host's 104 (both work with rootful
# podman, runc and cgroupfs here).  The container is named NODE_NAME (default ctfm-node) and removed when it exits;
# `podman stop ctfm-node` sends SIGTERM: the node stops receiving, puts its running study back in the queue and
# exits 0.  The app's CTFM_* settings set in the caller's environment are passed in (CTFM_BACKEND, CTFM_DEVICE, ...).
#
# As a service: run this script from a systemd unit (ExecStart=.../run_node.sh ...; ExecStop=podman stop NODE_NAME;
# Restart=on-failure), as deploy_app/node/ctfm-node.service runs the node on the host, or `podman generate systemd`
# / a Quadlet .container file; podman's own `--restart` needs podman's restart service and is not used here.
#
# podman needs, on this machine, runc and cgroupfs and explicit --ulimits, as run_map.sh: MAP_RUNTIME,
# MAP_CGROUP_MANAGER change the first two; MAP_PODMAN_OPTIONS adds options to `podman run`.
set -euo pipefail

usage() { echo "usage: run_node.sh IMAGE SPOOL [MODELS] [-- SERVE_OPTIONS...]" >&2; exit 2; }
[ $# -ge 2 ] || usage
image="$1" spool="$2"
shift 2
models=""
if [ $# -gt 0 ] && [ "$1" != "--" ]; then models="$1"; shift; fi
if [ $# -gt 0 ]; then [ "$1" = "--" ] || usage; shift; fi

[ -d "$spool" ] || { echo "run_node: SPOOL $spool: no such folder" >&2; exit 2; }
[ -z "$models" ] || [ -d "$models" ] || { echo "run_node: MODELS $models: no such folder" >&2; exit 2; }
[ -z "${NODE_CONFIG:-}" ] || [ -f "$NODE_CONFIG" ] || { echo "run_node: NODE_CONFIG $NODE_CONFIG: no such file" >&2; exit 2; }
spool="$(cd "$spool" && pwd)"

limit() { local hard; hard="$(ulimit -H "$1")"; [ "$hard" = unlimited ] || [ "$hard" -gt 32768 ] && hard=32768; echo "$hard:$hard"; }
read -r -a network <<<"${NODE_NETWORK:-host}"
options=(--rm --name "${NODE_NAME:-ctfm-node}" --network "${network[@]}"
         --ulimit "nofile=$(limit -n)" --ulimit "nproc=$(limit -u)"
         --ulimit stack=33554432:33554432
         --cap-drop all --security-opt no-new-privileges
         --user "$(stat -c %u:%g "$spool")"
         -v "$spool:/var/holoscan/spool")
[ -z "$models" ] || options+=(-v "$(cd "$models" && pwd):/opt/holoscan/models:ro")
node=(serve --spool /var/holoscan/spool)
if [ -n "${NODE_CONFIG:-}" ]; then
  options+=(-v "$(cd "$(dirname "$NODE_CONFIG")" && pwd)/$(basename "$NODE_CONFIG"):/etc/ctfm-node.toml:ro")
  node+=(--config /etc/ctfm-node.toml)
fi
for name in CTFM_SEG_ENCODING CTFM_TRIAGE_ACCEPT_PARTIAL CTFM_SKIP_CT_CHECK CTFM_NO_LARGEST_COMPONENT CTFM_SPACING \
            CTFM_NO_MEASUREMENTS_SR CTFM_DEVICE CTFM_BACKEND HOLOSCAN_LOG_LEVEL; do
  [ -z "${!name+set}" ] || options+=(-e "$name=${!name}")
done
read -r -a extra <<<"${MAP_PODMAN_OPTIONS:-}"
exec podman --runtime "${MAP_RUNTIME:-runc}" --cgroup-manager "${MAP_CGROUP_MANAGER:-cgroupfs}" run \
  "${options[@]}" "${extra[@]}" "$image" "${node[@]}" "$@"

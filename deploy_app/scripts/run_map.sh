#!/usr/bin/env bash
# Run the CT-FM MAP as MAP runners do (`monai-deploy run`): the input folder mounted read-only at
# /var/holoscan/input, the output folder at /var/holoscan/output, no network; the models from /opt/holoscan/models,
# or from MODELS mounted there in their place (e.g. the published weights a site brings:
# MODELS/<name>/config.json + model.safetensors).  The app's exit code is this script's (0 done, 3 input not
# acceptable, 4 model problem, 1 anything else; 2 a usage error of this script or the app; 125-127 podman's own).
#
#   deploy_app/scripts/run_map.sh IMAGE IN OUT [MODELS] [-- APP_OPTIONS...]
#
# The app's CTFM_* settings (README) set in the caller's environment are passed in, except those naming host paths
# (CTFM_CACHE, CTFM_SEG_WEIGHTS, ...).  The container runs as the owner of OUT, so that what it writes there is
# the owner's (`monai-deploy run` and `docker run --user` do the same with the caller's uid); the image's own user
# is holoscan (1000).  Without capabilities and without privilege escalation whoever it runs as.
#
# podman needs, on this machine, runc and cgroupfs (crun refuses: cgroups v1 hybrid) and explicit --ulimits (the
# defaults exceed the hard limits and cannot be raised): MAP_RUNTIME, MAP_CGROUP_MANAGER change the first two.
# MAP_PODMAN_OPTIONS adds options to `podman run` (e.g. --memory 8g --cpus 2).
set -euo pipefail

usage() { echo "usage: run_map.sh IMAGE IN OUT [MODELS] [-- APP_OPTIONS...]" >&2; exit 2; }
[ $# -ge 3 ] || usage
image="$1" input="$2" output="$3"
shift 3
models=""
if [ $# -gt 0 ] && [ "$1" != "--" ]; then models="$1"; shift; fi
if [ $# -gt 0 ]; then [ "$1" = "--" ] || usage; shift; fi

[ -d "$input" ] || { echo "run_map: IN $input: no such folder" >&2; exit 2; }
[ -z "$models" ] || [ -d "$models" ] || { echo "run_map: MODELS $models: no such folder" >&2; exit 2; }
mkdir -p "$output"
input="$(cd "$input" && pwd)" output="$(cd "$output" && pwd)"

limit() { local hard; hard="$(ulimit -H "$1")"; [ "$hard" = unlimited ] || [ "$hard" -gt 32768 ] && hard=32768; echo "$hard:$hard"; }
options=(--rm --network none
         --ulimit "nofile=$(limit -n)" --ulimit "nproc=$(limit -u)"
         --ulimit stack=33554432:33554432   # Holoscan asks for 32 MB of stack
         --cap-drop all --security-opt no-new-privileges
         --user "$(stat -c %u:%g "$output")"
         -v "$input:/var/holoscan/input:ro" -v "$output:/var/holoscan/output")
[ -z "$models" ] || options+=(-v "$(cd "$models" && pwd):/opt/holoscan/models:ro")
for name in CTFM_SEG_ENCODING CTFM_TRIAGE_ACCEPT_PARTIAL CTFM_SKIP_CT_CHECK CTFM_NO_LARGEST_COMPONENT CTFM_SPACING \
            CTFM_NO_MEASUREMENTS_SR CTFM_PACS_URL CTFM_DEVICE CTFM_BACKEND HOLOSCAN_LOG_LEVEL; do
  [ -z "${!name+set}" ] || options+=(-e "$name=${!name}")
done
read -r -a extra <<<"${MAP_PODMAN_OPTIONS:-}"
exec podman --runtime "${MAP_RUNTIME:-runc}" --cgroup-manager "${MAP_CGROUP_MANAGER:-cgroupfs}" run \
  "${options[@]}" "${extra[@]}" "$image" "$@"

#!/usr/bin/env bash
# Package the CT-FM application as a MONAI Application Package (MAP) with NVIDIA's packager, holoscan-cli 4.2.0
# (`monai-deploy package`): the second route, for a host with Docker.  The first route, build_map.sh (`make map`),
# builds a MAP with podman on a debootstrap Debian base and runs here; this one cannot run here.
#
# Needs a machine with Docker (with the buildx plugin and a running daemon) and network access to nvcr.io,
# NVIDIA's apt repository, GitHub and PyPI -- the packager pulls its base image (a CUDA runtime, Ubuntu 24.04,
# Python 3.12) and tools from there.
#
#   deploy_app/scripts/package_map.sh [MODELS_DIR] [TAG]
#
# MODELS_DIR holds one sub-folder per model, as the MAP expects (models/<name>/, the name is the checkpoint's name
# in the results): e.g. project-lighter--whole_body_segmentation/ (config.json + model.safetensors), or
# segmentation/ and triage/.  Default: the shipped demonstration checkpoint, as models/ctfm-mini-wholebody-seg/
# (not for clinical use).  The application folder is laid out by deploy_app/map/stage.py, as for build_map.sh:
# deploy_app with its entry point, the engine (with its bundled weights, by which a copy of a demonstration model is
# recognised), requirements.txt (the app's and the engine's dependencies), app.yaml.
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"          # deploy_app/
repo="$(cd "$here/.." && pwd)"
models="${1:-}"
tag="${2:-ctfm-seg-map:$(sed -n 's/^  version: *//p' "$here/app.yaml")}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

command -v docker >/dev/null || { echo "package_map: Docker is not installed; MAP packaging needs Docker with buildx (or use build_map.sh: podman)" >&2; exit 1; }
docker buildx version >/dev/null 2>&1 || { echo "package_map: the Docker buildx plugin is missing (or use build_map.sh: podman)" >&2; exit 1; }

# holoscan-cli 4.2.0 is the last release with MAP packaging (`monai-deploy package`); 4.3+ removed it.  It lives
# in its own virtual environment so that it cannot drag the application's Holoscan version along.
python3 -m venv "$work/packager"
"$work/packager/bin/pip" install -q "holoscan-cli==4.2.0" "holoscan-cu13==4.2.0" "monai-deploy-app-sdk==4.0.0" pyyaml

# The application folder the MAP runs (`python3 /opt/holoscan/app`) and the models folder.
"$work/packager/bin/python" "$here/map/stage.py" --out "$work/stage" ${models:+--models "$models"}
app="$work/stage/app"
cp -r "$work/stage/engine-src/ctfm_engine" "$app/ctfm_engine"
cp "$work/stage/deps/requirements.txt" "$app/requirements.txt"   # torch==2.13.0: PyPI's CUDA build on that base
cp "$work/stage/app.yaml" "$app/app.yaml"

"$work/packager/bin/monai-deploy" package "$app" \
  --config "$app/app.yaml" \
  --models "$work/stage/models" \
  --platform x86_64 \
  --tag "$tag" \
  --sdk monai-deploy --sdk-version 4.0.0

echo "built ${tag}; run it with holoscan-cli 4.2.0 (pip install holoscan-cli==4.2.0):"
echo "  monai-deploy run ${tag%%:*}-x64-workstation-dgpu-linux-amd64:${tag##*:} -i DICOM_DIR -o OUT_DIR"

#!/usr/bin/env bash
# Package the CT-FM application as a MONAI Application Package (MAP): an OCI image built with Docker buildx.
#
# Needs a machine with Docker (with the buildx plugin and a running daemon) and network access to nvcr.io,
# NVIDIA's apt repository, GitHub and PyPI -- the packager pulls its base image and tools from there.  It cannot
# run on the project's CI machines (no Docker, no network): there, tests run the same app with
# `python -m deploy_app -i -o -m` instead.
#
#   deploy_app/scripts/package_map.sh [MODELS_DIR] [TAG]
#
# MODELS_DIR holds one sub-folder per model, as the MAP expects (models/<name>/): `segmentation/` (a CT-FM
# segmentation checkpoint in the Hugging Face layout) and optionally `triage/`.  Default: the shipped
# demonstration checkpoint (not for clinical use).
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"          # deploy_app/
repo="$(cd "$here/.." && pwd)"
models="${1:-}"
tag="${2:-ctfm-ct-seg:0.1.0}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

command -v docker >/dev/null || { echo "package_map: Docker is not installed; MAP packaging needs Docker with buildx" >&2; exit 1; }
docker buildx version >/dev/null 2>&1 || { echo "package_map: the Docker buildx plugin is missing" >&2; exit 1; }

# holoscan-cli 4.2.0 is the last release with MAP packaging (`monai-deploy package`); 4.3+ removed it.  It lives
# in its own virtual environment so that it cannot drag the application's Holoscan version along.
python3 -m venv "$work/packager"
"$work/packager/bin/pip" install -q "holoscan-cli==4.2.0" "holoscan-cu13==4.2.0" "monai-deploy-app-sdk==4.0.0"

# The application folder the MAP runs: deploy_app + the engine (with its bundled label tables) + requirements.
app="$work/app"
mkdir -p "$app"
cp "$here/__main__.py" "$here/app.yaml" "$here/requirements.txt" "$app/"   # `python3 /opt/holoscan/app`
mkdir -p "$app/deploy_app" && cp "$here"/*.py "$here/selection_rules.json" "$app/deploy_app/"
cp -r "$repo/ctfm_engine" "$app/ctfm_engine"
rm -rf "$app/ctfm_engine/weights"                  # models travel in MODELS_DIR, not inside the code
find "$app" -name __pycache__ -prune -exec rm -rf {} +

if [ -z "$models" ]; then
  models="$work/models"
  mkdir -p "$models"
  cp -r "$repo/ctfm_engine/weights/ctfm-mini-wholebody-seg" "$models/segmentation"
fi

"$work/packager/bin/monai-deploy" package "$app" \
  --config "$app/app.yaml" \
  --models "$models" \
  --platform x86_64 \
  --tag "$tag" \
  --sdk monai-deploy --sdk-version 4.0.0

echo "built $tag; run it with: $work/packager/bin/monai-deploy run ${tag}-x64-workstation-dgpu-linux-amd64 -i DICOM_DIR -o OUT_DIR"

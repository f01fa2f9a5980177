#!/usr/bin/env bash
# Build the CT-FM MONAI Application Package (MAP) here: one OCI image laid out as the MAP specification says, made
# with podman/buildah from a Debian base that debootstrap makes -- no Docker, no registry, no network inside the
# build (`--network none`).  This is `make map`; the image tag is the last line printed.
#
#   deploy_app/scripts/build_map.sh [TAG]          default TAG: localhost/ctfm-seg-map:<app.yaml version>
#
# Steps, each cached under build/map/ (ignored by git), so that a second build only redoes what changed:
#   1. base     debootstrap --variant=minbase bookworm (+ python3 3.11, python3-venv) -> base/debian-bookworm-
#               minbase.tar -> `podman import` -> localhost/ctfm-map-base:bookworm (kept in podman's storage)
#   2. stage    deploy_app/map/stage.py lays out <variant>/stage/: the app, the engine's source, the models, the
#               manifests (app.json, pkg.json from app.yaml), the entrypoint, requirements + constraints
#   3. wheels   <variant>/wheelhouse/: `pip wheel` of deploy_app/requirements.txt, the engine's dependencies and
#               torch, pinned by the constraints (pip freeze of .venv-deploy: the image runs what the tests ran);
#               rebuilt only when those inputs change (their hash is in wheelhouse/.key)
#   4. engine   the engine's wheel (reproducible: SOURCE_DATE_EPOCH), so an unchanged engine keeps its layer
#   5. image    podman build -f deploy_app/map/Containerfile: dependency layer first, then models, engine, app
#
# Settings (environment):
#   MAP_VARIANT=cpu|gpu  gpu: CUDA PyTorch (PyPI's torch==2.13.0, not the +cpu wheel, with its CUDA 13 libraries) and
#                        MAP_ONNXRUNTIME (default onnxruntime-gpu==1.31.1, the newest on PyPI) in place of onnxruntime,
#                        no constraints from .venv-deploy, pkg.json asks for 1 GPU; tag ctfm-seg-map-gpu
#   MAP_BASE_IMAGE       another base with Python 3.11 and its venv module (e.g. a CUDA runtime image with Python
#                        3.11) instead of the debootstrap one
#   MAP_TORCH            the torch requirement (cpu default torch==2.13.0: the CPU wheel pip finds on disk here)
#   MAP_PIP_OPTIONS      more `pip wheel` options (e.g. --extra-index-url https://download.pytorch.org/whl/cu128)
#   MAP_MODELS           a folder of named model folders to ship instead of the demonstration model
#   MAP_PYTHON           the Python 3.11 whose pip makes the wheelhouse (default .venv-deploy/bin/python)
#   MAP_DEBIAN_MIRROR    the Debian mirror debootstrap uses (default http://deb.debian.org/debian)
#   MAP_RUNTIME, MAP_CGROUP_MANAGER   podman's --runtime / --cgroup-manager (default runc / cgroupfs: this machine's
#                        cgroups v1 hybrid needs them; crun refuses)
set -euo pipefail

repo="$(cd "$(dirname "$0")/../.." && pwd)"
variant="${MAP_VARIANT:-cpu}"
case "$variant" in cpu|gpu) ;; *) echo "build_map: MAP_VARIANT=$variant: choose cpu or gpu" >&2; exit 2 ;; esac
cache="$repo/build/map"
context="$cache/$variant"
stage="$context/stage"
wheelhouse="$context/wheelhouse"
python="${MAP_PYTHON:-$repo/.venv-deploy/bin/python}"
mirror="${MAP_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
podman=(podman --runtime "${MAP_RUNTIME:-runc}" --cgroup-manager "${MAP_CGROUP_MANAGER:-cgroupfs}")
started=$SECONDS

fail() { echo "build_map: $*" >&2; exit 1; }
# runc sets every rlimit it is given and cannot raise one above the caller's hard limit (podman's defaults are above
# this machine's; podman gives conmon at most 32768 processes): the caller's hard limits, at most 32768.
limit() { local hard; hard="$(ulimit -H "$1")"; [ "$hard" = unlimited ] || [ "$hard" -gt 32768 ] && hard=32768; echo "$hard:$hard"; }
step() { echo "build_map: $* ($((SECONDS - started)) s)" >&2; }

command -v podman >/dev/null || fail "podman is not installed (Debian: apt-get install podman buildah runc debootstrap)"
[ -x "$python" ] || fail "$python is missing: the wheelhouse is made by the deploy environment's pip (make .venv-deploy/.installed)"
"$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || fail "$python is not Python 3.11: the base's Python is 3.11 (Debian bookworm), the wheels must be cp311"
mkdir -p "$context"

# 1. The base image.
if [ -n "${MAP_BASE_IMAGE:-}" ]; then
  base="$MAP_BASE_IMAGE"
else
  base="localhost/ctfm-map-base:bookworm"
  if ! "${podman[@]}" image exists "$base"; then
    tarball="$cache/base/debian-bookworm-minbase.tar"
    if [ ! -s "$tarball" ]; then
      command -v debootstrap >/dev/null || fail "debootstrap is not installed (Debian: apt-get install debootstrap)"
      [ "$(id -u)" = 0 ] || fail "debootstrap makes the base as root (once; then base/ holds it)"
      rootfs="$cache/base/rootfs"
      rm -rf "$rootfs" && mkdir -p "$rootfs"
      step "debootstrap bookworm from $mirror"
      debootstrap --variant=minbase --include=python3,python3-venv bookworm "$rootfs" "$mirror" \
        >"$cache/base/debootstrap.log" 2>&1 || { tail -20 "$cache/base/debootstrap.log" >&2; fail "debootstrap failed"; }
      rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
      tar --numeric-owner -C "$rootfs" -cf "$tarball.partial" . && mv "$tarball.partial" "$tarball"
      rm -rf "$rootfs"
    fi
    step "importing $tarball as $base"
    "${podman[@]}" import --change 'CMD ["/bin/bash"]' "$tarball" "$base" >/dev/null
  fi
fi

# 2. The build context.
constraints="$context/constraints.txt"
: >"$constraints"
stage_options=()
if [ "$variant" = cpu ]; then
  torch="${MAP_TORCH:-torch==2.13.0}"
  "$python" -m pip freeze --exclude-editable | grep -v -e '^#' -e '^-e ' -e '^ctfm-engine' >"$constraints"
else
  torch="${MAP_TORCH:-torch==2.13.0,!=2.13.0+cpu}"
  stage_options=(--swap "onnxruntime=${MAP_ONNXRUNTIME:-onnxruntime-gpu==1.31.1}" --gpus 1)
fi
"$python" "$repo/deploy_app/map/stage.py" --out "$stage" --constraints "$constraints" --torch "$torch" \
  ${MAP_MODELS:+--models "$MAP_MODELS"} "${stage_options[@]}"
printf '%s\n' wheelhouse.partial stage/engine-src >"$context/.containerignore"

# 3. The wheelhouse.
read -r -a pip_options <<<"${MAP_PIP_OPTIONS:-}"
key="$(cat "$stage/deps/requirements.txt" "$stage/deps/constraints.txt" <(echo "$variant ${MAP_PIP_OPTIONS:-}") \
       | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$wheelhouse/.key" 2>/dev/null)" != "$key" ]; then
  step "making the wheelhouse (pip wheel of $(grep -c . "$stage/deps/requirements.txt") requirements)"
  rm -rf "$wheelhouse" "$wheelhouse.partial"
  "$python" -m pip wheel -q --wheel-dir "$wheelhouse.partial" -r "$stage/deps/requirements.txt" \
    -c "$stage/deps/constraints.txt" "${pip_options[@]}"
  (cd "$wheelhouse.partial" && sha256sum -- *.whl) >"$wheelhouse.partial/.lock"
  echo "$key" >"$wheelhouse.partial/.key"
  mv "$wheelhouse.partial" "$wheelhouse"
fi
cp "$wheelhouse/.lock" "$stage/deps/wheelhouse.lock"

# 4. The engine's wheel.
step "building the engine's wheel"
SOURCE_DATE_EPOCH=315532800 "$python" -m pip wheel -q --no-deps --no-build-isolation \
  --wheel-dir "$stage/engine" "$stage/engine-src" >/dev/null
(cd "$stage/engine" && sha256sum -- ctfm_engine-*.whl) >"$stage/engine/engine.sha256"

# 5. The image.
version="$(cat "$stage/version")"
suffix=""; [ "$variant" = gpu ] && suffix="-gpu"
tag="${1:-localhost/ctfm-seg-map$suffix:$version}"
build_args=()
while IFS= read -r line; do build_args+=(--build-arg "$line"); done <"$stage/build-args.txt"
previous="$("${podman[@]}" image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)"
step "podman build $tag"
"${podman[@]}" build --network none --layers --pull=missing \
  --ulimit "nofile=$(limit -n)" --ulimit "nproc=$(limit -u)" \
  --build-arg BASE_IMAGE="$base" --build-arg MAP_VARIANT="$variant" "${build_args[@]}" \
  -f "$repo/deploy_app/map/Containerfile" -t "$tag" "$context" >&2
built="$("${podman[@]}" image inspect --format '{{.Id}}' "$tag")"
if [ -n "$previous" ] && [ "$previous" != "$built" ]; then
  "${podman[@]}" rmi "$previous" >/dev/null 2>&1 || true  # the replaced image; layers the new one shares stay
fi
size="$("${podman[@]}" image inspect --format '{{.Size}}' "$tag")"
step "built $tag: $((size / 1000000)) MB"
echo "$tag"

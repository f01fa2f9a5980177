#!/bin/sh
# Run the module's self-test (CTFMTest in CTFM.py) in a real 3D Slicer, without the main window:
#
#     SlicerCTFM/Testing/run_selftest.sh /path/to/Slicer            # e.g. ~/Slicer-5.12.0-linux-amd64/Slicer
#
# This is what CMake's slicer_add_python_unittest registers for an extension build, run from this checkout instead
# (no build needed: the module is scripted).  The inference parts skip themselves when the CT-FM packages or the
# bundled weights are missing (Slicer's testing mode never installs packages); set CTFM_TRIAGE_WEIGHTS to a triage
# checkpoint folder to include triage.  Linux without a display: prefix with `xvfb-run -a`.
# Not run on the machines this project is built on: Slicer cannot be installed there (see SlicerCTFM/README.md).
set -eu
slicer=${1:?usage: $0 /path/to/Slicer}
module_dir=$(cd "$(dirname "$0")/.." && pwd)
exec "$slicer" --no-splash --no-main-window --testing --disable-cli-modules \
  --additional-module-paths "$module_dir" \
  --python-code "import slicer.testing; slicer.testing.runUnitTest(['$module_dir'], 'CTFM')"

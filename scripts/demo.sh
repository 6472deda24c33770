#!/usr/bin/env bash
# Set everything up and run the demo manifest end to end on an embedded local Ray.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
start=$(date +%s)
.venv/bin/convscope run manifests/demo.yaml "$@"
echo "demo finished in $(( $(date +%s) - start ))s; results in $(pwd)/runs/demo (run.json, one folder per analysis; images in <analysis>/_shards/)"

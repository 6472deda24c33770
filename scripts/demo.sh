#!/usr/bin/env bash
# Set everything up, run the demo manifest end to end on an embedded local Ray, build its report.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
start=$(date +%s)
.venv/bin/convscope run manifests/demo.yaml "$@"
out=runs/demo
args=("$@")
for i in "${!args[@]}"; do
    case "${args[$i]}" in
        --output|-o) out="${args[$((i + 1))]}" ;;
        --output=*) out="${args[$i]#--output=}" ;;
    esac
done
.venv/bin/convscope report "$out"
# The same CNN through its training (Zeiler & Fergus Fig. 4): the states its training kept after epochs 1, 2 and 8.
.venv/bin/convscope run manifests/demo-checkpoints.yaml
.venv/bin/convscope report runs/demo-checkpoints
echo "demo finished in $(( $(date +%s) - start ))s; results in $out (run.json, one folder per analysis;" \
     "images in <analysis>/_shards/); open $out/report/index.html, and runs/demo-checkpoints/report/index.html" \
     "for its evolution through training"

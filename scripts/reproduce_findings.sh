#!/usr/bin/env bash
# Reproduce docs/findings.md: run every study in configs/studies/*.yaml (not gpu/) as a resumable sweep, then
# copy each study's report (summary.md, CSVs, figures) to docs/findings/<study>/.
#
#   bash scripts/reproduce_findings.sh                 # all studies, 2 workers (one per core)
#   bash scripts/reproduce_findings.sh santurkar_vgg   # only the named studies
#   WORKERS=4 STORAGE=postgresql://me@db/optuna bash scripts/reproduce_findings.sh
#
# Re-running continues: finished trials are never repeated (the sweep is an Optuna study in STORAGE, default
# sqlite:///lightning_logs/optuna.db), interrupted trials resume from their last.ckpt. Run from the
# repository root with the project installed (pip install -e .); the studies read ../shared/data.
set -euo pipefail
cd "$(dirname "$0")/.."
workers=${WORKERS:-2}
storage_args=()
[ -n "${STORAGE:-}" ] && storage_args=(--storage "$STORAGE")
if [ $# -gt 0 ]; then
  specs=(); for s in "$@"; do specs+=("configs/studies/$s.yaml"); done
else
  specs=(configs/studies/*.yaml)
fi
for spec in "${specs[@]}"; do
  study=$(basename "$spec" .yaml)
  echo "== $study ($spec)"
  normablate sweep --config "$spec" --workers "$workers" "${storage_args[@]}"
  mkdir -p "docs/findings/$study"
  normablate report --study "$study" "${storage_args[@]}" --out "docs/findings/$study"
done

#!/usr/bin/env bash
# GPU smoke test: one report on what one GPU does with this project (see bench/gpu_smoke.py for the sections).
#
#   bash bench/gpu_smoke.sh [--dry-run] [--report PATH] [--work DIR] [--budget-s S] [--sections NAME ...]
#
# The report goes to --report, else $OUT/gpu_smoke.md when $OUT is set, else bench/_work/gpu_smoke/gpu_smoke.md.
# Generated data and runs go to --work (default bench/_work/gpu_smoke), never next to the report.
# The whole run is capped at 9 minutes (sections that would start after --budget-s, default 470 s, are
# skipped and the report says so). --dry-run runs every section on CPU with tiny sizes (the tests do).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
report=""
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --report) report="$2"; shift 2 ;;
    --report=*) report="${1#--report=}"; shift ;;
    -h|--help) sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) args+=("$1"); shift ;;
  esac
done
if [[ -z "$report" ]]; then
  if [[ -n "${OUT:-}" ]]; then report="$OUT/gpu_smoke.md"; else report="$root/bench/_work/gpu_smoke/gpu_smoke.md"; fi
fi

# This checkout's code, whatever `state` is installed; no W&B, no progress bars.
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE=disabled TQDM_DISABLE=1 PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
cd "$root"
exec timeout --signal=TERM --kill-after=20 540 "${PYTHON:-python}" "$here/gpu_smoke.py" --report "$report" ${args[@]+"${args[@]}"}

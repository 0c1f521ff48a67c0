#!/usr/bin/env bash
# Run rows of the repro/ specs (the accelerator rows, on a GPU or TPU machine) one at a
# time within a time budget, keeping whatever finished.
#
#   scripts/accelerator_rows.sh SECONDS OUT SPEC/ROW [SPEC/ROW ...]
#
# Each row is `python -m kipnb.run --repro SPEC --rows ROW -o OUT --keep-going`, so
# results/SPEC.{json,md} are written as usual (a spec's other rows are kept). A row is
# started only while at least MIN_LEFT seconds (default 30) of the budget are left, and a
# row still running when the budget ends is interrupted (its notebook's checkpoints stay
# in OUT: the same call later resumes it). After each row the command in AFTER_ROW, if
# set, runs (to copy results off a machine that may be taken back). Bring the results
# home with `python -m kipnb.repro merge results/SPEC.json ...` in your checkout.
#
# Environment: PYTHON (default python3); RUN_ARGS, more arguments for kipnb.run (such as
# "--results DIR --notebook-dir DIR", split on spaces). Set here: MPLBACKEND=agg, and
# XLA_PYTHON_CLIENT_PREALLOCATE=false, because the runner and each notebook's kernel are
# separate processes that would otherwise each claim 75 % of the accelerator's memory.
#
# Example (9 minutes):
#   scripts/accelerator_rows.sh 540 build/repro-accel ls_fashion/ls_conv_ipc1 \
#       kip_fashion/kip_conv_ipc1
set -u
if [ $# -lt 3 ]; then
  echo "usage: $0 SECONDS OUT SPEC/ROW [SPEC/ROW ...]" >&2
  exit 2
fi
budget=$1
out=$2
shift 2
py=${PYTHON:-python3}
export MPLBACKEND=agg XLA_PYTHON_CLIENT_PREALLOCATE=false
start=$(date +%s)
failed=0
for item in "$@"; do
  spec=${item%/*}
  row=${item##*/}
  if [ "$spec" = "$item" ] || [ -z "$row" ]; then
    echo "[accelerator_rows] $item: not SPEC/ROW" >&2
    failed=1
    continue
  fi
  left=$((budget - ($(date +%s) - start)))
  if [ "$left" -lt "${MIN_LEFT:-30}" ]; then
    echo "[accelerator_rows] $item: not started, ${left} s of the budget left"
    continue
  fi
  echo "[accelerator_rows] $item: start (${left} s left)"
  t0=$(date +%s)
  timeout --signal=INT --kill-after=20 "$left" \
    "$py" -m kipnb.run --repro "$spec" --rows "$row" -o "$out" --keep-going ${RUN_ARGS:-}
  rc=$?
  [ "$rc" -eq 0 ] || failed=1
  echo "[accelerator_rows] $item: exit $rc in $(($(date +%s) - t0)) s" \
    "$([ "$rc" -eq 124 ] && echo '(interrupted at the end of the budget)')"
  if [ -n "${AFTER_ROW:-}" ]; then
    bash -c "$AFTER_ROW"
  fi
done
exit "$failed"

#!/usr/bin/env bash
# By-hand check that PyTorch's real torchrun starts dtrain (needs `pip install torch`; CI has
# no torch). Build first: `cargo build --release`. Usage: scripts/torchrun_check.sh
# (DTRAIN=/path/to/dtrain to test another binary). Prints PASS/FAIL per check and exits 1 if
# any check failed.
#
# Checks, each ending with both ranks' parameter hash equal to that of the same job started
# by `dtrain launch` (the reference):
#   1. torchrun --standalone --nproc-per-node 2
#   2. torchrun --nnodes 1 --nproc-per-node 2 --rdzv-backend c10d
#   3. torchrun --max-restarts 1, rank 1 failing in attempt 0: attempt 1 meets under new keys
#      and (TORCHELASTIC_RESTART_COUNT > 0 means --resume auto) starts fresh, no checkpoint yet
#   4. --max-restarts 1 with periodic checkpoints, rank 1 killed -9 mid-run in attempt 0:
#      attempt 1 resumes from the last checkpoint and ends bit-identical to an uninterrupted
#      run
#   5. a rank failing with a dtrain error: torchrun's failure summary quotes dtrain's message
#      (TORCHELASTIC_ERROR_FILE) instead of `error_file: <N/A>`
set -uo pipefail
cd "$(dirname "$0")/.."
DTRAIN=${DTRAIN:-$PWD/target/release/dtrain}
[ -x "$DTRAIN" ] || { echo "no dtrain binary at $DTRAIN (cargo build --release)"; exit 2; }
command -v torchrun >/dev/null || { echo "torchrun not found (pip install torch)"; exit 2; }
unset RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT DTRAIN_AUTH_TOKEN
WORK=$(mktemp -d /tmp/dtrain-torchrun-check.XXXXXX)
if [ -n "${TORCHRUN_CHECK_KEEP:-}" ]; then echo "logs kept in $WORK"; else trap 'rm -rf "$WORK"' EXIT; fi
# The issue's command, with a tiny model and test set so each run takes seconds.
JOB=(--mode ddp --dataset synthetic --max-iters 3 --model "8,M,16,M" --synthetic-test 256
     --batch-size 16 --threads 1 --no-progress)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
hashes() { grep -o 'Parameter hash: 0x[0-9a-f]*' "$1" | awk '{print $3}'; }
failures=0
report() { # name, ok(0/1), log
  if [ "$2" = 0 ]; then echo "PASS $1"; else
    echo "FAIL $1"
    echo "  dtrain's errors:"; grep -h "dtrain: error\|dtrain launch: error" "$3" | sort -u | sed 's/^/  | /'
    echo "  torchrun's summary:"; grep -h "^  rank  \|^  error_file:\|^  traceback :" "$3" | sed 's/^/  | /'
    failures=$((failures + 1)); fi
}
# expect_reference LOG COMMAND...: runs it (bounded); 0 iff it exits 0 and both ranks print the
# reference hash.
expect_reference() {
  local log=$1; shift
  timeout 300 "$@" >"$log" 2>&1 || return 1
  local got; got=$(hashes "$log" | sort | uniq -c | awk '{print $1, $2}')
  [ "$got" = "2 $REFERENCE" ]
}

echo "dtrain: $DTRAIN"
echo "torch: $(python3 -c 'import torch; print(torch.__version__)' 2>/dev/null)"
"$DTRAIN" launch --nproc-per-node 2 "${JOB[@]}" >"$WORK/ref.log" 2>&1
REFERENCE=$(hashes "$WORK/ref.log" | sort -u)
if [ "$(hashes "$WORK/ref.log" | wc -l)" != 2 ] || [ "$(echo "$REFERENCE" | wc -l)" != 1 ]; then
  echo "FAIL reference run (dtrain launch):"; tail -n 20 "$WORK/ref.log"; exit 1
fi
echo "reference hash (dtrain launch --nproc-per-node 2): $REFERENCE"

expect_reference "$WORK/1.log" torchrun --standalone --nproc-per-node 2 --no-python "$DTRAIN" "${JOB[@]}"
report "1 torchrun --standalone" $? "$WORK/1.log"

expect_reference "$WORK/2.log" torchrun --nnodes 1 --nproc-per-node 2 --rdzv-backend c10d \
  --rdzv-endpoint "127.0.0.1:$(free_port)" --no-python "$DTRAIN" "${JOB[@]}"
report "2 torchrun --nnodes 1 --rdzv-backend c10d" $? "$WORK/2.log"

# A wrapper that fails rank 1 of attempt 0 before dtrain starts.
cat >"$WORK/fail_first.sh" <<'EOF'
#!/bin/sh
if [ "$TORCHELASTIC_RESTART_COUNT" = 0 ] && [ "$RANK" = 1 ]; then
  echo "rank 1 fails attempt 0 on purpose"; exit 1
fi
exec "$@"
EOF
chmod +x "$WORK/fail_first.sh"
expect_reference "$WORK/3.log" torchrun --standalone --nproc-per-node 2 --max-restarts 1 \
  --no-python "$WORK/fail_first.sh" "$DTRAIN" "${JOB[@]}" --save-checkpoint "$WORK/3.ckpt"
ok=$?
grep -q "fails attempt 0 on purpose" "$WORK/3.log" || ok=1
report "3 torchrun --max-restarts 1 (restart meets under attempt_1 keys)" $ok "$WORK/3.log"

LONG=(--mode ddp --dataset synthetic --max-iters 200 --model "8,M,16,M" --synthetic-test 256
      --batch-size 16 --threads 1 --no-progress --checkpoint-every 20)
"$DTRAIN" launch --nproc-per-node 2 "${LONG[@]}" --save-checkpoint "$WORK/ref4.ckpt" \
  >"$WORK/ref4.log" 2>&1
REFERENCE_SAVED=$REFERENCE
REFERENCE=$(hashes "$WORK/ref4.log" | sort -u)
if [ "$(hashes "$WORK/ref4.log" | wc -l)" != 2 ] || [ "$(echo "$REFERENCE" | wc -l)" != 1 ]; then
  echo "FAIL reference run of check 4 (dtrain launch):"; tail -n 20 "$WORK/ref4.log"; exit 1
fi
echo "reference hash of check 4 (200 iterations, uninterrupted): $REFERENCE"
# Attempt 0: rank 1 is killed -9 shortly after the first periodic checkpoint exists.
cat >"$WORK/kill_first.sh" <<EOF
#!/bin/sh
if [ "\$TORCHELASTIC_RESTART_COUNT" = 0 ] && [ "\$RANK" = 1 ]; then
  "\$@" & child=\$!
  while [ ! -e "$WORK/4.ckpt" ]; do sleep 0.05; done
  sleep 0.2; kill -9 \$child; echo "killed rank 1 (pid \$child) in attempt 0"; exit 137
fi
exec "\$@"
EOF
chmod +x "$WORK/kill_first.sh"
expect_reference "$WORK/4.log" torchrun --standalone --nproc-per-node 2 --max-restarts 1 \
  --no-python "$WORK/kill_first.sh" "$DTRAIN" "${LONG[@]}" --save-checkpoint "$WORK/4.ckpt"
ok=$?
grep -q "killed rank 1" "$WORK/4.log" || ok=1
# Attempt 1 resumed mid-run from a periodic checkpoint, not from the end-of-run one.
grep -q "restart 1: resuming from .* (iteration [0-9]*)" "$WORK/4.log" || ok=1
grep -q "resuming from .*(iteration 200)" "$WORK/4.log" && ok=1
grep -h "killed rank 1\|resuming from\|failed (exitcode" "$WORK/4.log" | sed 's/^/  | /'
report "4 torchrun --max-restarts 1, kill -9 mid-run, resume ends bit-identical" $ok "$WORK/4.log"
REFERENCE=$REFERENCE_SAVED

# Rank 1 asks for another learning rate: a configuration mismatch, a dtrain error on both.
cat >"$WORK/mismatch.sh" <<'EOF'
#!/bin/sh
if [ "$RANK" = 1 ]; then exec "$@" --lr 0.2; fi
exec "$@"
EOF
chmod +x "$WORK/mismatch.sh"
timeout 300 torchrun --standalone --nproc-per-node 2 --no-python "$WORK/mismatch.sh" "$DTRAIN" \
  "${JOB[@]}" --timeout 20 --connect-timeout 20 >"$WORK/5.log" 2>&1
rc=$?
ok=0
[ $rc = 0 ] && ok=1 # it must fail
grep -q "traceback : dtrain: error:" "$WORK/5.log" || ok=1
grep -q "error_file: <N/A>" "$WORK/5.log" && ok=1
grep -h "^  rank  \|^  exitcode\|^  error_file:\|^  traceback :" "$WORK/5.log" | sed 's/^/  | /'
report "5 torchrun failure summary shows dtrain's error (TORCHELASTIC_ERROR_FILE)" $ok "$WORK/5.log"

echo "$failures check(s) failed or not run"
[ "$failures" = 0 ]

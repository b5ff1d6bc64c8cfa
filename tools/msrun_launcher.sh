#!/bin/bash
# Launch a distributed MindSpore / MindFormers job with msrun, with MindFormers' msrun_launcher.sh
# argument forms and defaults:
#
#   msrun_launcher.sh "<command>"                        8 local workers
#   msrun_launcher.sh "<command>" WORKER_NUM             WORKER_NUM local workers
#   msrun_launcher.sh "<command>" WORKER_NUM MASTER_PORT LOG_DIR JOIN CLUSTER_TIME_OUT
#   msrun_launcher.sh "<command>" WORKER_NUM LOCAL_WORKER MASTER_ADDR MASTER_PORT NODE_RANK \
#                     LOG_DIR JOIN CLUSTER_TIME_OUT      (multi-node: run once per node)
#
# Defaults: WORKER_NUM 8, LOCAL_WORKER 8, MASTER_ADDR 127.0.0.1, MASTER_PORT 8118, NODE_RANK 0,
# LOG_DIR output/msrun_log, JOIN False, CLUSTER_TIME_OUT 7200. A command starting with a .py file
# runs with python (msrun's own convention); the repository root is put on PYTHONPATH, so
# "tools/run_mindformer.py --config ..." works from a source checkout. MF_LOG_SUFFIX appends a
# suffix to the log directories; MSRUN (environment) names the msrun executable to use.
# Worker logs: LOG_DIR/worker_<rank>.log; scheduler: LOG_DIR/scheduler.log.
#
# The launcher always waits for the workers (msrun --join=True) and exits non-zero when any worker
# (or msrun) fails, printing the last error lines of each failed worker's log. JOIN chooses what the
# console shows meanwhile: True, msrun's output with every worker's log; False (default), msrun's
# output goes to LOG_DIR/msrun_console.log and only the result is printed. A MASTER_PORT that is
# already in use where this node would start the scheduler (another job's) is refused before msrun runs.

usage() {
  cat >&2 <<'EOF'
Usage: msrun_launcher.sh "<command>"                                   (8 local workers)
       msrun_launcher.sh "<command>" WORKER_NUM                        (WORKER_NUM local workers)
       msrun_launcher.sh "<command>" WORKER_NUM MASTER_PORT LOG_DIR JOIN CLUSTER_TIME_OUT
       msrun_launcher.sh "<command>" WORKER_NUM LOCAL_WORKER MASTER_ADDR MASTER_PORT NODE_RANK LOG_DIR JOIN CLUSTER_TIME_OUT
EOF
}

fail() {
  echo "msrun_launcher.sh: error: $*" >&2
  exit 1
}

if [ $# -ne 1 ] && [ $# -ne 2 ] && [ $# -ne 6 ] && [ $# -ne 9 ]; then
  echo "msrun_launcher.sh: error: expected 1, 2, 6 or 9 arguments, got $#" >&2
  usage
  exit 1
fi

COMMAND=$1
[ -n "$COMMAND" ] || fail "the command (first argument) is empty"
# Upstream MindFormers' pages run its root-level run_mindformer.py; this project's lives in tools/.
SCRIPT=${COMMAND%% *}
if [[ $SCRIPT == *.py && $SCRIPT != */* && ! -f $SCRIPT ]]; then
  TOOLS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  if [ -f "$TOOLS_DIR/$(basename "$SCRIPT")" ]; then
    echo "msrun_launcher.sh: no $SCRIPT here; this project's is tools/$(basename "$SCRIPT"): running that"
    COMMAND="$TOOLS_DIR/$(basename "$SCRIPT")${COMMAND#"$SCRIPT"}"
  fi
fi

WORKER_NUM=8
LOCAL_WORKER=8
MASTER_ADDR="127.0.0.1"
MASTER_PORT=8118
NODE_RANK=0
LOG_DIR="output/msrun_log"
JOIN="False"
CLUSTER_TIME_OUT=7200

case $# in
  1)
    echo "msrun_launcher.sh: no worker count given: running on the default 8 local workers"
    ;;
  2)
    WORKER_NUM=$2
    LOCAL_WORKER=$2
    ;;
  6)
    WORKER_NUM=$2
    LOCAL_WORKER=$2
    MASTER_PORT=$3
    LOG_DIR=$4
    JOIN=$5
    CLUSTER_TIME_OUT=$6
    ;;
  9)
    WORKER_NUM=$2
    LOCAL_WORKER=$3
    MASTER_ADDR=$4
    MASTER_PORT=$5
    NODE_RANK=$6
    LOG_DIR=$7
    JOIN=$8
    CLUSTER_TIME_OUT=$9
    ;;
esac

is_int() { [[ $1 =~ ^[0-9]+$ ]]; }
is_int "$WORKER_NUM" && [ "$WORKER_NUM" -ge 1 ] || fail "WORKER_NUM must be a positive integer, got '$WORKER_NUM'"
is_int "$LOCAL_WORKER" && [ "$LOCAL_WORKER" -ge 1 ] || fail "LOCAL_WORKER must be a positive integer, got '$LOCAL_WORKER'"
[ "$LOCAL_WORKER" -le "$WORKER_NUM" ] || fail "LOCAL_WORKER ($LOCAL_WORKER) exceeds WORKER_NUM ($WORKER_NUM)"
is_int "$MASTER_PORT" && [ "$MASTER_PORT" -ge 1 ] && [ "$MASTER_PORT" -le 65535 ] \
  || fail "MASTER_PORT must be a port number (1-65535), got '$MASTER_PORT'"
is_int "$NODE_RANK" || fail "NODE_RANK must be a non-negative integer, got '$NODE_RANK'"
is_int "$CLUSTER_TIME_OUT" || fail "CLUSTER_TIME_OUT must be a number of seconds, got '$CLUSTER_TIME_OUT'"
case $JOIN in
  True|False|true|false) ;;
  *) fail "JOIN must be True or False, got '$JOIN'" ;;
esac
[ -n "$LOG_DIR" ] || fail "LOG_DIR is empty"

MSRUN=${MSRUN:-msrun}
if ! command -v "$MSRUN" >/dev/null 2>&1; then
  # msrun is installed next to the python that has MindSpore (e.g. a virtual environment's bin/)
  PYTHON_BIN=$(command -v python3 || command -v python)
  if [ -n "$PYTHON_BIN" ] && [ -x "$(dirname "$PYTHON_BIN")/msrun" ]; then
    MSRUN="$(dirname "$PYTHON_BIN")/msrun"
  else
    fail "msrun not found: install MindSpore (pip install mindspore) in the active environment, activate it, or set MSRUN=/path/to/msrun"
  fi
fi

# msrun starts the job's scheduler on the node that owns MASTER_ADDR (single node: 127.0.0.1). Where
# something already listens on MASTER_PORT there, the new scheduler fails to bind while its workers may
# register with whatever listens: the job fails with the reason deep in scheduler.log, or hangs until
# CLUSTER_TIME_OUT. Refuse to start instead. Another running job is the usual holder: its scheduler, or
# one of its workers, to which MindSpore hands out 256 ports each from 8118 up (worker 0 listens on 8118,
# the default MASTER_PORT, whatever port its own job's scheduler has).
SCHED_ADDR=$MASTER_ADDR
[ "$WORKER_NUM" -eq "$LOCAL_WORKER" ] && SCHED_ADDR=127.0.0.1
CHECK_PYTHON=$(command -v python3 || command -v python || true)
if [ -n "$CHECK_PYTHON" ] && "$CHECK_PYTHON" - "$SCHED_ADDR" "$MASTER_PORT" <<'EOF'
import errno, socket, sys
sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed job's TIME_WAIT port is free
try:
    sock.bind((sys.argv[1], int(sys.argv[2])))
except OSError as exc:  # EADDRNOTAVAIL: another node's address, whose scheduler runs there
    sys.exit(0 if exc.errno == errno.EADDRINUSE else 1)
sys.exit(1)
EOF
then
  fail "MASTER_PORT $MASTER_PORT is in use on $SCHED_ADDR, most likely by another msrun job (its scheduler, or one of its workers: MindSpore gives each worker 256 ports from 8118 up). This job's scheduler could not bind it, and msrun would fail or hang. Wait for that job to end, or pass a port below 8118 or above its workers' ports: msrun_launcher.sh \"<command>\" WORKER_NUM MASTER_PORT LOG_DIR JOIN CLUSTER_TIME_OUT"
fi

# Repository root (this script lives in tools/) on PYTHONPATH so mindformers_ext imports from a checkout.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [ -n "${MF_LOG_SUFFIX:-}" ]; then
  MF_LOG_SUFFIX="_$MF_LOG_SUFFIX"
fi
LOG_DIR="${LOG_DIR}${MF_LOG_SUFFIX:-}"
WORKSPACE_PATH=$(pwd)
export LOG_MF_PATH=${LOG_MF_PATH:-$WORKSPACE_PATH/output/log${MF_LOG_SUFFIX:-}}
if [ "${PLOG_REDICT_TO_OUTPUT:-False}" != "False" ]; then
  export ASCEND_PROCESS_LOG_PATH=$WORKSPACE_PATH/output/plog${MF_LOG_SUFFIX:-}
fi

# msrun waits for its workers and fails when one does only with --join=True: always ask for it.
if [ "$WORKER_NUM" -eq "$LOCAL_WORKER" ]; then
  [ $# -eq 9 ] && echo "msrun_launcher.sh: WORKER_NUM equals LOCAL_WORKER: the job runs on this node only"
  MSRUN_ARGS=(--worker_num="$WORKER_NUM" --local_worker_num="$LOCAL_WORKER" --master_port="$MASTER_PORT"
              --log_dir="$LOG_DIR" --join=True --cluster_time_out="$CLUSTER_TIME_OUT")
else
  echo "msrun_launcher.sh: $WORKER_NUM workers, $LOCAL_WORKER on this node (node_rank $NODE_RANK): start the other nodes with their node_rank"
  MSRUN_ARGS=(--worker_num="$WORKER_NUM" --local_worker_num="$LOCAL_WORKER" --master_addr="$MASTER_ADDR"
              --master_port="$MASTER_PORT" --node_rank="$NODE_RANK" --log_dir="$LOG_DIR" --join=True
              --cluster_time_out="$CLUSTER_TIME_OUT")
fi

ulimit -u unlimited 2>/dev/null || true

# The last error lines of every worker log that holds an error (or of every log when none does).
report_failed_workers() {
  local logs=() log shown=0
  shopt -s nullglob
  logs=("$LOG_DIR"/worker_*.log)
  shopt -u nullglob
  if [ ${#logs[@]} -eq 0 ]; then
    echo "msrun_launcher.sh: no worker log in $LOG_DIR (did msrun start the workers?)" >&2
    [ -f "$CONSOLE_LOG" ] && { echo "--- last lines of $CONSOLE_LOG:" >&2; tail -n 20 "$CONSOLE_LOG" >&2; }
    return
  fi
  for log in $(printf '%s\n' "${logs[@]}" | sort -V); do
    local line start trace
    # the last "SomeError: ..." line, and the traceback that leads to it (its last 12 lines)
    line=$(grep -n -E '^[A-Za-z_][A-Za-z0-9_.]*(Error|Exception|Exit|Interrupt)\b' "$log" | tail -n 1 | cut -d: -f1)
    if [ -n "$line" ]; then
      shown=1
      start=$line
      trace=$(head -n "$line" "$log" | grep -n '^Traceback (most recent call last)' | tail -n 1 | cut -d: -f1)
      if [ -n "$trace" ]; then
        start=$(( line - 12 > trace ? line - 12 : trace ))
      fi
      echo "--- $log: last error (line $line):" >&2
      tail -n +"$start" "$log" | grep -v -E '^\[(INFO|WARNING|DEBUG)\]' | head -n $(( line - start + 12 )) >&2
    fi
  done
  if [ $shown -eq 0 ]; then
    for log in $(printf '%s\n' "${logs[@]}" | sort -V); do
      echo "--- $log: last lines:" >&2
      grep -v -E '^\[(INFO|DEBUG)\]' "$log" | tail -n 10 >&2
    done
  fi
}

echo "Running command: $MSRUN ${MSRUN_ARGS[*]} $COMMAND"
echo "Worker logs: $LOG_DIR/worker_<rank>.log"
mkdir -p "$LOG_DIR" || fail "cannot create LOG_DIR $LOG_DIR"
CONSOLE_LOG="$LOG_DIR/msrun_console.log"
# The command is one string holding a script and its arguments (as in MindFormers): word-split it.
case $JOIN in
  True|true)
    # shellcheck disable=SC2086
    eval "\"\$MSRUN\"" "\"\${MSRUN_ARGS[@]}\"" $COMMAND
    STATUS=$? ;;
  *)
    echo "msrun_launcher.sh: waiting for the workers (JOIN False: msrun's output goes to $CONSOLE_LOG)"
    # shellcheck disable=SC2086
    eval "\"\$MSRUN\"" "\"\${MSRUN_ARGS[@]}\"" $COMMAND > "$CONSOLE_LOG" 2>&1
    STATUS=$? ;;
esac
if [ $STATUS -ne 0 ]; then
  echo "msrun_launcher.sh: error: the job failed (msrun exit status $STATUS); logs in $LOG_DIR" >&2
  report_failed_workers
  exit $STATUS
fi
echo "msrun_launcher.sh: all $LOCAL_WORKER local workers finished successfully"
exit 0

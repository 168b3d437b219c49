# shellcheck shell=bash
# A Ray cluster over a SLURM allocation, sourced by launch/slurm/*.sbatch.
#
# The Ray head runs on the first node of the allocation, one Ray worker on each other node
# (srun steps with --overlap, so they coexist with each other and with later steps); the
# driver then runs in the batch script against the head. Ray is stopped when the script
# exits, fails or is cancelled.
#
# Environment (all optional):
#   ADP_ROOT         the project checkout (default: the directory sbatch was called from)
#   ADP_PYTHON       python to run everything with (default: $ADP_VENV/bin/python, else
#                    $ADP_ROOT/.venv/bin/python, else python3 on PATH)
#   ADP_VENV         a virtual environment to take python from
#   RAY_PORT_BASE    first of 200 ports this job's Ray uses on every node (default: derived
#                    from the job id, 20000-32000), so that two jobs can share nodes
#   RAY_HEAD_IP      address of the head (default: `hostname --ip-address` of the first node)
#   RAY_NUM_CPUS     CPUs Ray uses per node (default: the job's CPUs on the node)
#   RAY_NUM_GPUS     GPUs Ray uses per node (default: Ray counts CUDA_VISIBLE_DEVICES, which
#                    SLURM sets from --gpus-per-node)
#   RAY_TMPDIR       Ray's temporary folder on each node (default: /tmp/ray-slurm-<job id>)
#   RAY_AUTH_MODE    token (default: a fresh token per job in RAY_AUTH_TOKEN) or disabled
#   RAY_DASHBOARD    1 (default) to start the dashboard on the head (for `ray job submit`), 0 not to
#   ADP_RAY_TIMEOUT  seconds to wait for all Ray nodes (default 300)

adp_die() {
  echo "error: $*" >&2
  exit 2
}

adp_setup() {
  [[ -n "${SLURM_JOB_ID:-}" ]] || adp_die "run this script with sbatch (SLURM_JOB_ID is not set)"
  ADP_ROOT="${ADP_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
  [[ -f "$ADP_ROOT/pipeline/cli.py" ]] ||
    adp_die "ADP_ROOT=$ADP_ROOT is not the project checkout; submit from the checkout or set ADP_ROOT"
  cd "$ADP_ROOT" || adp_die "cannot enter $ADP_ROOT"
  if [[ -z "${ADP_PYTHON:-}" ]]; then
    if [[ -n "${ADP_VENV:-}" ]]; then
      ADP_PYTHON="$ADP_VENV/bin/python"
    elif [[ -x "$ADP_ROOT/.venv/bin/python" ]]; then
      ADP_PYTHON="$ADP_ROOT/.venv/bin/python"
    else
      ADP_PYTHON="$(command -v python3 || true)"
    fi
  fi
  [[ -x "$ADP_PYTHON" ]] || adp_die "python '$ADP_PYTHON' not found: set ADP_PYTHON or ADP_VENV"
  # Ray starts its workers with the python that runs `ray start`: the same one everywhere.
  PATH="$(dirname "$ADP_PYTHON"):$PATH"
  export ADP_ROOT ADP_PYTHON PATH
  export RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1
  # The whole cluster goes down together at the end: no per-node draining on SIGTERM.
  export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}"
  export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
  if [[ "$RAY_AUTH_MODE" == token && -z "${RAY_AUTH_TOKEN:-}" ]]; then
    RAY_AUTH_TOKEN="$("$ADP_PYTHON" -c 'import secrets; print(secrets.token_hex(32))')"
    export RAY_AUTH_TOKEN
  fi
  echo "job $SLURM_JOB_ID on ${SLURM_JOB_NUM_NODES:-1} node(s): $SLURM_JOB_NODELIST; python $ADP_PYTHON; root $ADP_ROOT"
}

# Fail before any node is started when the config (and its overrides) do not validate.
adp_check_config() {
  "$ADP_PYTHON" -m pipeline.cli config "$@" >/dev/null
}

ray_cluster_start() {
  local base nodes head cpus ip i
  base="${RAY_PORT_BASE:-$((20000 + (SLURM_JOB_ID % 61) * 200))}"
  cpus="${SLURM_CPUS_ON_NODE:-1}"
  mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  head="${nodes[0]}"
  ip="${RAY_HEAD_IP:-$(hostname --ip-address)}"
  ip="${ip%% *}"  # the first address when the node has several
  RAY_TMPDIR="${RAY_TMPDIR:-/tmp/ray-slurm-$SLURM_JOB_ID}"
  export RAY_ADDRESS="$ip:$base"
  RAY_SRUN_PIDS=()
  trap ray_cluster_stop EXIT
  trap 'exit 143' TERM
  trap 'exit 130' INT

  local common=(--num-cpus "${RAY_NUM_CPUS:-$cpus}" --temp-dir "$RAY_TMPDIR"
    --node-manager-port $((base + 3)) --object-manager-port $((base + 4))
    --runtime-env-agent-port $((base + 5)) --dashboard-agent-grpc-port $((base + 6))
    --dashboard-agent-listen-port $((base + 7)) --metrics-export-port $((base + 8))
    --min-worker-port $((base + 10)) --max-worker-port $((base + 199)) --block)
  [[ -n "${RAY_NUM_GPUS:-}" ]] && common+=(--num-gpus "$RAY_NUM_GPUS")
  local dashboard=(--include-dashboard=false)
  [[ "${RAY_DASHBOARD:-1}" == 1 ]] && dashboard=(--include-dashboard=true --dashboard-host "$ip"
    --dashboard-port $((base + 1)))

  echo "Ray head on $head ($RAY_ADDRESS), ${#nodes[@]} node(s), ports $base-$((base + 199)), temp $RAY_TMPDIR"
  srun --overlap --nodes=1 --ntasks=1 --cpus-per-task="$cpus" -w "$head" \
    "$ADP_PYTHON" -m ray.scripts.scripts start --head --node-ip-address "$ip" --port "$base" \
    --ray-client-server-port $((base + 2)) "${dashboard[@]}" "${common[@]}" &
  RAY_SRUN_PIDS+=($!)
  ray_wait_port "$ip" "$base"
  for ((i = 1; i < ${#nodes[@]}; i++)); do
    srun --overlap --nodes=1 --ntasks=1 --cpus-per-task="$cpus" -w "${nodes[$i]}" \
      "$ADP_PYTHON" -m ray.scripts.scripts start --address "$RAY_ADDRESS" "${common[@]}" &
    RAY_SRUN_PIDS+=($!)
  done
  ray_wait_nodes "${#nodes[@]}"
  if [[ "${RAY_DASHBOARD:-1}" == 1 ]]; then
    echo "Ray dashboard / job submission: http://$ip:$((base + 1))"
  fi
}

# Wait until the head's GCS port accepts connections (or the head step has died).
ray_wait_port() {
  local deadline=$((SECONDS + ${ADP_RAY_TIMEOUT:-300}))
  until "$ADP_PYTHON" -c 'import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 2).close()' \
    "$1" "$2" 2>/dev/null; do
    kill -0 "${RAY_SRUN_PIDS[0]}" 2>/dev/null || adp_die "the Ray head did not start (its output is above)"
    ((SECONDS < deadline)) || adp_die "the Ray head at $1:$2 did not answer within ${ADP_RAY_TIMEOUT:-300}s"
    sleep 1
  done
}

# Wait until every node of the allocation has joined the cluster.
ray_wait_nodes() {
  "$ADP_PYTHON" - "$RAY_ADDRESS" "$1" "${ADP_RAY_TIMEOUT:-300}" <<'EOF' || adp_die "the Ray cluster did not come up"
import sys, time

import ray

address, want, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.time() + timeout
ray.init(address=address, logging_level="ERROR", log_to_driver=False)
while (alive := sum(1 for n in ray.nodes() if n["Alive"])) < want:
    if time.time() > deadline:
        sys.exit(f"only {alive} of {want} Ray nodes joined within {timeout:.0f}s")
    time.sleep(1)
print(f"Ray cluster up: {alive} node(s), {ray.cluster_resources()}")
EOF
}

ray_cluster_stop() {
  local rc=$? pid deadline
  trap - EXIT TERM INT
  set +e
  if ((${#RAY_SRUN_PIDS[@]})); then
    echo "stopping Ray (${#RAY_SRUN_PIDS[@]} node(s))"
    # SIGTERM to the job's steps (not to this script): `ray start --block` stops its processes.
    scancel --signal=TERM "$SLURM_JOB_ID" 2>/dev/null
    deadline=$((SECONDS + 60))
    for pid in "${RAY_SRUN_PIDS[@]}"; do
      while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
        sleep 1
      done
      kill -TERM "$pid" 2>/dev/null  # still there: srun ends the step
      wait "$pid" 2>/dev/null
    done
    RAY_SRUN_PIDS=()
  fi
  exit "$rc"
}

# Run the driver in the background so that a cancellation reaches the traps at once.
adp_run() {
  echo "+ $*"
  "$@" &
  local pid=$!
  wait "$pid"
}

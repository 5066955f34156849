#!/usr/bin/env bash
# A local NDIF server on 127.0.0.1 for the `remote` test tier (CPU only).
#
#   scripts/ndif/local_server.sh install   # once: .venv-ndif (ndif 0.1.2 + deps), redis-server (apt)
#   scripts/ndif/local_server.sh start     # redis, an S3 store (moto), Ray + controller, the API
#   scripts/ndif/local_server.sh stop      # stops exactly the processes `start` recorded
#   scripts/ndif/local_server.sh status
#
# Nothing listens beyond 127.0.0.1: Ray's gRPC servers bind every interface whatever
# address they are given, so all services run in a network namespace of their own
# (`unshare --net`, root) whose only interface is loopback, and only the API port is
# forwarded from this machine's 127.0.0.1 into it (netns.py). State (PID files, logs,
# data) lives in .ndif/. Each service runs in its own process group, and `stop`
# signals those groups by the PIDs recorded at start, never by name. The API is at
# http://127.0.0.1:$NDIF_LOCAL_API_PORT (default 18001): run the suite with
#   NDIF_HOST=http://127.0.0.1:18001 NDIF_API_KEY=local python -m experiments.routing backend=ndif
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STATE="${NDIF_LOCAL_STATE:-$ROOT/.ndif}"
VENV="${NDIF_LOCAL_VENV:-$ROOT/.venv-ndif}"
PY="$VENV/bin/python"
API_PORT="${NDIF_LOCAL_API_PORT:-18001}"
REDIS_PORT="${NDIF_LOCAL_REDIS_PORT:-16379}"
S3_PORT="${NDIF_LOCAL_S3_PORT:-19000}"
RAY_PORT="${NDIF_LOCAL_RAY_PORT:-16385}"
RAY_CLIENT_PORT="${NDIF_LOCAL_RAY_CLIENT_PORT:-10101}"
SERVICES=(netns redis s3 ray controller api forward)

export NDIF_REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
export NDIF_OBJECT_STORE_URL="http://127.0.0.1:$S3_PORT"
export NDIF_OBJECT_STORE_ACCESS_KEY="local" NDIF_OBJECT_STORE_SECRET_KEY="local"
export AWS_ACCESS_KEY_ID="local" AWS_SECRET_ACCESS_KEY="local" AWS_DEFAULT_REGION="us-east-1"
export NDIF_RAY_ADDRESS="ray://127.0.0.1:$RAY_CLIENT_PORT"
export NDIF_API_URL="http://127.0.0.1:$API_PORT" NDIF_API_PORT="$API_PORT"
export NDIF_INFLUX_ENABLED=false NDIF_DEFAULT_DTYPE=float32
export NDIF_MODEL_IMPORT_PATH="ndif_cpu.CpuModelActor"
export NDIF_CONTROLLER_IMPORT_PATH="ndif_cpu.CpuController"
export PYTHONPATH="$ROOT/scripts/ndif${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" GRPC_ENABLE_FORK_SUPPORT=0 RAY_USAGE_STATS_ENABLED=0
export HF_HUB_OFFLINE=1  # models are named by local path; nothing to fetch

install() {
    command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }
    # ndif 0.1.2 asks for Python >= 3.12; it runs on 3.11, where the CPU torch wheel is.
    # transformers as the client has it: 5.23 builds no tokenizer for a pipeline
    # given a local checkpoint whose tokenizer class is the plain tokenizers backend.
    [ -x "$PY" ] || python3.11 -m venv "$VENV"
    # The server's dependencies are the `ndif` extra of pyproject.toml.
    # torch pinned as the Makefile pins it: a bare range pulls the newest build with its CUDA packages.
    # shellcheck disable=SC2086  # a spec may carry pip options (--index-url ...)
    "$PY" -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
    "$PY" - "$ROOT/pyproject.toml" <<'PYEOF' | xargs -d '\n' "$PY" -m pip install -q
import sys, tomllib
print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["optional-dependencies"]["ndif"]))
PYEOF
    "$PY" -m pip install -q --no-deps --ignore-requires-python "ndif==0.1.2"
}

# Start one service in a new session (its own process group) and record its PID.
spawn() {
    local name="$1"; shift
    setsid "$@" >"$STATE/$name.log" 2>&1 < /dev/null &
    echo $! >"$STATE/$name.pid"
}

wait_for() {  # name, seconds, command...
    local name="$1" seconds="$2"; shift 2
    for _ in $(seq "$seconds"); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        if ! kill -0 "$(cat "$STATE/$name.pid")" 2>/dev/null; then
            echo "ndif-local: $name exited; see $STATE/$name.log" >&2; tail -20 "$STATE/$name.log" >&2; return 1
        fi
        sleep 1
    done
    echo "ndif-local: $name not ready after ${seconds}s; see $STATE/$name.log" >&2; return 1
}

# A port open on 127.0.0.1 inside the server's namespace.
# A one-shot service (the controller deploys its actor and exits): wait for it to end, then
# its exit status. A process that has ended stays a zombie until bash reaps it, so "gone"
# is "absent or a zombie"; `wait` gives the status either way.
wait_done() {  # name, seconds
    local name="$1" seconds="$2" pid rc=0; pid=$(cat "$STATE/$name.pid")
    for _ in $(seq "$seconds"); do
        if [ ! -e "/proc/$pid" ] || [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" = Z ]; then
            wait "$pid" || rc=$?
            [ "$rc" = 0 ] && return 0
            echo "ndif-local: $name failed (exit $rc); see $STATE/$name.log" >&2; tail -20 "$STATE/$name.log" >&2; return 1
        fi
        sleep 1
    done
    echo "ndif-local: $name not done after ${seconds}s; see $STATE/$name.log" >&2; return 1
}

port_open() { nsenter --net="$NS" bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

start() {
    [ -x "$PY" ] || { echo "ndif-local: no $VENV (run: $0 install)" >&2; exit 1; }
    mkdir -p "$STATE"
    for name in "${SERVICES[@]}"; do
        if [ -f "$STATE/$name.pid" ] && kill -0 "$(cat "$STATE/$name.pid")" 2>/dev/null; then
            echo "ndif-local: already running ($name); stop it first" >&2; exit 1
        fi
    done
    command -v unshare >/dev/null && command -v nsenter >/dev/null || { echo "ndif-local: needs unshare and nsenter (util-linux)" >&2; exit 1; }
    # The namespace: held by a sleeping process; loopback brought up inside it.
    spawn netns unshare --net sleep infinity
    NS="/proc/$(cat "$STATE/netns.pid")/ns/net"
    for _ in $(seq 50); do [ "$(readlink "$NS")" != "$(readlink /proc/self/ns/net)" ] && break; sleep 0.1; done
    [ "$(readlink "$NS")" != "$(readlink /proc/self/ns/net)" ] || { echo "ndif-local: no private network namespace (unshare --net needs root)" >&2; exit 1; }
    nsenter --net="$NS" "$PY" "$ROOT/scripts/ndif/netns.py" lo-up
    spawn redis nsenter --net="$NS" redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no --dir "$STATE"
    spawn s3 nsenter --net="$NS" "$VENV/bin/moto_server" -H 127.0.0.1 -p "$S3_PORT"
    wait_for redis 30 port_open "$REDIS_PORT"
    wait_for s3 60 port_open "$S3_PORT"
    local mem; mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) * 1024 ))
    spawn ray nsenter --net="$NS" "$VENV/bin/ray" start --head --block --node-ip-address=127.0.0.1 --port="$RAY_PORT" \
        --ray-client-server-port="$RAY_CLIENT_PORT" --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="${NDIF_LOCAL_DASHBOARD_PORT:-18265}" --num-cpus=2 --num-gpus=1 \
        --resources="{\"head\": 10, \"cuda_memory_bytes\": 8000000000, \"cpu_memory_bytes\": $mem}" \
        --min-worker-port=21000 --max-worker-port=21999 --temp-dir="$STATE/ray" --disable-usage-stats
    wait_for ray 120 port_open "$RAY_CLIENT_PORT"
    spawn controller nsenter --net="$NS" env RAY_ADDRESS="127.0.0.1:$RAY_PORT" "$PY" -m ndif.services.ray.deployments.controller.controller
    wait_done controller 120
    # ndif's gunicorn config behind one that imports anyio's asyncio backend before nnsight
    # (ndif_api_conf.py: without it the API refuses every request over 1 MiB with HTTP 400).
    spawn api nsenter --net="$NS" "$VENV/bin/gunicorn" --config python:ndif_api_conf --bind "127.0.0.1:$API_PORT" \
        ndif.services.api.app:app
    wait_for api 180 port_open "$API_PORT"
    spawn forward "$PY" "$ROOT/scripts/ndif/netns.py" forward "$API_PORT" "$(cat "$STATE/netns.pid")"
    wait_for forward 60 curl -sf "http://127.0.0.1:$API_PORT/connected"
    echo "ndif-local: up at http://127.0.0.1:$API_PORT (state in $STATE)"
}

stop() {
    local order=(forward api controller ray s3 redis netns)
    for name in "${order[@]}"; do
        local file="$STATE/$name.pid"
        [ -f "$file" ] || continue
        local pid; pid=$(cat "$file")
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM -- "-$pid" 2>/dev/null || true
            for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
            kill -KILL -- "-$pid" 2>/dev/null || true
        fi
        rm -f "$file"
    done
    echo "ndif-local: stopped"
}

status() {
    for name in "${SERVICES[@]}"; do
        local file="$STATE/$name.pid" state="stopped"
        if [ -f "$file" ] && kill -0 "$(cat "$file")" 2>/dev/null; then state="running (pid $(cat "$file"))"; fi
        echo "$name: $state"
    done
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac

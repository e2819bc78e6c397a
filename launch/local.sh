#!/bin/bash
# Launch: launch/local.sh configs/tiny-cpu.yaml [key=value ...]
# One machine. CPU (no GPU found): `smd train` under torchrun with tp*pp*cp*dp gloo ranks from the
# config's resources; the rollout in-process, or with rollout.backend=sglang on one patched SGLang
# CPU server (started, health-checked, fed the learner's weights after every step through the
# sglang transport, stopped by PID at exit). Every server runs under python -m sglang_patch.supervise:
# restarted when it exits or hangs (rollout.faults.server_*), its PID in <log dir>/sglang-PORT.pid. GPUs: the learner on GPUs 0..W-1 (W = tp*pp*cp*dp);
# with resources.rollout_nodes > 0, patched SGLang servers on the remaining GPUs (one each: the
# patch runs TP 1), behind a router when there are several, started and health-checked first; smd
# train then samples from every server and pushes its weights to them (rollout.sglang_urls=[...]
# sync.transport=sglang after the user's overrides; the plan requires rollout.backend=sglang).
# Knobs: SMD_NUM_GPUS (default: count from nvidia-smi), SMD_LOG_DIR (default <output_dir>/launch),
# SMD_DRY_RUN=1 (print the commands, start nothing), and those of launch/slurm/common.sh.
set -euo pipefail

SMD_HOME=${SMD_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
cd "$SMD_HOME"
# shellcheck source=launch/slurm/common.sh
source "$SMD_HOME/launch/slurm/common.sh"

[[ $# -ge 1 ]] || smd_die "usage: launch/local.sh CONFIG [key=value ...]"
CONFIG=$1
shift
OVERRIDES=("$@")
smd_load_plan "$CONFIG" "${OVERRIDES[@]}"

if [[ -z ${SMD_NUM_GPUS:-} ]]; then
    SMD_NUM_GPUS=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        SMD_NUM_GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
    fi
fi
W=$SMD_LEARNER_WORLD
LOG_DIR=${SMD_LOG_DIR:-$SMD_OUTPUT_DIR/launch}
[[ $SMD_DRY_RUN == 1 ]] || mkdir -p "$LOG_DIR"
SMD_GROUP=1  # every local step in its own session: teardown stops its whole process tree
seq_csv() { local IFS=,; local a=(); for ((i = $1; i < $2; i++)); do a+=("$i"); done; echo "${a[*]}"; }

smd_install_teardown
LEARNER_ENV=()
TRAIN_OVERRIDES=()
if ((SMD_NUM_GPUS == 0)); then
    ((SMD_ROLLOUT_NODES == 0)) || smd_die "resources.rollout_nodes=$SMD_ROLLOUT_NODES needs SGLang servers on GPUs; \
no GPU found (on CPU use resources.rollout_nodes=0 and rollout.backend=sglang for one CPU server)"
    if [[ $SMD_ROLLOUT_BACKEND == sglang ]]; then
        # the server loads model.path at start: create the tiny model first if the config says how
        if [[ $SMD_DRY_RUN != 1 ]]; then
            "$SMD_PYTHON" -m megatron_smd.cli init-model --config "$CONFIG" "${OVERRIDES[@]}" >/dev/null \
                || smd_die "model.path could not be prepared (above)"
        fi
        port=$SMD_SERVER_PORT
        url="http://127.0.0.1:$port"
        smd_start "sglang:$port" "$LOG_DIR/sglang-$port.supervise.log" \
            "$SMD_PYTHON" -m sglang_patch.supervise "${SMD_SUPERVISE_ARGS[@]}" --pid-file "$LOG_DIR/sglang-$port.pid" \
            --server-log "$LOG_DIR/sglang-$port.log" -- \
            "$SMD_PYTHON" -m sglang_patch.launch_server "${SMD_SGLANG_ARGS[@]}" --device cpu --skip-tokenizer-init \
            --host 127.0.0.1 --port "$port"
        smd_wait_healthy "sglang $url" "$url/health" "$SMD_LAST_PID"
        TRAIN_OVERRIDES=("rollout.sglang_urls=[$url]" "sync.transport=sglang")
        smd_log "CPU: $W learner rank(s) (tp=$SMD_TP pp=$SMD_PP cp=$SMD_CP dp=$SMD_DP), rollout on the patched SGLang CPU server $url"
    else
        smd_log "CPU: $W learner rank(s) (tp=$SMD_TP pp=$SMD_PP cp=$SMD_CP dp=$SMD_DP), rollout in-process"
    fi
else
    ((W <= SMD_NUM_GPUS)) || smd_die "the learner needs tp*pp*cp*dp = $W GPUs, this machine has $SMD_NUM_GPUS"
    LEARNER_ENV=(env CUDA_VISIBLE_DEVICES="$(seq_csv 0 "$W")")
    URLS=()
    if ((SMD_ROLLOUT_NODES > 0)); then
        ENGINES=$(((SMD_NUM_GPUS - W) / SMD_ROLLOUT_TP))
        ((ENGINES >= 1)) || smd_die "no GPUs left for the rollout: $SMD_NUM_GPUS GPUs - $W learner GPUs < \
resources.rollout_tp=$SMD_ROLLOUT_TP (lower dp, or use resources.rollout_nodes=0)"
        smd_log "GPU: learner on GPUs 0-$((W - 1)), $ENGINES SGLang engine(s) x tp=$SMD_ROLLOUT_TP after them"
        PIDS=()
        for ((k = 0; k < ENGINES; k++)); do
            first=$((W + k * SMD_ROLLOUT_TP))
            port=$((SMD_SERVER_PORT + 10 * k))
            smd_start "sglang:$port" "$LOG_DIR/sglang-$port.supervise.log" \
                env CUDA_VISIBLE_DEVICES="$(seq_csv "$first" "$((first + SMD_ROLLOUT_TP))")" \
                "$SMD_PYTHON" -m sglang_patch.supervise "${SMD_SUPERVISE_ARGS[@]}" \
                --pid-file "$LOG_DIR/sglang-$port.pid" --server-log "$LOG_DIR/sglang-$port.log" -- \
                "$SMD_PYTHON" -m sglang_patch.launch_server "${SMD_SGLANG_ARGS[@]}" --host 127.0.0.1 --port "$port"
            URLS+=("http://127.0.0.1:$port")
            PIDS+=("$SMD_LAST_PID")
        done
        for i in "${!URLS[@]}"; do
            smd_wait_healthy "sglang ${URLS[$i]}" "${URLS[$i]}/health" "${PIDS[$i]}"
        done
        if ((ENGINES > 1)); then
            smd_start router "$LOG_DIR/router.log" \
                "$SMD_PYTHON" -m sglang_router.launch_router --worker-urls "${URLS[@]}" --host 127.0.0.1 \
                --port "$SMD_ROUTER_PORT"
            export SMD_ROLLOUT_URL="http://127.0.0.1:$SMD_ROUTER_PORT"
            smd_wait_healthy router "$SMD_ROLLOUT_URL/health" "$SMD_LAST_PID"
        else
            export SMD_ROLLOUT_URL=${URLS[0]}
        fi
        export SMD_ROLLOUT_SERVERS="${URLS[*]}"
        # the plan only lets rollout nodes through with rollout.backend=sglang: sample from every
        # server, push the learner's weights to them after each step
        url_list=$(IFS=,; echo "${URLS[*]}")
        TRAIN_OVERRIDES=("rollout.sglang_urls=[$url_list]" "sync.transport=sglang")
    else
        [[ $SMD_ROLLOUT_BACKEND != sglang ]] || smd_die "rollout.backend=sglang with resources.rollout_nodes=0 on \
GPUs: the learner's GPUs leave none for an SGLang server; set resources.rollout_nodes >= 1 (servers on the GPUs \
after the learner's), or use rollout.backend=reference"
        smd_log "GPU: learner on GPUs 0-$((W - 1)), rollout colocated"
    fi
fi

smd_start learner - "${LEARNER_ENV[@]}" \
    torchrun --nnodes=1 --nproc_per_node="$W" --rdzv_backend=c10d --rdzv_endpoint="127.0.0.1:$SMD_RDZV_PORT" \
    -m megatron_smd.cli train --config "$CONFIG" "${OVERRIDES[@]}" "${TRAIN_OVERRIDES[@]}"
[[ $SMD_DRY_RUN == 1 ]] && exit 0
rc=0
smd_wait_step "$SMD_LAST_PID" || rc=$?
smd_log "learner exited with status $rc"
exit "$rc"

# shellcheck shell=bash
# Shared by launch/slurm/smd.sbatch, launch/slurm/submit.sh and launch/local.sh (sourced, not run).
#
# - smd_load_plan CONFIG [key=value ...]: validate the layout with `python -m megatron_smd.plan
#   --shell` (a layout that cannot work stops here, before any GPU is touched) and set the SMD_*
#   variables below.
# - smd_abs_config PATH: the config path made absolute from the current directory (checked to exist),
#   so that it still names the same file after the caller changes to the repository root.
# - smd_split_args ARGS...: `--resume X` (for `smd train`) into SMD_TRAIN_ARGS, key=value overrides
#   into SMD_OVERRIDES; anything else is an error.
# - smd_start NAME LOG CMD...: start one long-running step in the background and remember its PID.
#   LOG "-" keeps the caller's stdout (srun steps write their own --output). With SMD_DRY_RUN=1 the
#   command is printed ("[dry-run] ..." with bash %q quoting) instead of run.
# - smd_wait_healthy NAME URL PID: poll URL until it answers, failing fast if the step died.
# - teardown: an EXIT trap stops exactly the steps smd_start recorded, by PID (local steps run in
#   their own session, so their PID is also their process group). Never by process name.

# Filled by smd_load_plan (the contract with megatron_smd.plan.launch_vars); read by the scripts
# that source this file.
# shellcheck disable=SC2034
SMD_TP="" SMD_PP="" SMD_CP="" SMD_DP="" SMD_LEARNER_WORLD="" SMD_NODES="" SMD_GPUS_PER_NODE=""
SMD_NPROC_PER_NODE="" SMD_ROLLOUT_NODES="" SMD_ROLLOUT_TP="" SMD_ENGINES_PER_NODE="" SMD_MODEL_PATH=""
SMD_OUTPUT_DIR="" SMD_ROLLOUT_BACKEND=""
SMD_SGLANG_ARGS=()
SMD_TRAIN_ARGS=() SMD_OVERRIDES=()  # filled by smd_split_args

SMD_DRY_RUN=${SMD_DRY_RUN:-0}
SMD_PYTHON=${SMD_PYTHON:-python}
SMD_HEALTH_TIMEOUT=${SMD_HEALTH_TIMEOUT:-1800}  # seconds; loading a 32B model from network storage is slow
SMD_HEALTH_INTERVAL=${SMD_HEALTH_INTERVAL:-5}
SMD_STOP_GRACE=${SMD_STOP_GRACE:-30}            # seconds between SIGTERM and SIGKILL at teardown
SMD_SERVER_PORT=${SMD_SERVER_PORT:-30000}       # engine k on a node listens on SMD_SERVER_PORT + 10*k
SMD_ROUTER_PORT=${SMD_ROUTER_PORT:-30500}
SMD_RDZV_PORT=${SMD_RDZV_PORT:-29500}

SMD_STEP_PIDS=()   # kill targets: "PID", or "-PID" for a process group
SMD_STEP_NAMES=()
SMD_LAST_PID=""

smd_log() { printf '[smd %(%H:%M:%S)T] %s\n' -1 "$*"; }
smd_die() { printf 'error: %s\n' "$*" >&2; exit 2; }

smd_load_plan() {
    local vars
    vars=$("$SMD_PYTHON" -m megatron_smd.plan --shell --config "$@") || smd_die "the layout was rejected (above)"
    eval "$vars"
}

smd_abs_config() {
    local p=$1
    [[ $p == /* ]] || p=$PWD/$p
    [[ -f $p ]] || smd_die "config not found: $1 (a relative path is taken from the current directory, $PWD)"
    printf '%s\n' "$p"
}

smd_split_args() {
    SMD_TRAIN_ARGS=()
    SMD_OVERRIDES=()
    while (($#)); do
        case $1 in
            --resume) (($# >= 2)) || smd_die "--resume needs a value (auto, none or a checkpoint)"
                      SMD_TRAIN_ARGS=(--resume "$2"); shift 2 ;;
            --resume=*) SMD_TRAIN_ARGS=(--resume "${1#--resume=}"); shift ;;
            -*) smd_die "unknown option $1 (expected --resume auto|none|CKPT and key=value overrides)" ;;
            *) SMD_OVERRIDES+=("$1"); shift ;;
        esac
    done
}

smd_quote() { printf '%q ' "$@" | sed 's/ $//'; }

# smd_start NAME LOG CMD... ; with SMD_GROUP=1 the step gets its own session (local processes).
smd_start() {
    local name=$1 log=$2
    shift 2
    if [[ $SMD_DRY_RUN == 1 ]]; then
        printf '[dry-run] %s\n' "$(smd_quote "$@")"
        SMD_LAST_PID=""
        return 0
    fi
    if [[ ${SMD_GROUP:-0} == 1 ]]; then
        if [[ $log == - ]]; then setsid "$@" & else setsid "$@" >"$log" 2>&1 & fi
        SMD_STEP_PIDS+=("-$!")
    else
        if [[ $log == - ]]; then "$@" & else "$@" >"$log" 2>&1 & fi
        SMD_STEP_PIDS+=("$!")
    fi
    SMD_LAST_PID=$!
    SMD_STEP_NAMES+=("$name")
    smd_log "started $name (pid $SMD_LAST_PID)"
}

# smd_wait_healthy NAME URL PID
smd_wait_healthy() {
    local name=$1 url=$2 pid=$3 deadline=$((SECONDS + SMD_HEALTH_TIMEOUT))
    if [[ $SMD_DRY_RUN == 1 ]]; then
        printf '[dry-run] wait for %s\n' "$url"
        return 0
    fi
    until curl -sf -o /dev/null --max-time 5 "$url"; do
        kill -0 "$pid" 2>/dev/null || smd_die "$name exited before $url answered (see its log)"
        ((SECONDS < deadline)) || smd_die "$name: $url not healthy after ${SMD_HEALTH_TIMEOUT}s"
        sleep "$SMD_HEALTH_INTERVAL"
    done
    smd_log "$name is healthy ($url)"
}

smd_alive() { kill -0 -- "$1" 2>/dev/null; }

smd_teardown() {
    local rc=$? target i alive=()
    trap - EXIT INT TERM
    for i in "${!SMD_STEP_PIDS[@]}"; do
        target=${SMD_STEP_PIDS[$i]}
        if smd_alive "$target"; then
            alive+=("$target")
            smd_log "stopping ${SMD_STEP_NAMES[$i]} (kill -TERM -- $target)"
            kill -TERM -- "$target" 2>/dev/null || true
        fi
    done
    for ((i = 0; i < SMD_STOP_GRACE && ${#alive[@]} > 0; i++)); do
        local still=()
        for target in "${alive[@]}"; do smd_alive "$target" && still+=("$target"); done
        alive=("${still[@]}")
        ((${#alive[@]} == 0)) || sleep 1
    done
    for target in "${alive[@]}"; do
        smd_log "still running after ${SMD_STOP_GRACE}s: kill -KILL -- $target"
        kill -KILL -- "$target" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    exit "$rc"
}

smd_install_teardown() {
    trap smd_teardown EXIT
    trap 'exit 143' TERM
    trap 'exit 130' INT
}

# smd_wait_step PID: wait for a step, return its exit status (set -e safe).
smd_wait_step() {
    local rc=0
    wait "$1" || rc=$?
    return "$rc"
}

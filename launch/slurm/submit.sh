#!/bin/bash
# Launch: launch/slurm/submit.sh configs/qwen2.5-7b-grpo.yaml [--resume auto|none|CKPT] [key=value ...]
# Validates the layout (smd plan), then submits launch/slurm/smd.sbatch with the node count the
# config needs (resources.nodes + rollout_nodes) and, unless the config has none
# (resources.gpus_per_node: 0, a CPU cluster), its GPUs per node. CONFIG may be given relative to
# the directory you stand in; the job itself runs in the repository root. Extra sbatch flags:
# SMD_SBATCH_ARGS="--time=04:00:00 --account=myproj" (or sbatch's own SBATCH_* variables).
# Dry run: SMD_DRY_RUN=1 prints the sbatch command.
set -euo pipefail

SMD_HOME=${SMD_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
# shellcheck source=launch/slurm/common.sh
source "$SMD_HOME/launch/slurm/common.sh"

[[ $# -ge 1 ]] || smd_die "usage: launch/slurm/submit.sh CONFIG [--resume auto|none|CKPT] [key=value ...]"
CONFIG=$(smd_abs_config "$1")
shift
smd_split_args "$@"
cd "$SMD_HOME"
smd_load_plan "$CONFIG" "${SMD_OVERRIDES[@]}"
read -r -a EXTRA <<<"${SMD_SBATCH_ARGS:-}"
GPUS=()
((SMD_GPUS_PER_NODE > 0)) && GPUS=(--gpus-per-node="$SMD_GPUS_PER_NODE")
CMD=(sbatch --nodes="$((SMD_NODES + SMD_ROLLOUT_NODES))" "${GPUS[@]}" "${EXTRA[@]}"
     launch/slurm/smd.sbatch "$CONFIG" "${SMD_TRAIN_ARGS[@]}" "${SMD_OVERRIDES[@]}")
if [[ $SMD_DRY_RUN == 1 ]]; then
    printf '[dry-run] %s\n' "$(smd_quote "${CMD[@]}")"
    exit 0
fi
mkdir -p slurm_logs  # sbatch does not create the directory of --output
exec "${CMD[@]}"

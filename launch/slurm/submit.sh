#!/bin/bash
# Launch: launch/slurm/submit.sh configs/qwen2.5-7b-grpo.yaml [key=value ...]
# Validates the layout (smd plan), then submits launch/slurm/smd.sbatch with the node count the
# config needs (resources.nodes + rollout_nodes) and its GPUs per node. Extra sbatch flags:
# SMD_SBATCH_ARGS="--time=04:00:00 --account=myproj" (or sbatch's own SBATCH_* variables).
# Dry run: SMD_DRY_RUN=1 prints the sbatch command.
set -euo pipefail

SMD_HOME=${SMD_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
cd "$SMD_HOME"
# shellcheck source=launch/slurm/common.sh
source "$SMD_HOME/launch/slurm/common.sh"

[[ $# -ge 1 ]] || smd_die "usage: launch/slurm/submit.sh CONFIG [key=value ...]"
smd_load_plan "$@"
read -r -a EXTRA <<<"${SMD_SBATCH_ARGS:-}"
CMD=(sbatch --nodes="$((SMD_NODES + SMD_ROLLOUT_NODES))" --gpus-per-node="$SMD_GPUS_PER_NODE" "${EXTRA[@]}"
     launch/slurm/smd.sbatch "$@")
if [[ $SMD_DRY_RUN == 1 ]]; then
    printf '[dry-run] %s\n' "$(smd_quote "${CMD[@]}")"
    exit 0
fi
mkdir -p slurm_logs  # sbatch does not create the directory of --output
exec "${CMD[@]}"

"""``smd replay --learner megatron``: the Megatron learner replays a rollout under TP x PP x CP.

The command launches ``torchrun --nproc_per_node tp*pp*cp`` (gloo on CPU) running
:func:`megatron_smd.replay.worker.worker`, which builds the learner from the rollout's model
directory, computes the log-probs of every trajectory in the ``dense`` and ``shadow`` modes
(optionally THD-packed), and has rank 0 write the metrics (:func:`megatron_smd.replay.gap_metrics`)
as JSON.

    smd replay --rollouts runs/tiny-cpu/rollout --learner megatron --tp 2 --json
    torchrun --nproc_per_node 4 -m megatron_smd.replay.worker --rollouts DIR --tp 2 --cp 2 --out res.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import SMDError


def replay_megatron(rollouts, *, tp: int = 1, pp: int = 1, cp: int = 1, packed: bool = False,
                    backend: str = "sdpa", model_dir=None, timeout_s: int = 1800, precision: str | None = None) -> dict:
    """Launch the distributed replay and return ``{mode: metrics}``.

    ``precision``: the learner's (``fp32`` | ``bf16``); default: the dtype the rollout was sampled
    in (``meta.json: dtype``; float32 when absent), so a bf16 rollout is replayed in bf16."""
    from ..model.hf import read_arch
    from ..parallel.layout import ParallelLayout, clean_launcher_env, free_port
    from ..rollout.io import check_kv_scales_weights, load_rollouts

    batch = load_rollouts(rollouts)  # validate here: errors surface in this process, not in a worker
    model_dir = model_dir or batch.meta["model_path"]
    check_kv_scales_weights(batch, model_dir)  # an FP8 rollout's scales belong to the weights it replays on
    arch = read_arch(model_dir)
    if precision is None:
        precision = rollout_precision(batch)
    world = tp * pp * cp
    lay = ParallelLayout(world_size=world, tp=tp, pp=pp, cp=cp)
    lay.validate(arch)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="smd-replay-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--master_addr=127.0.0.1",
               f"--master_port={port}", "-m", "megatron_smd.replay.worker", "--rollouts", str(rollouts),
               "--model", str(model_dir), "--tp", str(tp), "--pp", str(pp), "--cp", str(cp), "--backend", backend,
               "--precision", precision, "--out", str(out)] + (["--packed"] if packed else [])
        env = clean_launcher_env(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
        if proc.returncode != 0 or not out.is_file():
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise SMDError(f"megatron replay (tp={tp}, pp={pp}, cp={cp}) failed with exit code {proc.returncode}:\n{tail}")
        return json.loads(out.read_text())


def rollout_precision(batch) -> str:
    """The learner precision matching the rollout's compute dtype (``meta.json: dtype``)."""
    return {"bfloat16": "bf16", "float32": "fp32", None: "fp32"}[batch.meta.get("dtype")]

"""One rank of ``smd replay --learner megatron`` (:func:`megatron_smd.replay.replay_megatron` starts
it under torchrun): builds the Megatron learner, scores every trajectory in each mode, and rank 0
writes the metrics as JSON to ``--out``."""

from __future__ import annotations

import argparse


def worker(argv=None) -> None:
    import torch

    from ..learner.learner import Learner, LearnerSettings
    from ..model.hf import read_arch
    from ..parallel.layout import ParallelLayout
    from ..rollout.io import atomic_write_json, load_rollouts
    from .gap import MODES, gap_metrics, learner_temperature

    p = argparse.ArgumentParser()
    p.add_argument("--rollouts", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--cp", type=int, default=1)
    p.add_argument("--backend", default="sdpa")
    p.add_argument("--packed", action="store_true")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    batch = load_rollouts(a.rollouts)
    arch = read_arch(a.model)
    lay = ParallelLayout.from_env(tp=a.tp, pp=a.pp, cp=a.cp)
    lay.initialize()
    try:
        learner = Learner(arch, lay, LearnerSettings(micro_batch_size=a.micro_batch_size, attention_backend=a.backend,
                                                     precision=a.precision),
                          weights=a.model, train=False)
        temp = learner_temperature(batch)
        res = {m: gap_metrics(learner.logprobs(batch, m, temperature=temp, packed=a.packed), batch) for m in MODES}
        if lay.rank == 0:
            res["layout"] = {"tp": a.tp, "pp": a.pp, "cp": a.cp, "packed": a.packed, "backend": a.backend,
                             "precision": a.precision}
            atomic_write_json(a.out, res)
        torch.distributed.barrier()
    finally:
        lay.destroy()


if __name__ == "__main__":
    worker()

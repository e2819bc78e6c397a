"""``smd experiment``: the paper's comparison of correction modes, reproduced by one command.

Run it (CPU, the embedded default; each run is one ``smd train`` run in this process)::

    smd experiment compare --config configs/tiny-cpu.yaml --seeds 3 --out runs/compare --docs docs
    smd experiment compare --config configs/tiny-cpu.yaml --modes dense,smd --seeds 2 --ppo none --sweep none train.steps=10
    smd experiment report  --out runs/compare --docs docs          # re-render tables and plots only
    python -m megatron_smd.experiment golden --out tests/golden/replay_gap_tiny.json

``compare`` runs a matrix of *arms* on the same K seeds (``--seeds K``, default 3), one after
another from the same resolved config (:func:`~.run.plan_arms`):

- the main matrix: the five correction modes (``dense``, ``naive``, ``tis``, ``sparse_rl``, ``smd``);
  only ``algorithm.correction`` differs (``dense`` turns the rollout's compression off);
- the off-policy arms ``naive-ppo4x2`` and ``smd-ppo4x2`` (``--ppo EPOCHSxMINIBATCHES``, default
  4x2): several optimizer steps per rollout, where an uncorrected mismatch should hurt most;
- the ablation ``smd-nodistill`` (and ``smd-nodistill-ppo4x2``): smd with ``algorithm.distill.coef=0``,
  when the config's smd distils (``--no-ablation`` skips it): what the distillation term itself does;
- the budget sweep ``sweep-b25``, ``sweep-b50``, ``sweep-b100`` (``--sweep``, percentages of the
  prompt + completion length; ``--sweep-steps`` steps, one final eval): ``smd`` runs only, since an
  ``smd`` step logs both gaps of one compressed rollout -- its shadow learner's and the dense
  learner's (the one ``naive``/``tis``/``sparse_rl`` train with).

Seed index k shifts ``rollout.seed`` and ``learner.seed`` by k; ``task.seed`` stays, so the eval
prompts (and the training prompt stream) are the same for every arm and seed and the differences
between modes are paired on the same prompts. The SFT warm start is trained once and shared by every
arm and seed (the common starting point: the intervals are over the RL phase's randomness). In the
``smd`` runs of the main and off-policy arms the learner also logs the gradient norm of each loss
term (``train/grad_norm_ppo``, ``train/grad_norm_distill``; ``--no-term-grads`` turns it off).

Run ``seed<k>/<arm>`` writes under ``OUT/seed<k>/<arm>`` (the trainer's checkpoints, TensorBoard
logs and ``config.yaml``) and, when it has finished, ``run.json`` (resolved config, per-step
history, wall time). Re-running the same command therefore resumes the comparison: a run with
``run.json`` is not touched, an interrupted run continues from its newest checkpoint (``--resume
auto``), a run never started starts. Reusing a run directory with another config is refused.
``OUT/compare.json`` lists the arms and seeds (``"layout": 2``; a comparison directory written
before seeds existed, ``OUT/<mode>/run.json``, is still re-rendered by ``report``).

Then it writes ``OUT/results.json``, ``OUT/results.md`` and ``OUT/img/*.png`` (reward curves,
replay gap per step, gradient norm with smd's per-term norms, rollout KV memory: seed 0's curves;
the budget sweep with its intervals); with ``--docs DIR`` also ``DIR/results.md`` and
``DIR/img/*.png``. The table gives per arm the mean and 95% t-interval over seeds of the final and
best eval rewards (dense and compressed decoding), replay gap, gradient-norm variance with robust
companions (median, share of steps above 3x the median, variance of the log norm), rejection rate
and peak KV; then the paired differences ``smd - naive`` and ``smd - dense`` (per seed, with their
intervals), the sweep, and "what holds / what does not", each decided by a stated criterion from
those numbers (:func:`~.seeds.summarize_seeds`); nothing is typed by hand.

``golden`` regenerates the checked-in replay-gap golden file (see :func:`golden_replay_gaps` and
``tests/test_golden.py``).

Modules: :mod:`.run` (the arms, running and resuming them), :mod:`.stats` (one run's row),
:mod:`.seeds` (intervals, paired differences, sweep and findings over seeds), :mod:`.plots`,
:mod:`.report` (results files and the markdown page), :mod:`.golden`, and :mod:`.common` (modes,
file names, helpers). The command line is ``smd experiment`` in :mod:`megatron_smd.cli`;
``python -m megatron_smd.experiment`` runs the same command.
"""

from __future__ import annotations

from .common import IMG, MANIFEST, MODES, PLOTS, RESULTS_JSON, RESULTS_MD, RUN_FILE, WALL_FILE
from .golden import GOLDEN_METRICS, GOLDEN_POLICIES, GOLDEN_SETUP, golden_replay_gaps, tokens_digest, write_golden
from .plots import MODE_COLORS, MODE_STYLE, write_plots
from .report import render_markdown, render_markdown_seeds, render_summary, report
from .run import compare, plan_arms
from .seeds import interval, summarize_seeds
from .stats import FLOOR_FACTOR, REPLAY_TOL, SERIES_KEYS, findings, grad_norm_stats, summarize, summarize_mode

__all__ = ["FLOOR_FACTOR", "GOLDEN_METRICS", "GOLDEN_POLICIES", "GOLDEN_SETUP", "IMG", "MANIFEST", "MODES",
           "MODE_COLORS", "MODE_STYLE", "PLOTS", "REPLAY_TOL", "RESULTS_JSON", "RESULTS_MD", "RUN_FILE",
           "SERIES_KEYS", "WALL_FILE", "compare", "findings", "golden_replay_gaps", "grad_norm_stats", "interval", "plan_arms",
           "render_markdown", "render_markdown_seeds", "summarize_seeds",
           "render_summary", "report", "summarize", "summarize_mode", "tokens_digest", "write_golden",
           "write_plots"]

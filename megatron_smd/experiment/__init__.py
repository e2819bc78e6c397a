"""``smd experiment``: the paper's comparison of correction modes, reproduced by one command.

Run it (CPU, the embedded default; each mode is one ``smd train`` run)::

    smd experiment compare --config configs/tiny-cpu.yaml --out runs/compare --docs docs
    smd experiment compare --config configs/tiny-cpu.yaml --modes dense,smd train.steps=10
    smd experiment report  --out runs/compare --docs docs          # re-render tables and plots only
    python -m megatron_smd.experiment golden --out tests/golden/replay_gap_tiny.json

``compare`` trains the five correction modes (``dense``, ``naive``, ``tis``, ``sparse_rl``, ``smd``)
one after another from the same resolved config -- same seeds, data, SFT warm start, eviction
policy and step budget; only ``algorithm.correction`` differs (and ``dense`` turns the rollout's
compression off, which is what the mode means). Mode ``m`` writes its run under ``OUT/m`` (the
trainer's checkpoints, TensorBoard logs and ``config.yaml``) and, when it has finished,
``OUT/m/run.json`` (resolved config, per-step history, wall time). Re-running the same command
therefore resumes the comparison: a mode with ``run.json`` is not touched, an interrupted mode
continues from its newest checkpoint (``--resume auto``), a mode never started starts. Changing
the config under an existing ``OUT`` is refused (the modes would no longer share one setup).

Then it writes ``OUT/results.json``, ``OUT/results.md`` and ``OUT/img/*.png`` (reward curves,
replay gap per step on a log scale, gradient norm, rollout KV memory); with ``--docs DIR`` also
``DIR/results.md`` and ``DIR/img/*.png``. Every number on those pages is computed from the runs'
histories by :func:`summarize`; nothing is typed by hand.

``golden`` regenerates the checked-in replay-gap golden file (see :func:`golden_replay_gaps` and
``tests/test_golden.py``).

Modules: :mod:`.run` (running and resuming the modes), :mod:`.stats` (the table rows and findings),
:mod:`.plots`, :mod:`.report` (results files and the markdown page), :mod:`.golden`, and
:mod:`.common` (modes, file names, helpers). The command line is ``smd experiment`` in
:mod:`megatron_smd.cli`; ``python -m megatron_smd.experiment`` runs the same command.
"""

from __future__ import annotations

from .common import IMG, MANIFEST, MODES, PLOTS, RESULTS_JSON, RESULTS_MD, RUN_FILE, WALL_FILE
from .golden import GOLDEN_METRICS, GOLDEN_POLICIES, GOLDEN_SETUP, golden_replay_gaps, tokens_digest, write_golden
from .plots import MODE_COLORS, MODE_STYLE, write_plots
from .report import render_markdown, render_summary, report
from .run import compare
from .stats import FLOOR_FACTOR, REPLAY_TOL, SERIES_KEYS, findings, summarize, summarize_mode

__all__ = ["FLOOR_FACTOR", "GOLDEN_METRICS", "GOLDEN_POLICIES", "GOLDEN_SETUP", "IMG", "MANIFEST", "MODES",
           "MODE_COLORS", "MODE_STYLE", "PLOTS", "REPLAY_TOL", "RESULTS_JSON", "RESULTS_MD", "RUN_FILE",
           "SERIES_KEYS", "WALL_FILE", "compare", "findings", "golden_replay_gaps", "render_markdown",
           "render_summary", "report", "summarize", "summarize_mode", "tokens_digest", "write_golden",
           "write_plots"]

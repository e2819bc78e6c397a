"""What ``smd train`` shows on its progress bar: the eval rewards at the start (step 0, the warm
start) and now, and one summary line at the last step, printed just above the CLI's ``final:`` line."""

from __future__ import annotations

EVALS = (("eval_d", "reward/eval_dense"), ("eval_c", "reward/eval_compressed"))


def eval_postfix(history: list[dict], stats: dict, step: int) -> dict[str, str]:
    """``{"eval_d": "0.98->0.78", "eval_c": "0.33->0.65"}`` (start -> now); only "now" without a step-0 record."""
    s0 = history[0] if history and history[0].get("step") == 0 else {}
    return {n: (f"{s0[k]:.2f}->" if k in s0 and step > 0 else "") + f"{stats[k]:.2f}"
            for n, k in EVALS if k in stats}


def show(bar, history: list[dict], stats: dict, post: dict, step: int, last_step: int) -> None:
    """Set the bar's postfix (``post`` plus the evals), advance it and, at the last step, print the summary."""
    ev = eval_postfix(history, stats, step)
    bar.set_postfix({**post, **ev})
    if step > 0:
        bar.update(1)
    if step == last_step and "eval_c" in ev:
        bar.write(f"eval reward, step 0 -> {step}: dense {ev.get('eval_d', '?')}  compressed {ev['eval_c']}")

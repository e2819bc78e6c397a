"""The ``smd`` command line: every subcommand's arguments and handler, in one table (:data:`COMMANDS`).

    smd init-model --out DIR [--arch qwen2|llama] [--hidden-size N ...] [--seed S]
    smd init-model --config CFG [key=value ...]   (the config's model.path, created when missing)
    smd rollout    --config CFG [--out DIR] [key=value ...]
    smd replay     --rollouts DIR [--packed] [--json]
    smd sft        --config CFG [key=value ...]
    smd train      --config CFG [--resume auto|none|CKPT] [key=value ...]
    smd export-hf  CKPT OUT
    smd calibrate-kv --config CFG --out DIR [--model DIR] [--method auto|modelopt|reference] [key=value ...]
    smd plan       --config CFG [--json | --shell] [key=value ...]
    smd experiment compare --config CFG [--out DIR] [--modes a,b] [--seeds K] [--ppo ExM|none]
                           [--sweep P,P,..|none] [--sweep-steps N] [--no-ablation] [--no-term-grads] [--docs DIR] [key=value ...]
    smd experiment report  --out DIR [--docs DIR]
    smd experiment golden  --out FILE
    smd bench      rollout|attention|sync|all [--quick] [--threads N] [--json]

``python -m megatron_smd.plan ...`` (what the launch scripts run) and ``python -m
megatron_smd.experiment ...`` are ``smd plan ...`` and ``smd experiment ...`` under the module's
name (:func:`run`): the same arguments and handlers.

User errors (bad config, malformed files, invalid masks) print ``error: ...`` and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Callable

from .errors import ConfigError, SMDError


def _cmd_init_model(a) -> int:
    from .model.tiny import init_model_dir

    if a.config:  # the config's model.path, created from its model.init when missing (launchers)
        from .config import load_config
        from .rollout.run import ensure_model

        if a.out:
            raise SMDError("smd init-model: give --out or --config, not both")
        print(ensure_model(load_config(a.config, a.overrides).model))
        return 0
    if not a.out or a.overrides:
        raise SMDError("smd init-model: --out DIR is required (or --config CFG [key=value ...])")

    kw = {k: v for k, v in dict(hidden_size=a.hidden_size, num_layers=a.num_layers, num_heads=a.num_heads,
                                 num_kv_heads=a.num_kv_heads, intermediate_size=a.intermediate_size).items()
          if v is not None}
    if a.tie_word_embeddings is not None:
        kw["tie_word_embeddings"] = a.tie_word_embeddings == "true"
    path = init_model_dir(a.out, a.arch, seed=a.seed, **kw)
    print(f"wrote {path}")
    return 0


def _cmd_rollout(a) -> int:
    from pathlib import Path

    from .config import apply_cpu_threads, check_runnable, dump_config, load_config
    from .rollout.run import ensure_model, run_rollout

    cfg = load_config(a.config, a.overrides)
    check_runnable(cfg, "rollout", ensure_model(cfg.model))
    apply_cpu_threads(cfg)
    out = Path(a.out or Path(cfg.output_dir) / "rollout")
    batch = run_rollout(cfg, out)
    dump_config(cfg, out / "config.yaml")
    st = batch.meta["stats"]
    rw = batch.meta["rewards"]
    kv = (f"peak KV {st['peak_kv_bytes'] / 2**20:.2f} MiB" if cfg.rollout.backend == "reference"
          else f"on {', '.join(cfg.rollout.sglang_urls)}")
    print(f"wrote {len(batch)} trajectories to {out}  (backend={cfg.rollout.backend}, "
          f"policy={cfg.rollout.policy.name}, {kv}, {st['tokens_per_s']:.0f} tok/s, "
          f"mean reward {sum(rw) / len(rw):.3f})")
    return 0


def _cmd_replay(a) -> int:
    from .replay import replay_megatron, replay_torch
    from .rollout.io import load_rollouts

    if a.learner != "torch":
        res = replay_megatron(a.rollouts, tp=a.tp, pp=a.pp, cp=a.cp, packed=a.packed, backend=a.backend,
                              model_dir=a.model)
    else:
        batch = load_rollouts(a.rollouts)
        res = replay_torch(batch, a.model, packed=a.packed)
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        for mode, m in res.items():
            print(f"{mode:>7}: max|dlogp|={m['max_abs_logprob_diff']:.3e}  mean KL={m['mean_kl']:.3e}  "
                  f"({m['num_tokens']} tokens)")
    return 0


def _cmd_train(a) -> int:
    from .config import load_config
    from .trainer import install_signal_handlers, train

    cfg = load_config(a.config, a.overrides)
    install_signal_handlers()
    try:
        res = train(cfg, resume=a.resume)
    except KeyboardInterrupt as e:
        from .checkpoint import complete_checkpoints
        from pathlib import Path

        done = complete_checkpoints(Path(cfg.output_dir) / "checkpoints")
        last = str(done[-1]) if done else "none yet"
        print(f"\ninterrupted ({e or 'Ctrl-C'}): steps after the last checkpoint are lost; last checkpoint: {last}. "
              f"Continue with: smd train --config {a.config} --resume auto", file=sys.stderr)
        return 130
    fin = res.get("final") or {}
    if fin:
        keys = [k for k in ("reward/train", "reward/eval_dense", "reward/eval_compressed",
                            "mismatch/max_abs_logprob_diff") if k in fin]
        print("final: " + "  ".join(f"{k}={fin[k]:.4g}" for k in keys))
        print(f"TensorBoard logs: {cfg.output_dir}/tensorboard  (view: tensorboard --logdir {cfg.output_dir}/tensorboard)")
    return 0


def _cmd_sft(a) -> int:
    from pathlib import Path

    from .config import load_config
    from .model.hf import read_arch
    from .sft import run_sft
    from .trainer import ensure_model_once, init_layout

    cfg = load_config(a.config, a.overrides)
    model_dir = ensure_model_once(cfg)
    layout = init_layout(cfg, read_arch(model_dir))
    try:
        res = run_sft(cfg, layout, Path(model_dir), Path(cfg.sft.out))
        rank = layout.rank
    finally:
        layout.destroy()
    if rank == 0:
        print(f"wrote {cfg.sft.out} (eval reward {res['final_eval_reward']:.3f}, {res['seconds']:.0f}s)")
    return 0


def _cmd_export_hf(a) -> int:
    from .export import export_hf

    out = export_hf(a.ckpt, a.out)
    print(f"wrote {out}")
    return 0


def _cmd_calibrate_kv(a) -> int:
    from pathlib import Path

    from .config import load_config
    from .quant.calibrate import SCALES_FILE, calibrate_kv

    cfg = load_config(a.config, a.overrides)
    model_dir = a.model
    if model_dir is None and cfg.sft.enabled:  # the weights the run starts from: the SFT warm start
        model_dir = cfg.sft.out
        if not (Path(model_dir) / "config.json").is_file():
            raise SMDError(f"smd calibrate-kv: the run starts from the SFT warm start sft.out={model_dir}, which does "
                           f"not exist yet: run `smd sft --config {a.config}` first, or pass --model DIR")
    s = calibrate_kv(cfg, a.out, model_dir=model_dir, kv_cache_dtype=a.kv_cache_dtype, method=a.method,
                     num_prompts=a.num_prompts, seed=a.seed, power_of_two=not a.no_power_of_two,
                     clamp_to_one=a.clamp_to_one, weights_version=a.weights_version, tp_size=a.tp_size)
    c = s.config
    print(f"wrote {Path(a.out) / SCALES_FILE} ({c.dtype}, {c.num_layers} layers, method {s.calibration['method']}, "
          f"{s.calibration['num_tokens']} tokens; weights {s.weights_fingerprint[:23]}...)")
    for i, (k, v) in enumerate(zip(c.k_scales, c.v_scales)):
        print(f"  layer {i:>3}: k_scale {k:.6g}  v_scale {v:.6g}")
    print(f"use it: rollout.kv_cache_dtype={c.dtype} rollout.kv_scales={Path(a.out) / SCALES_FILE}")
    return 0


def _cmd_bench(a) -> int:
    if a.threads is None:
        return _bench(a)
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(a.threads)
    try:
        return _bench(a)
    finally:
        torch.set_num_threads(old)


def _flat_lines(obj, prefix: str = "") -> list[str]:
    """A nested benchmark report as ``dotted.key  value`` lines (the human-readable form)."""
    if isinstance(obj, dict):
        return [line for k, v in obj.items() for line in _flat_lines(v, f"{prefix}{k}.")]
    if isinstance(obj, (list, tuple)) and obj and all(isinstance(v, dict) for v in obj):
        return [line for i, v in enumerate(obj) for line in _flat_lines(v, f"{prefix}{i}.")]
    value = f"{obj:.4g}" if isinstance(obj, float) else str(obj)
    return [f"{prefix[:-1]:<56} {value}"]


def _bench(a) -> int:
    if a.quick and a.what != "all":
        raise SMDError(f"smd bench {a.what}: --quick applies to 'smd bench all' only")
    if a.backend != "reference" and a.what != "rollout":
        raise SMDError(f"smd bench {a.what}: --backend applies to 'smd bench rollout' only")
    if a.what == "rollout" and a.backend == "sglang":
        from sglang_patch.bench import bench_rollout_sglang

        res = bench_rollout_sglang(log=lambda *m: print(*m, file=sys.stderr))
    elif a.what == "rollout":
        from .bench.rollout import bench_rollout

        res = bench_rollout()
    elif a.what == "attention":
        from .bench.attention import run_attention_bench

        res = run_attention_bench()
    elif a.what == "sync":
        from .bench.sync import bench_sync

        res = bench_sync()
    else:
        from .bench.all import bench_all, format_table

        res = bench_all(quick=a.quick)
        if not a.json:
            print(format_table(res))
            return 0
    print(json.dumps(res, indent=2) if a.json else "\n".join(_flat_lines(res)))
    return 0


def _cmd_plan(a) -> int:
    from .config import load_config
    from .plan import format_plan, format_shell, launch_vars, plan

    cfg = load_config(a.config, a.overrides)
    if a.shell:
        print(format_shell(launch_vars(cfg)))
        return 0
    d = plan(cfg)
    print(json.dumps(d, indent=2) if a.json else format_plan(d))
    return 0


def _cmd_experiment_compare(a) -> int:
    from pathlib import Path

    from .experiment import IMG, RESULTS_JSON, RESULTS_MD, compare, render_summary
    from .trainer import install_signal_handlers

    install_signal_handlers()
    try:
        res = compare(a.config, a.out, a.modes, a.overrides, docs=a.docs, seeds=a.seeds, ppo=_ppo_arg(a.ppo),
                      sweep=_sweep_arg(a.sweep), sweep_steps=a.sweep_steps, term_grads=not a.no_term_grads,
                      ablation=not a.no_ablation)
    except KeyboardInterrupt as e:
        print(f"\ninterrupted ({e or 'Ctrl-C'}): finished modes are kept, the current one resumes from its last "
              f"checkpoint. Continue with the same command.", file=sys.stderr)
        return 130
    if res:
        out = Path(res["out"])
        print(render_summary(res))
        print(f"wrote {out / RESULTS_MD}, {out / RESULTS_JSON} and {out / IMG}/*.png"
              + (f"; and {Path(a.docs) / RESULTS_MD}" if a.docs else ""))
    return 0


def _ppo_arg(v: str) -> tuple[int, int] | None:
    if v.lower() == "none":
        return None
    try:
        e, m = (int(x) for x in v.lower().split("x"))
        assert e >= 1 and m >= 1
    except (ValueError, AssertionError):
        raise ConfigError(f"command line: --ppo {v!r}: expected EPOCHSxMINIBATCHES (e.g. 4x2) or none") from None
    return e, m


def _sweep_arg(v: str) -> tuple[float, ...]:
    if v.lower() == "none":
        return ()
    try:
        fr = tuple(float(x) / 100 for x in v.split(",") if x)
        assert fr and all(0 < f <= 1 for f in fr)
    except (ValueError, AssertionError):
        raise ConfigError(f"command line: --sweep {v!r}: expected budget percentages in (0, 100], e.g. 25,50,100, "
                          "or none") from None
    return fr


def _cmd_experiment_report(a) -> int:
    from .experiment import render_summary, report

    res = report(a.out, docs=a.docs)
    print(render_summary(res))
    return 0


def _cmd_experiment_golden(a) -> int:
    from .experiment import write_golden

    res = write_golden(a.out)
    for name, r in res["policies"].items():
        print(f"{name:>10}: dense {r['dense']['max_abs_logprob_diff']:.3e}  shadow {r['shadow']['max_abs_logprob_diff']:.3e}")
    print(f"wrote {a.out}")
    return 0


# ------------------------------------------------------------------------------------ arguments
def _overrides(s: argparse.ArgumentParser, help: str = "key=value config overrides") -> None:
    s.add_argument("overrides", nargs="*", help=help)


def _args_init_model(s: argparse.ArgumentParser) -> None:
    s.add_argument("--out")
    s.add_argument("--config", help="instead of --out: make sure the config's model.path exists "
                   "(created from model.init when missing) and print it")
    _overrides(s, "key=value config overrides (with --config)")
    s.add_argument("--arch", choices=["qwen2", "llama"], default="qwen2")
    s.add_argument("--hidden-size", type=int)
    s.add_argument("--num-layers", type=int)
    s.add_argument("--num-heads", type=int)
    s.add_argument("--num-kv-heads", type=int)
    s.add_argument("--intermediate-size", type=int)
    s.add_argument("--tie-word-embeddings", choices=["true", "false"])
    s.add_argument("--seed", type=int, default=0)


def _args_rollout(s: argparse.ArgumentParser) -> None:
    s.add_argument("--config", required=True)
    s.add_argument("--out")
    _overrides(s)


def _args_replay(s: argparse.ArgumentParser) -> None:
    s.add_argument("--rollouts", required=True)
    s.add_argument("--learner", choices=["torch", "megatron"], default="torch")
    s.add_argument("--model", help="model directory (default: meta.json's model_path)")
    s.add_argument("--tp", type=int, default=1)
    s.add_argument("--pp", type=int, default=1)
    s.add_argument("--cp", type=int, default=1)
    s.add_argument("--backend", choices=["sdpa", "flex", "te"], default="sdpa")
    s.add_argument("--packed", action="store_true", help="pack all trajectories into one row (THD style)")
    s.add_argument("--json", action="store_true")


def _args_config(s: argparse.ArgumentParser) -> None:
    s.add_argument("--config", required=True)
    _overrides(s)


def _args_train(s: argparse.ArgumentParser) -> None:
    s.add_argument("--config", required=True)
    s.add_argument("--resume", default="auto", help="auto (newest complete checkpoint, if any), none, or a checkpoint dir")
    _overrides(s)


def _args_export_hf(s: argparse.ArgumentParser) -> None:
    s.add_argument("ckpt")
    s.add_argument("out")


def _args_calibrate_kv(s: argparse.ArgumentParser) -> None:
    s.add_argument("--config", required=True)
    s.add_argument("--out", required=True, help="directory for kv_scales.json (+ kv_scales.safetensors, "
                   "kv_cache_scales.json)")
    s.add_argument("--model", help="weights to calibrate (default: the run's starting weights, sft.out when "
                   "sft.enabled, else model.path)")
    s.add_argument("--method", choices=["auto", "modelopt", "reference"], default="auto",
                   help="auto: nvidia-modelopt when it imports, else the project's own model")
    s.add_argument("--kv-cache-dtype", choices=["fp8_e4m3", "fp8_e5m2"],
                   help="default: rollout.kv_cache_dtype when FP8, else fp8_e4m3")
    s.add_argument("--num-prompts", type=int, default=64, help="task examples (prompt + reference answer)")
    s.add_argument("--seed", type=int, help="task sampling seed (default: task.seed)")
    s.add_argument("--weights-version", help="a tag recorded next to the weights' fingerprint (e.g. the step)")
    s.add_argument("--no-power-of-two", action="store_true", help="keep amax / fp8_max as is (default: rounded up "
                   "to a power of two, exact under every SGLang division rule)")
    s.add_argument("--clamp-to-one", action="store_true", help="scales of at least 1.0 (modelopt's TRT-LLM rule)")
    s.add_argument("--tp-size", type=int, default=1, help="attention-TP size in SGLang's kv_cache_scales.json")
    _overrides(s)


def _args_plan(s: argparse.ArgumentParser) -> None:
    s.add_argument("--config", required=True)
    s.add_argument("--json", action="store_true", help="print the plan as JSON")
    s.add_argument("--shell", action="store_true", help="print the launch variables as bash assignments")
    _overrides(s)


def _args_experiment_compare(s: argparse.ArgumentParser) -> None:
    from .experiment.common import MODES

    s.add_argument("--config", required=True)
    s.add_argument("--out", help="comparison directory (default: <output_dir>/compare)")
    s.add_argument("--modes", help=f"comma-separated subset of {','.join(MODES)} (default: all)")
    s.add_argument("--docs", help="also write DOCS/results.md and DOCS/img/*.png")
    s.add_argument("--seeds", type=int, default=3, help="K: every arm runs on the same K seeds (default 3)")
    s.add_argument("--ppo", default="4x2", help="EPOCHSxMINIBATCHES of the off-policy arms of naive and smd "
                   "(default 4x2; none: no such arms)")
    s.add_argument("--sweep", default="25,50,100", help="budget sweep of smd runs, in %% of prompt + completion length "
                   "(default 25,50,100; none: no sweep)")
    s.add_argument("--sweep-steps", type=int, default=10, help="steps of each budget-sweep run (default 10)")
    s.add_argument("--no-ablation", action="store_true", help="do not run smd without its distillation term "
                   "(arms smd-nodistill[-ppoExM])")
    s.add_argument("--no-term-grads", action="store_true", help="do not log smd's per-term gradient norms (PPO vs "
                   "distillation; they cost one extra backward per term)")
    _overrides(s, "key=value config overrides (applied to every run)")


def _args_experiment_report(s: argparse.ArgumentParser) -> None:
    s.add_argument("--out", required=True)
    s.add_argument("--docs")


def _args_experiment_golden(s: argparse.ArgumentParser) -> None:
    s.add_argument("--out", required=True)


def _args_bench(s: argparse.ArgumentParser) -> None:
    s.add_argument("what", choices=["rollout", "attention", "sync", "all"])
    s.add_argument("--quick", action="store_true", help="bench all: smaller sizes (a smoke run)")
    s.add_argument("--backend", choices=["reference", "sglang"], default="reference",
                   help="bench rollout: the in-process reference engine, or real SGLang servers on this machine "
                        "(unpatched, patched 'none', each evicting policy at a 25%% budget; minutes on a CPU)")
    s.add_argument("--threads", type=int, help="torch intra-op threads for the run (default: torch's own setting)")
    s.add_argument("--json", action="store_true", help="the report as JSON (default: a table for 'all', "
                   "'key value' lines for one benchmark)")


# ------------------------------------------------------------------------------------ the table
@dataclass(frozen=True)
class Command:
    """One subcommand: its name, help line, arguments and handler, or subcommands of its own."""

    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None] | None = None
    handler: Callable[[argparse.Namespace], int] | None = None
    subcommands: tuple[Command, ...] = ()

    def build(self, p: argparse.ArgumentParser) -> None:
        """Give ``p`` this command's arguments and handler (``fn``), or its subcommands."""
        if self.arguments is not None:
            self.arguments(p)
        if self.handler is not None:
            p.set_defaults(fn=self.handler)
        if self.subcommands:
            sub = p.add_subparsers(dest=f"{self.name.replace('-', '_')}_cmd", required=True)
            for c in self.subcommands:
                c.build(sub.add_parser(c.name, help=c.help))


COMMANDS: tuple[Command, ...] = (
    Command("init-model", "write a tiny random Qwen2/Llama model in Hugging Face format",
            _args_init_model, _cmd_init_model),
    Command("rollout", "sample the configured task with KV eviction and export shadow masks",
            _args_rollout, _cmd_rollout),
    Command("replay", "replay a rollout with a learner; report the log-prob gap per learner mode",
            _args_replay, _cmd_replay),
    Command("sft", "supervised warm start on the task (Megatron learner); writes sft.out", _args_config, _cmd_sft),
    Command("train", "GRPO with a Megatron learner and a compressed-KV rollout engine", _args_train, _cmd_train),
    Command("export-hf", "write a Hugging Face model directory from a training checkpoint",
            _args_export_hf, _cmd_export_hf),
    Command("calibrate-kv", "per-layer FP8 KV-cache scales with nvidia-modelopt (rollout.kv_scales)",
            _args_calibrate_kv, _cmd_calibrate_kv),
    Command("plan", "per-GPU memory of the learner and the rollout for a config", _args_plan, _cmd_plan),
    Command("experiment", "the correction-mode comparison (results, plots) and golden files", subcommands=(
        Command("compare", "train the five correction modes with one config; write results and plots",
                _args_experiment_compare, _cmd_experiment_compare),
        Command("report", "re-render results.{md,json} and plots from a finished comparison",
                _args_experiment_report, _cmd_experiment_report),
        Command("golden", "regenerate the replay-gap golden file (tests/golden/replay_gap_tiny.json)",
                _args_experiment_golden, _cmd_experiment_golden),
    )),
    Command("bench", "benchmarks (ratios measured side by side in one run)", _args_bench, _cmd_bench),
)


def command(name: str) -> Command:
    for c in COMMANDS:
        if c.name == name:
            return c
    raise KeyError(f"no smd command {name!r} (commands: {', '.join(c.name for c in COMMANDS)})")


def add_cli(subparsers, *names: str) -> None:
    """Add the commands ``names`` (default: all of them) to an ``add_subparsers()`` object."""
    for c in (command(n) for n in names) if names else COMMANDS:
        c.build(subparsers.add_parser(c.name, help=c.help))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smd", description="Shadow Mask Distillation: on-policy RL with a compressed rollout KV cache")
    add_cli(p.add_subparsers(dest="cmd", required=True))
    return p


def _quiet_expected_warnings() -> None:
    """Megatron warns at import that Apex / Transformer Engine are absent; on CPU that is the plan."""
    import warnings

    for pat in (".*Apex is not installed.*", ".*Transformer Engine and Apex are not installed.*",
                ".*Transformer Engine is not installed.*"):
        warnings.filterwarnings("ignore", message=pat)


def _dispatch(args: argparse.Namespace) -> int:
    try:
        return args.fn(args)
    except SMDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    _quiet_expected_warnings()
    return _dispatch(build_parser().parse_args(argv))


def run(name: str, argv: list[str] | None = None, *, prog: str | None = None) -> int:
    """``smd NAME ...`` as a program of its own (``python -m megatron_smd.NAME``): the command's
    arguments at the top level, the same handler and exit codes."""
    _quiet_expected_warnings()
    c = command(name)
    p = argparse.ArgumentParser(prog=prog or f"smd {name}", description=c.help)
    c.build(p)
    return _dispatch(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

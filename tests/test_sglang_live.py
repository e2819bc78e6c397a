"""The patched SGLang server, for real: live CPU server processes on 127.0.0.1, one per policy.

Every server is ``python -m sglang_patch.launch_server --device cpu`` (the launcher supplies the CPU
settings) on a tiny random Qwen2 written by the project; they start concurrently once for the
module and are stopped by their own PIDs at the end. Sizes: 24-token prompts, 40 new tokens,
GRPO groups of n=4 through SGLang's own parallel sampling, budget 16 tokens per layer (25% of 64).

Checked, with numbers against independent references:

* every policy generates through SGLang's radix cache and parallel sampling, every returned mask
  validates, and the torch learner replays SGLang's sampled-token log-probs at <= 1e-5 (fp32) under
  the mask while its dense forward is off by > 1e-3 for the evicting policies;
* the Megatron learner at TP=2 (gloo, torchrun) replays every policy's trajectories at <= 1e-5;
* concurrent clients, ``/health`` probes in between, a request aborted mid-generation and 100+
  requests on one server: no error, every mask valid and replayable, and after every batch the
  pools are back to idle (free + tree-cached slots = pool, every request row free, no bookkeeping
  left: no slot or row leak);
* the launcher refuses, at start and naming the flag, what the hooks cannot honour.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

sglang_spec = pytest.importorskip("sglang", reason="sglang is not installed (README test command installs it)")

from megatron_smd.mask import validate_evict  # noqa: E402
from megatron_smd.model.hf import read_arch  # noqa: E402
from megatron_smd.model.transformer import RefTransformer  # noqa: E402
from megatron_smd.replay import gap_metrics, torch_replay_logprobs  # noqa: E402
from megatron_smd.rollout.engine import SamplingParams  # noqa: E402
from megatron_smd.rollout.io import RolloutBatch, save_rollouts  # noqa: E402
from megatron_smd.rollout.sglang_client import SGLangClient  # noqa: E402
from sglang_patch.server_process import PatchedServer, start_all, stop_all  # noqa: E402

pytestmark = pytest.mark.slow

TOL = 1e-5
PROMPT, NEW, GROUP, BUDGET = 24, 40, 4, 16
POLICY_ARGS = {
    "none": [],
    "streaming": ["--smd-budget", str(BUDGET), "--smd-sinks", "4"],
    "h2o": ["--smd-budget", str(BUDGET), "--smd-window", "4"],
    "snapkv": ["--smd-budget", str(BUDGET), "--smd-window", "4"],
    "rkv": ["--smd-budget", str(BUDGET), "--smd-window", "4", "--smd-buffer", "8"],
}
POLICIES = list(POLICY_ARGS)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from megatron_smd.model.tiny import init_model_dir

    return init_model_dir(tmp_path_factory.mktemp("sglang-live") / "tiny-qwen2", "qwen2", seed=0)


@pytest.fixture(scope="module")
def servers(model_dir, tmp_path_factory):
    """One patched server per policy, started concurrently, stopped by PID at the end."""
    logs = tmp_path_factory.mktemp("sglang-logs")
    srvs = {p: PatchedServer(model_dir, ["--smd-policy", p, *a, "--skip-tokenizer-init"],
                             log_path=logs / f"{p}.log", start_timeout_s=400) for p, a in POLICY_ARGS.items()}
    try:
        start_all(srvs.values())
        print("\nstart-up seconds (5 servers at once on this machine): "
              + ", ".join(f"{p} {s.startup_s:.1f}" for p, s in srvs.items()))
        yield srvs
    finally:
        stop_all(srvs.values())


@pytest.fixture(scope="module")
def ref_model(model_dir):
    return RefTransformer.from_pretrained(model_dir)  # the learner reference, fp32


def _prompts(vocab: int, k: int, seed: int, lengths=(PROMPT,)) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(k)]


def assert_idle(srv: PatchedServer, where: str) -> dict:
    """Pools back to their idle values: every slot free or cached in the tree, every row free,
    and the patch holds no per-request state. Per-layer pools: every layer's free count is back
    to ``total - cached`` (each layer stores exactly the radix tree's tokens), every logical id
    free or cached, the pool's own consistency check clean."""
    st = srv.pool_state()
    assert st["free_slots"] + st["evictable_slots"] == st["total_slots"], (where, st)
    assert st["protected_slots"] == 0 and st["free_rows"] == st["total_rows"], (where, st)
    for k in ("managed_requests", "rows", "prompt_groups", "pending_exports", "released_early_pending",
              "prefill_captures", "open_decode_step"):
        assert st.get(k, 0) == 0, (where, k, st)
    assert st["free_per_layer"] == [st["total_slots"] - st["evictable_slots"]] * st["num_layers"], (where, st)
    if st["kv_layout"] == "per_layer":
        assert st["logical_free"] + st["evictable_slots"] == st["logical_slots"], (where, st)
        assert st["pool_errors"] == [], (where, st["pool_errors"])
    assert st["retractions"] == 0, (where, st)
    return st


def _flush(srv: PatchedServer) -> None:
    """Empty the radix cache (idle server): pool counters then see only what a request holds."""
    req = urllib.request.Request(srv.url + "/flush_cache", data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        r.read()


def _peak_of(srv: PatchedServer, body: dict) -> tuple[dict, list]:
    """Flush, send ``body`` to ``/generate``, return the pool counters of that window and the reply."""
    _flush(srv)
    srv.pool_state()  # starts a new peak window
    req = urllib.request.Request(srv.url + "/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        out = json.loads(r.read())
    return srv.pool_state(), out


def _replay(model, trajs) -> dict:
    batch = RolloutBatch.from_trajectories(trajs, {"sampling": {"temperature": 1.0}})
    return {m: gap_metrics(torch_replay_logprobs(model, batch, m), batch) for m in ("shadow", "dense")}


_SAMPLED: dict[str, list] = {}


@pytest.mark.parametrize("policy", POLICIES)
def test_grpo_group_generates_and_replays_exactly(servers, model_dir, ref_model, policy):
    arch = read_arch(model_dir)
    srv = servers[policy]
    client = SGLangClient([srv.url], arch.num_layers, timeout_s=120)
    trajs, stats = client.generate(_prompts(arch.vocab_size, 2, seed=1), n=GROUP,
                                   sampling=SamplingParams(max_new_tokens=NEW, temperature=1.0))
    assert len(trajs) == 2 * GROUP and stats.generated_tokens > 0
    for t in trajs:
        validate_evict(t.evict, seq_end=t.seq_len, num_layers=arch.num_layers)
    # the group shared its prompt: SGLang prefilled it once and the samples differ
    assert len({tuple(t.tokens) for t in trajs[:GROUP]}) > 1
    assert all(x["prompt_state"] == "shared" for x in client.last_export_info)
    gaps = _replay(ref_model, trajs)
    print(f"\n{policy}: torch learner replay max|dlogp| shadow {gaps['shadow']['max_abs_logprob_diff']:.2e}, "
          f"dense {gaps['dense']['max_abs_logprob_diff']:.2e} over {gaps['shadow']['num_tokens']} tokens")
    assert gaps["shadow"]["max_abs_logprob_diff"] <= TOL
    if policy != "none":
        assert any(bool((t.evict < t.seq_len).any()) for t in trajs), f"{policy} evicted nothing"
        assert gaps["dense"]["max_abs_logprob_diff"] > 1e-3
    assert_idle(srv, f"after the {policy} group")
    _SAMPLED[policy] = trajs


@pytest.mark.parametrize("policy", POLICIES)
def test_plan_kv_figures_equal_the_server_allocation(servers, model_dir, policy):
    """One request (prompt 24, 40 new tokens, no prefix shared): the most K/V slots each layer of
    the server's pool held equals ``kv_budget.request_peak_tokens`` (what ``smd plan`` charges per
    request), in every layer, and its bytes ``kv_budget.request_kv_bytes``; the pool's K/V bytes are
    ``kv_budget.pool_kv_bytes`` of its slots per layer (the dense pool's, for every policy)."""
    from megatron_smd import kv_budget
    from megatron_smd.policies import PolicyConfig

    arch = read_arch(model_dir)
    srv = servers[policy]
    cfg = PolicyConfig(name=policy, **{k.removeprefix("--smd-").replace("-", "_"): int(v)
                                        for k, v in zip(POLICY_ARGS[policy][::2], POLICY_ARGS[policy][1::2])})
    body = {"input_ids": _prompts(arch.vocab_size, 1, seed=7)[0], "return_logprob": True,
            "sampling_params": {"max_new_tokens": NEW, "temperature": 1.0, "ignore_eos": True}}
    st, out = _peak_of(srv, body)
    assert len(out["output_ids"]) == NEW
    want = kv_budget.request_peak_tokens(cfg, PROMPT, NEW)
    print(f"\n{policy}: server peak {st['window_peak_used_slots_layer']} slots per layer "
          f"({st['window_peak_used_slots_total'] * st['slot_bytes']} B), plan {want} "
          f"({kv_budget.request_kv_bytes(arch, cfg, PROMPT, NEW, 4)} B)")
    assert st["window_peak_used_slots_layer"] == want
    assert st["window_peak_used_slots_total"] == want * arch.num_layers  # the same count in every layer
    assert st["window_peak_used_slots_total"] * st["slot_bytes"] == kv_budget.request_kv_bytes(arch, cfg, PROMPT,
                                                                                                 NEW, 4)
    assert st["slot_bytes"] == kv_budget.slot_layer_bytes(arch.num_kv_heads, arch.head_dim, 4)
    assert st["pool_kv_bytes"] == kv_budget.pool_kv_bytes(st["total_slots"], arch.num_layers, arch.num_kv_heads,
                                                          arch.head_dim, 4)
    assert st["kv_layout"] == ("dense" if policy == "none" else "per_layer")
    assert_idle(srv, f"after the {policy} plan check")


@pytest.mark.parametrize("policy", ["none", "h2o", "snapkv"])
def test_grpo_group_prompt_is_stored_once_per_layer(servers, model_dir, policy):
    """A group of 4 samples of one 24-token prompt (SGLang's parallel sampling): each layer holds the
    prompt once plus one token per sample at the most, not 4 prompts."""
    arch = read_arch(model_dir)
    srv = servers[policy]
    body = {"input_ids": _prompts(arch.vocab_size, 1, seed=11)[0], "return_logprob": True,
            "sampling_params": {"max_new_tokens": 2, "temperature": 1.0, "ignore_eos": True, "n": GROUP}}
    st, out = _peak_of(srv, body)
    assert len(out) == GROUP
    peak = st["window_peak_used_slots_layer"]
    print(f"\n{policy}: group of {GROUP} x {PROMPT}-token prompt, peak {peak} slots per layer")
    assert PROMPT <= peak <= PROMPT + GROUP, st
    assert st["window_peak_used_slots_total"] <= (PROMPT + GROUP) * arch.num_layers
    assert_idle(srv, f"after the {policy} group")


def test_megatron_tp2_replays_sglang_rollouts(servers, model_dir, tmp_path):
    from megatron_smd.replay import replay_megatron

    missing = [p for p in POLICIES if p not in _SAMPLED]
    if missing:
        pytest.skip(f"the per-policy generation tests did not run for {missing}")
    trajs = [t for p in POLICIES for t in _SAMPLED[p]]
    arch = read_arch(model_dir)
    meta = {"model_path": str(model_dir), "num_layers": arch.num_layers, "num_kv_heads": arch.num_kv_heads,
            "sampling": {"temperature": 1.0}, "rewards": [0.0] * len(trajs)}
    save_rollouts(tmp_path / "rollouts", RolloutBatch.from_trajectories(trajs, meta))
    res = replay_megatron(tmp_path / "rollouts", tp=2)
    print(f"\nmegatron TP=2 replay of {len(trajs)} SGLang trajectories (5 policies): shadow max|dlogp| "
          f"{res['shadow']['max_abs_logprob_diff']:.2e}, dense {res['dense']['max_abs_logprob_diff']:.2e}")
    assert res["shadow"]["max_abs_logprob_diff"] <= TOL
    assert res["dense"]["max_abs_logprob_diff"] > 1e-3


def _abort_midway(srv: PatchedServer, vocab: int) -> dict:
    """A long request aborted through ``/abort_request`` once it is decoding; returns its reply."""
    rid = f"smd-abort-{time.monotonic_ns()}"
    body = {"rid": rid, "input_ids": _prompts(vocab, 1, seed=99)[0], "return_logprob": True,
            "sampling_params": {"max_new_tokens": 3000, "temperature": 1.0, "ignore_eos": True}}
    out: dict = {}

    def send():
        req = urllib.request.Request(srv.url + "/generate", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                out["reply"] = json.loads(r.read())
        except Exception as e:  # an aborted request may answer with an error status
            out["error"] = repr(e)

    t = threading.Thread(target=send, daemon=True)
    t.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and srv.pool_state()["managed_requests"] == 0:
        time.sleep(0.05)
    time.sleep(0.3)  # some decode steps under eviction
    req = urllib.request.Request(srv.url + "/abort_request", data=json.dumps({"rid": rid}).encode(),
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=30).read()
    t.join(90)
    assert not t.is_alive(), "the aborted request never answered"
    return out


def test_load_4_clients_x_200_requests_with_health_probes_and_an_abort(servers, model_dir, ref_model):
    """h2o server: 4 concurrent clients x 200 requests of mixed prompt and completion lengths (half
    of them GRPO groups), /health probes and pool checks between rounds, an abort mid-way: no error,
    no slot or row leak (free counts back to idle after every round), every mask valid."""
    arch = read_arch(model_dir)
    srv = servers["h2o"]
    idle0 = assert_idle(srv, "before the load")
    clients = [SGLangClient([srv.url], arch.num_layers, timeout_s=120) for _ in range(4)]
    per_client = [0] * 4
    checked, t0, rounds = [], time.monotonic(), 10
    for rnd in range(rounds):  # 4 clients x 20 requests a round
        assert time.monotonic() - t0 < 600, f"load test past its time bound after {rnd} rounds"
        jobs = []
        for ci in range(4):
            n = GROUP if (rnd + ci) % 2 == 0 else 1
            prompts = _prompts(arch.vocab_size, 20, seed=1000 * rnd + ci, lengths=(8, 17, PROMPT, 31, 40, 12))
            jobs.append((clients[ci], prompts, n, 4 + 5 * ((rnd + ci) % 5)))
        with ThreadPoolExecutor(4) as ex:
            futs = [ex.submit(c.generate, p, n, SamplingParams(max_new_tokens=m, temperature=1.0))
                    for c, p, n, m in jobs]
            results = [f.result(timeout=300) for f in futs]
        for ci, ((trajs, _), (_, p, n, _)) in enumerate(zip(results, jobs)):
            per_client[ci] += len(p)
            assert len(trajs) == len(p) * n
            for t in trajs:
                validate_evict(t.evict, seq_end=t.seq_len, num_layers=arch.num_layers)
            checked.extend(trajs)
        assert srv.healthy(timeout_s=30)  # a /health probe is a one-token generation of its own
        assert_idle(srv, f"after round {rnd}")
        if rnd == rounds // 2:
            out = _abort_midway(srv, arch.vocab_size)
            assert_idle(srv, "after the abort")
            print(f"\naborted request answered: {sorted(out)}")
    assert per_client == [200] * 4, per_client
    gaps = _replay(ref_model, checked[::40])
    print(f"\n4 clients x 200 requests ({len(checked)} trajectories) in {time.monotonic() - t0:.0f} s; replay of "
          f"{len(checked[::40])}: shadow {gaps['shadow']['max_abs_logprob_diff']:.2e}; pool idle "
          f"{idle0['free_slots']}+{idle0['evictable_slots']} of {idle0['total_slots']}; freed private "
          f"{srv.pool_state()['private_slots_freed']}")
    assert gaps["shadow"]["max_abs_logprob_diff"] <= TOL


def test_smd_rollout_and_replay_commands_with_the_sglang_backend(servers, model_dir, tmp_path):
    """What a user types: `smd rollout ... rollout.backend=sglang` then `smd replay --json`."""
    srv = servers["h2o"]
    out = tmp_path / "rollout"
    args = ["--config", "configs/tiny-cpu.yaml", "--out", str(out), f"model.path={model_dir}",
            "rollout.backend=sglang", f"rollout.sglang_urls=[{srv.url}]", "rollout.policy.name=h2o",
            f"rollout.policy.budget={BUDGET}", "rollout.policy.window=4", "rollout.num_prompts=3",
            "rollout.group_size=4", "rollout.max_new_tokens=6", "task.name=kv_recall", "task.num_pairs=6", "task.key_digits=2"]
    repo = Path(__file__).resolve().parent.parent
    p = subprocess.run([sys.executable, "-m", "megatron_smd.cli", "rollout", *args], cwd=repo,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "backend=sglang" in p.stdout
    r = subprocess.run([sys.executable, "-m", "megatron_smd.cli", "replay", "--rollouts", str(out), "--json"],
                       cwd=repo, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["backend"] == "sglang" and len(meta["rewards"]) == 12
    print(f"\nsmd rollout (sglang) + smd replay: shadow {res['shadow']['max_abs_logprob_diff']:.2e}, "
          f"dense {res['dense']['max_abs_logprob_diff']:.2e}")
    assert res["shadow"]["max_abs_logprob_diff"] <= TOL
    # a config whose policy differs from the server's is refused, naming both
    bad = subprocess.run([sys.executable, "-m", "megatron_smd.cli", "rollout", *args, "rollout.policy.budget=20"],
                         cwd=repo, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "restart the server" in bad.stderr, bad.stderr[-2000:]
    assert_idle(srv, "after smd rollout")


REFUSALS = [
    (["--attention-backend", "flashinfer"], "--attention-backend flashinfer"),
    (["--page-size", "16"], "--page-size"),
    (["--enable-mixed-chunk"], "--enable-mixed-chunk"),
    (["--radix-cache-backend", "flexkv"], "--radix-cache-backend flexkv"),
    (["--smd-window", "16"], "budget"),  # h2o budget 16 cannot hold a 16-token window
]


@pytest.mark.parametrize("extra,flag", REFUSALS, ids=[r[1] for r in REFUSALS])
def test_launcher_refuses_at_start_naming_the_flag(model_dir, extra, flag):
    cmd = [sys.executable, "-m", "sglang_patch.launch_server", "--model-path", str(model_dir), "--device", "cpu",
           "--smd-policy", "h2o", "--smd-budget", "16", "--smd-window", "4", *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert flag in p.stderr, p.stderr[-2000:]


def test_launcher_refuses_overlap_scheduler_on_gpu_settings(model_dir):
    """Without --device cpu nothing is filled in: a GPU launch that keeps the overlap scheduler is refused."""
    cmd = [sys.executable, "-m", "sglang_patch.launch_server", "--model-path", str(model_dir),
           "--attention-backend", "triton", "--page-size", "1", "--cuda-graph-backend-decode", "disabled",
           "--smd-policy", "h2o", "--smd-budget", "16", "--smd-window", "4"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--disable-overlap-schedule" in p.stderr, p.stderr[-2000:]

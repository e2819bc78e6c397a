"""Trainer-side client: sample GRPO groups from patched SGLang servers, return megatron_smd trajectories.

``rollout.backend: sglang`` uses this in place of :class:`megatron_smd.rollout.engine.ReferenceEngine`;
both are a :class:`~megatron_smd.rollout.engine_api.RolloutEngine`: :meth:`SGLangClient.generate`
has the same signature and returns the same :class:`~megatron_smd.rollout.engine.Trajectory`
objects, so everything after it is unchanged. The servers themselves are :mod:`sglang_patch`; this
client needs only their wire format (the mask encoding and its ``meta_info`` key).

Protocol (SGLang's native ``POST /generate``; sglang-router exposes the same route, so a router
URL is just one more base URL)::

    {"input_ids": prompt, "return_logprob": true,
     "sampling_params": {"n": group_size, "max_new_tokens", "temperature", "top_p", "top_k",
                         "stop_token_ids", "no_stop_trim": true}}
    -> [{"output_ids": [...], "meta_info": {"finish_reason": {"type": "stop" | "length"},
          "output_token_logprobs": [[logprob, token_id, null], ...],
          "smd_evict": [{"evict": {"b64", "shape": [L, T], "dtype": "int32"}, "replayable", ...}]}},
        ... n entries]

One request per prompt (SGLang then prefills the prompt once and shares it through the radix
cache); prompts are spread round-robin over the base URLs and sent concurrently.
``sampler_logprobs[t]`` is SGLang's ``output_token_logprobs`` (the temperature-scaled
full-vocabulary log-softmax unless ``SGLANG_RETURN_ORIGINAL_LOGPROB`` is set, which the launcher
refuses), 0 on prompt positions, as in the reference engine.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from sglang_patch.eviction import decode_mask  # the servers' wire format of a mask
from sglang_patch.fp8_kv import same_cache
from sglang_patch.patch import META_KEY

from ..errors import FormatError, MaskError, SMDError
from ..mask import validate_evict
from ..quant.cache import RolloutKV
from .drills import drill_point
from .engine import RolloutStats, SamplingParams, Trajectory
from .faults import ServerFault


@dataclass
class SGLangClient:
    """Client of one or more patched SGLang servers (or sglang-router URLs).

    Attributes:
        urls: base URLs, e.g. ``["http://10.0.0.5:30000"]``.
        num_layers: the model's layer count (checked against every returned mask).
        timeout_s: per-request HTTP timeout.
        require_replayable: raise if a server reports a trajectory whose K/V were recomputed
            (retraction); otherwise such trajectories are listed in ``last_not_replayable``.
        mask_retries: re-requests of a prompt whose output fails validation (a malformed answer,
            a mask of the wrong shape or with an out-of-range entry); each is counted in
            ``invalid_outputs``. Past them the request counts as failed.

    A server that cannot be reached, resets the connection, times out, answers HTTP 5xx or keeps
    returning invalid output raises :class:`~megatron_smd.rollout.faults.ServerFault` (with its
    URL) once every request of the call has ended: the caller discards the whole call's samples.
    """

    urls: list[str]
    num_layers: int
    timeout_s: float = 600.0
    require_replayable: bool = True
    last_not_replayable: list[int] = field(default_factory=list)
    #: per trajectory of the last ``generate``: the export's extra fields (``peak_private_slots``,
    #: ``evictions``, ``prompt_state``, ...), the mask itself removed.
    last_export_info: list[dict] = field(default_factory=list)
    mask_retries: int = 2
    invalid_outputs: int = 0
    #: the FP8 KV cache the servers store (checked by :meth:`check_kv_cache`), stamped on every
    #: trajectory so the learner replays the rounding; None: the model's dtype
    kv_cache: RolloutKV | None = None

    def __post_init__(self):
        if not self.urls:
            raise SMDError("SGLangClient: no server URL given (rollout.sglang.urls)")
        self.urls = [u.rstrip("/") for u in self.urls]

    # ------------------------------------------------------------------ HTTP
    def _post(self, url: str, payload: dict):
        req = urllib.request.Request(url + "/generate", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            msg = f"{url}/generate: HTTP {e.code}: {e.read()[:500]!r}"
            if e.code >= 500:
                raise ServerFault(msg, url) from None
            raise SMDError(msg) from None
        except urllib.error.URLError as e:
            raise ServerFault(f"{url}/generate: cannot reach the server ({e.reason})", url) from None
        except TimeoutError:
            raise ServerFault(f"{url}/generate: no answer within {self.timeout_s:.0f} s "
                              f"(rollout.faults.request_timeout_s)", url) from None
        except (OSError, http.client.HTTPException) as e:  # reset, closed mid-answer
            raise ServerFault(f"{url}/generate: the connection failed mid-request ({e!r})", url) from None
        except ValueError as e:  # a truncated or non-JSON body
            raise ServerFault(f"{url}/generate: unreadable answer ({e})", url) from None

    @staticmethod
    def request_payload(prompt: list[int], n: int, sp: SamplingParams, prompt_index: int) -> dict:
        """One ``/generate`` request: the whole group through SGLang's parallel sampling (``n``).

        No ``sampling_seed``: SGLang copies one request's sampling parameters to all ``n`` samples
        and reads the seed only under deterministic inference, where it would make every sample of
        the group identical (the launcher refuses that mode). Samples draw from the server's RNG.
        """
        params = {"n": n, "max_new_tokens": sp.max_new_tokens, "temperature": sp.temperature,
                  "top_p": sp.top_p, "top_k": sp.top_k if sp.top_k > 0 else -1,
                  "stop_token_ids": list(sp.stop_token_ids), "no_stop_trim": True}
        return {"input_ids": list(prompt), "sampling_params": params, "return_logprob": True}

    # ------------------------------------------------------------------ public
    def server_states(self) -> dict[str, dict | None]:
        """Each URL's patch state (``/server_info`` → ``internal_states[0]["smd"]``); None where the
        answer has no patch state (a router, or an unpatched server)."""
        out = {}
        for u in self.urls:
            req = urllib.request.Request(u + "/server_info", method="GET")
            try:
                with urllib.request.urlopen(req, timeout=min(self.timeout_s, 60)) as r:
                    info = json.loads(r.read())
            except (urllib.error.URLError, OSError, ValueError) as e:
                raise SMDError(f"{u}/server_info: cannot read the server's state ({e})") from None
            states = info.get("internal_states") or [{}]
            out[u] = states[0].get("smd") if isinstance(states[0], dict) else None
        return out

    def server_policies(self) -> dict[str, dict | None]:
        """Each URL's eviction policy as the server reports it (``smd.policy`` of :meth:`server_states`)."""
        return {u: (st or {}).get("policy") for u, st in self.server_states().items()}

    def check_kv_cache(self, expected: RolloutKV | None) -> None:
        """Refuse servers whose KV cache (``smd.kv_cache``: FP8 format, per-layer scales, the weights
        they were calibrated on) differs from ``expected`` (``rollout.kv_cache_dtype`` /
        ``rollout.kv_scales``); then stamp ``expected`` on every trajectory this client builds."""
        want = None if expected is None else expected.to_meta()
        for u, st in self.server_states().items():
            if st is None or "kv_cache" not in st:
                raise SMDError(f"{u}: the server reports no smd KV cache state; start it with "
                               f"python -m sglang_patch.launch_server")
            have = st["kv_cache"]
            if not same_cache(have, want):
                def show(m):
                    return "the model's dtype (no FP8)" if m is None else \
                        f"{m['dtype']} with k scales {m['k_scale']}, v scales {m['v_scale']}"
                raise SMDError(f"{u}: the server stores its KV cache as {show(have)}, the config says {show(want)} "
                               f"(rollout.kv_cache_dtype / rollout.kv_scales): restart the server with "
                               f"--kv-cache-dtype / --smd-kv-scales to match, or the learner would replay another "
                               f"rounding")
        self.kv_cache = expected

    def check_policy(self, expected: dict) -> None:
        """Refuse servers whose eviction policy differs from ``expected`` (``PolicyConfig``
        as JSON): the learner would replay masks of a policy the config does not describe."""
        for u, pol in self.server_policies().items():
            if pol is None:
                raise SMDError(f"{u}: the server reports no smd eviction state; start it with "
                               f"python -m sglang_patch.launch_server (a router URL cannot be checked: "
                               f"list the servers in rollout.sglang_urls)")
            diff = {k: (pol.get(k), v) for k, v in expected.items() if pol.get(k) != v}
            if diff:
                raise SMDError(f"{u}: the server runs eviction policy {pol}, the config says {expected} "
                               f"(server vs config: {diff}); restart the server with the config's --smd-* "
                               f"flags or change rollout.policy")

    def generate(self, prompts: list[list[int]], n: int = 1, sampling: SamplingParams | None = None
                 ) -> tuple[list[Trajectory], RolloutStats]:
        """Sample ``n`` completions per prompt. Returns trajectories ordered prompt-major."""
        sp = sampling or SamplingParams()
        if n < 1 or not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("need n >= 1 and non-empty prompts")
        t0 = time.perf_counter()
        urls = list(self.urls)
        lock = threading.Lock()
        self.last_not_replayable = []
        self.last_export_info = []

        def one(pi: int) -> tuple[list[Trajectory], list[dict]]:
            url = urls[pi % len(urls)]
            payload = self.request_payload(prompts[pi], n, sp, pi)
            for attempt in range(self.mask_retries + 1):
                out = self._post(url, payload)
                items = out if isinstance(out, list) else [out]
                info: list[dict] = []
                try:
                    if len(items) != n:
                        raise FormatError(f"{url}/generate: {len(items)} outputs for prompt {pi}, asked n={n}")
                    trajs = [self.to_trajectory(prompts[pi], item, pi, si, where=f"{url} prompt {pi} sample {si}",
                                                info=info) for si, item in enumerate(items)]
                    return trajs, info
                except (FormatError, MaskError) as e:
                    with lock:
                        self.invalid_outputs += 1
                    if attempt == self.mask_retries:
                        raise ServerFault(f"{e} ({attempt + 1} tries; the group is never trained on)", url) from None
            raise AssertionError("unreachable")

        with ThreadPoolExecutor(max_workers=min(32, len(prompts))) as ex:
            futs = [ex.submit(one, i) for i in range(len(prompts))]
            drill_point("rollout")  # a fault drill kills a server while these requests are in flight
            errors = []
            for f in futs:  # every request ends (bounded by timeout_s) before anything is raised
                try:
                    f.result()
                except ServerFault as e:
                    errors.append(e)
        if errors:
            first = errors[0]
            more = f" (and {len(errors) - 1} more failed request(s))" if len(errors) > 1 else ""
            raise ServerFault(f"{first}{more}; all {len(prompts) * n} samples of this call are discarded",
                              first.url)
        trajs: list[Trajectory] = []
        for f in futs:
            ts, info = f.result()
            for t, i in zip(ts, info):
                if not i.get("replayable", True):
                    self.last_not_replayable.append(len(trajs))
                trajs.append(t)
                self.last_export_info.append(i)
        stats = RolloutStats(generated_tokens=sum(t.seq_len - t.prompt_len for t in trajs),
                             seconds=time.perf_counter() - t0)
        return trajs, stats

    def to_trajectory(self, prompt: list[int], item: dict, prompt_index: int, sample_index: int,
                      *, where: str = "response", info: list[dict] | None = None) -> Trajectory:
        """Convert one SGLang output object into a :class:`Trajectory` (validated)."""
        try:
            out_ids = [int(t) for t in item["output_ids"]]
            meta = item["meta_info"]
            lps = meta["output_token_logprobs"]
            fin = meta.get("finish_reason") or {}
        except (KeyError, TypeError) as e:
            raise FormatError(f"{where}: malformed SGLang output ({e!r} missing)") from None
        if len(lps) != len(out_ids):
            raise FormatError(f"{where}: {len(lps)} log-probs for {len(out_ids)} output tokens")
        if any(int(lp[1]) != t for lp, t in zip(lps, out_ids)):
            raise FormatError(f"{where}: output_token_logprobs token ids disagree with output_ids")
        ex_list = meta.get(META_KEY)
        if not ex_list:
            raise FormatError(f"{where}: no meta_info['{META_KEY}']: is the server running "
                              f"python -m sglang_patch.launch_server?")
        ex = ex_list[-1]
        tokens = list(prompt) + out_ids
        T, P = len(tokens), len(prompt)
        if not ex.get("replayable", False):
            if self.require_replayable:
                raise SMDError(f"{where}: not replayable ({ex.get('not_replayable_reason') or 'unknown'}): "
                               f"its K/V were recomputed (retraction); enlarge the KV pool")
        (self.last_export_info if info is None else info).append({k: v for k, v in ex.items() if k != "evict"})
        evict = decode_mask(ex["evict"], name=f"{where}: meta_info['{META_KEY}']")
        validate_evict(evict, seq_end=T, num_layers=self.num_layers, name=f"{where}: {META_KEY}")
        lp = torch.zeros(T, dtype=torch.float32)
        lp[P:] = torch.tensor([float(x[0]) for x in lps], dtype=torch.float32)
        ftype = fin.get("type") if isinstance(fin, dict) else None
        return Trajectory(tokens=tokens, prompt_len=P, sampler_logprobs=lp, evict=evict,
                          prompt_index=prompt_index, sample_index=sample_index,
                          finish_reason="stop" if ftype in ("stop", "matched") else "length", kv_cache=self.kv_cache)

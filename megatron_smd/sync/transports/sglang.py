"""``sglang``: SGLang servers through their weight-update HTTP API (see the package docstring),
and the small HTTP client the ``disk`` transport also uses to tell servers to reload."""

from __future__ import annotations

import json
import secrets
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence

import torch
import torch.distributed as dist

from ...parallel.layout import free_port
from ...rollout.drills import drill_point
from ..bucket import Bucket
from ..group import destroy_group, init_weight_update_group
from ..staging import CommitResult, WeightSyncError
from .base import SenderContext, Transport


def post_sglang(url: str, route: str, payload: dict | None, timeout_s: float,
                method: str = "POST") -> tuple[bool, str | dict]:
    """POST JSON to an SGLang server; returns ``(success, message or body)``. Never raises."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url.rstrip("/") + route, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            raw = r.read() or b"{}"
    except urllib.error.HTTPError as e:
        raw = e.read() or b""
        try:
            body = json.loads(raw)
            return False, str(body.get("message") or body) if isinstance(body, dict) else str(body)
        except ValueError:  # some routes (/flush_cache) answer plain text
            return False, f"HTTP {e.code}: {raw[:300].decode(errors='replace').strip()}"
    except (urllib.error.URLError, OSError) as e:
        return False, f"cannot reach {url} ({e})"
    try:
        body = json.loads(raw)
    except ValueError:  # a 2xx plain-text answer (/flush_cache) is a success
        return True, raw[:300].decode(errors="replace").strip()
    if isinstance(body, dict) and "success" in body:
        return bool(body["success"]), str(body.get("message", ""))
    return True, body


LOOPBACK = "127.0.0.1"
#: longest wait for a server's scheduler to be idle before it flushes its cache after a sync (the
#: requests in it then are health checks and stragglers: they end within milliseconds)
FLUSH_IDLE_WAIT_S = 60.0


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlparse(url).hostname or ""
    return host == "localhost" or host.startswith("127.") or host == "::1"


def _own_address() -> str:
    """This host's address as other hosts see it (the rendezvous of a stage's weight-update group)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent; picks the outgoing interface
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


class SGLangTransport(Transport):
    """SGLang servers through their weight-update HTTP API (SGLang 0.5.23).

    ``mode="distributed"`` (engines on other GPUs, or CPU servers with a gloo group): each stage
    sender creates group
    ``{group_prefix}-pp{stage}`` with every engine rank (``/init_weights_update_group``, rank offsets
    assigned server by server), and per bucket posts ``/update_weights_from_distributed``
    (``load_format="flattened_bucket"``) while broadcasting the flattened bucket from rank 0.
    ``mode="tensor"`` (engines colocated on the learner's GPUs): per bucket, posts
    ``/update_weights_from_tensor`` with the flattened bucket shared by CUDA-IPC handles (SGLang's
    ``MultiprocessingSerializer``), one payload per engine TP rank.

    A sync is one SGLang weight-update session (``/begin_weight_update`` ... ``/end_weight_update``,
    opened and closed by the coordinator), then ``/flush_cache`` (once the scheduler is idle) and
    ``/update_weight_version``.
    SGLang loads each bucket in place, so a failure mid-sync leaves the servers partially updated;
    the error says so (``engine_state="partial"``) and the next successful sync repairs it.

    Args:
        urls: server base URLs.
        mode: ``"distributed"`` or ``"tensor"``.
        master_address: this sender's address for the rendezvous (default: the outgoing interface).
        master_port: stage ``p`` uses ``master_port + p`` (None, the default: a port the OS has
            free at each connect, so runs sharing a host and a group rebuilt after a server
            failure never collide; set it where only chosen ports are open to the servers; a
            rebuilt group then uses a free port anyway).
        ranks_per_server: engine ranks per server (default: the server's ``tp_size`` from ``/server_info``).
    """

    name = "sglang"
    staged = False

    def __init__(self, urls: Sequence[str], *, mode: str = "distributed", master_address: str | None = None,
                 master_port: int | None = None, backend: str | None = None, ranks_per_server: int | None = None,
                 timeout_s: float = 600.0, group_prefix: str = "smd-sync"):
        if mode not in ("distributed", "tensor"):
            raise ValueError(f"sglang transport: mode must be 'distributed' or 'tensor', got {mode!r}")
        if not urls:
            raise ValueError("sglang transport: no server URL")
        self.urls = [u.rstrip("/") for u in urls]
        cuda = torch.cuda.is_available()
        if mode == "tensor" and not cuda:
            raise ValueError("sglang transport: mode 'tensor' shares CUDA buffers by IPC handle and needs a GPU; "
                             "on CPU use mode 'distributed' (a gloo group)")
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        backend = backend or ("nccl" if cuda else "gloo")
        self.mode, self.master_address = mode, master_address
        self.master_port = None if master_port is None else int(master_port)
        self.backend, self.ranks_per_server, self.timeout_s = backend, ranks_per_server, timeout_s
        self.group_prefix = group_prefix
        self.pg = None
        self._ranks: list[int] = []
        self._sent = 0
        self._group_name: str | None = None

    # ------------------------------------------------------------------------------------------
    def _server_ranks(self) -> list[int]:
        if self.ranks_per_server is not None:
            return [self.ranks_per_server] * len(self.urls)
        out = []
        for u in self.urls:
            ok, body = post_sglang(u, "/server_info", None, self.timeout_s, method="GET")
            if not ok or not isinstance(body, dict):
                raise WeightSyncError(f"sglang transport: {u}/server_info: {body}", "unknown")
            tp = body.get("tp_size") or (body.get("server_args") or {}).get("tp_size")
            if not tp:
                raise WeightSyncError(f"sglang transport: {u}/server_info has no tp_size; pass ranks_per_server",
                                      "unknown")
            out.append(int(tp))
        return out

    def _all(self, route: str, payloads: list[dict]) -> list[tuple[bool, str]]:
        """POST one payload per server concurrently; returns their ``(success, message)``."""
        res: list = [None] * len(self.urls)

        def run(i):
            res[i] = post_sglang(self.urls[i], route, payloads[i], self.timeout_s)

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(self.urls))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return res

    def _check(self, what: str, results, state: str) -> None:
        bad = [f"{u}: {m}" for u, (ok, m) in zip(self.urls, results) if not ok]
        if bad:
            raise WeightSyncError(f"sglang transport: {what} failed: " + " | ".join(bad),
                                  state)  # type: ignore[arg-type]

    def connect(self, ctx: SenderContext) -> None:
        if not self._ranks:
            self._ranks = self._server_ranks()
        if self.mode != "distributed" or self.pg is not None:
            return
        world = 1 + sum(self._ranks)
        addr = self.master_address or (LOOPBACK if all(_is_loopback(u) for u in self.urls) else _own_address())
        # unique per connection: a long-lived server keeps the groups of earlier runs (a trainer that
        # crashed never destroyed its own) and refuses a name it already has
        name = f"{self.group_prefix}-pp{ctx.stage}-{secrets.token_hex(4)}"
        port = free_port("") if self.master_port is None else self.master_port + ctx.stage  # store: every interface
        offsets = [1 + sum(self._ranks[:i]) for i in range(len(self.urls))]
        payloads = [{"master_address": addr, "master_port": port, "rank_offset": off, "world_size": world,
                     "group_name": name, "backend": self.backend} for off in offsets]
        joined: dict = {}

        def join():  # this sender hosts the rendezvous while the servers join over HTTP
            try:
                joined["pg"] = init_weight_update_group(addr, port, 0, world, name, backend=self.backend,
                                                        timeout_s=self.timeout_s)
            except Exception as e:
                joined["error"] = e

        t = threading.Thread(target=join, daemon=True, name="smd-sync-join")
        t.start()
        # a server that refuses to join answers at once: fail now, not at the rendezvous timeout (the
        # abandoned rendezvous thread ends at its own timeout)
        self._check("/init_weights_update_group", self._all("/init_weights_update_group", payloads), "unknown")
        t.join()
        if "error" in joined:
            raise WeightSyncError(f"sglang transport: weight-update group {name} at {addr}:{port}: "
                                  f"{joined['error']}", "unknown")
        self.pg, self._group_name = joined["pg"], name

    def begin(self, ctx: SenderContext) -> None:
        self._sent = 0
        if ctx.coordinator:
            self._check("/begin_weight_update", self._all("/begin_weight_update", [{}] * len(self.urls)), "previous")
        if ctx.num_stages > 1:
            dist.barrier(group=ctx.senders_group)  # no stage sends before the session is open

    def send(self, ctx: SenderContext, bucket: Bucket) -> None:
        flat = bucket.flatten(self.device)
        state = "partial"  # from here on, a server may have loaded part of this sync
        try:
            if self.mode == "distributed":
                h = bucket.header()
                payload = {"names": h["names"], "dtypes": h["dtypes"], "shapes": h["shapes"],
                           "group_name": self._group_name, "flush_cache": False,
                           "load_format": "flattened_bucket"}
                out: dict = {}
                t = threading.Thread(target=lambda: out.update(
                    r=self._all("/update_weights_from_distributed", [payload] * len(self.urls))), daemon=True)
                t.start()
                try:
                    work = dist.broadcast(flat, group=self.pg, group_src=0, async_op=True)
                    while not work.is_completed():
                        # a server that refused the bucket never joins the broadcast: do not wait
                        # for the group's timeout, fail now (the group is rebuilt before a retry)
                        if not t.is_alive() and any(not ok for ok, _ in out.get("r", [])):
                            self._check(f"/update_weights_from_distributed (bucket {bucket.index}, stage "
                                        f"{ctx.stage}; the broadcast is abandoned)", out["r"], state)
                        time.sleep(0.002)
                    work.wait()
                except WeightSyncError:
                    raise
                except Exception as e:
                    raise WeightSyncError(f"sglang transport: broadcast of bucket {bucket.index} of stage "
                                          f"{ctx.stage} failed ({e}); the servers hold partially updated "
                                          f"weights: re-sync before sampling", state) from None
                t.join()
                self._check(f"/update_weights_from_distributed (bucket {bucket.index}, stage {ctx.stage})",
                            out["r"], state)
                if bucket.index == 0 and ctx.coordinator:
                    drill_point("sync")  # a fault drill kills a server between loaded buckets and the commit
            else:
                from sglang.srt.utils import MultiprocessingSerializer
                from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
                from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata

                monkey_patch_torch_reductions()
                metas = [FlattenedTensorMetadata(name=m.name, shape=torch.Size(m.shape), dtype=m.dtype,
                                                 start_idx=m.offset, end_idx=m.offset + m.nbytes, numel=m.nbytes)
                         for m in bucket.metas()]
                ser = MultiprocessingSerializer.serialize({"flattened_tensor": flat, "metadata": metas},
                                                          output_str=True)
                payloads = [{"serialized_named_tensors": [ser] * n, "load_format": "flattened_bucket",
                             "flush_cache": False} for n in self._ranks]
                self._check(f"/update_weights_from_tensor (bucket {bucket.index}, stage {ctx.stage})",
                            self._all("/update_weights_from_tensor", payloads), state)
                torch.cuda.synchronize()  # the servers finished reading the shared buffer
        finally:
            del flat
        self._sent += 1

    def finish(self, ctx: SenderContext, failed: str | None) -> CommitResult | None:
        if ctx.num_stages > 1:
            dist.barrier(group=ctx.senders_group)
        if not ctx.coordinator:
            return None
        end = self._all("/end_weight_update", [{}] * len(self.urls))
        if failed:
            return CommitResult(ok=False, version=ctx.version, receiver=self.name, engine_state="partial",
                                message=f"{failed}; the servers may hold partially updated weights: re-sync")
        self._check("/end_weight_update", end, "partial")
        self.flush_caches()
        self._check("/update_weight_version", self._all(
            "/update_weight_version", [{"new_version": str(ctx.version), "abort_all_requests": False}]
            * len(self.urls)), "partial")
        return CommitResult(ok=True, version=ctx.version, message=f"updated {len(self.urls)} server(s)",
                            receiver=self.name)

    def flush_caches(self) -> None:
        """Every server drops its radix cache, which holds prompt K/V (and the patch its prompt
        scores) of the old weights. An immediate ``/flush_cache`` is refused while any request is
        in the scheduler, and a supervisor's ``/health`` check is one (a one-token generate): one
        arriving just before the flush failed the whole sync. ``?timeout=`` makes SGLang flush as
        soon as its scheduler is idle, within :data:`FLUSH_IDLE_WAIT_S` (or half this transport's
        HTTP timeout)."""
        wait = min(FLUSH_IDLE_WAIT_S, self.timeout_s / 2)
        self._check("/flush_cache", self._all(f"/flush_cache?timeout={wait:g}", [{}] * len(self.urls)), "partial")

    def retarget(self, urls: Sequence[str]) -> None:
        """Point the next sync at ``urls`` (after a server failed or came back): the weight-update
        group is rebuilt, under a new name and port, at the next :meth:`connect`. Servers of the old
        group that are still up are asked to close any open weight-update session and to drop the
        old group (best effort: a server that cannot is restarted by its supervisor when it hangs)."""
        keep = [u.rstrip("/") for u in urls]
        self._release([u for u in keep if u in self.urls], end_session=True)
        self.urls = keep
        self._ranks = []
        self.master_port = None  # the old group's store may still hold its port: a rebuilt group takes a free one

    def _release(self, urls: Sequence[str], *, end_session: bool = False) -> None:
        name, self._group_name = self._group_name, None
        if self.pg is not None:
            destroy_group(self.pg)
            self.pg = None
        if name:  # this rank built a group with the servers (a stage sender)
            for u in urls:
                if end_session:
                    post_sglang(u, "/end_weight_update", {}, 30)  # "no session is open" is the normal answer
                post_sglang(u, "/destroy_weights_update_group", {"group_name": name}, 30)

    def close(self) -> None:
        """Drop this run's weight-update group, here and on the servers (which outlive the run)."""
        self._release(self.urls)

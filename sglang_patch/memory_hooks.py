"""Hooks on SGLang's radix cache so a managed request's release matches what eviction already did.

SGLang 0.5.23 releases a request with ``mem_cache/common.py::release_kv_cache``::

    tree_cache.checkpoint(req, up_to=owned_kv_len)        # insert prompt + output into the tree
    tree_cache.free_kv_row(req.kv, [(cache_protected_len, owned_kv_len)])
    tree_cache.unlock(req.lock)
    tree_cache.on_release(req, checkpointed=...)
    req_to_token_pool.free(req)

For a request under eviction (registered with an :class:`~sglang_patch.eviction.EvictionManager`):

* ``checkpoint`` is clamped to ``up_to = req.kv.cache_protected_len``: the output is never inserted
  into the tree (some of its slots are already free, and its K/V were computed under a sparse
  context, so no later request may reuse them as a dense prefix), and a detached prompt suffix is
  not re-inserted. Prefill checkpoints (before registration) run unchanged.
* ``free_kv_row`` frees only the row positions the request still owns
  (:meth:`EvictionManager.filter_release_ranges`): never a slot eviction already returned, never a
  group-owned prompt slot. So no slot is freed twice.
* ``on_release`` hands the request to :meth:`EvictionManager.finish` (mask export, group cleanup);
  a request released before it finished (retraction, abort) exports ``replayable=False`` and no
  mask, since SGLang recomputes its K/V densely if it resumes.

The hooks wrap the methods on the classes (``RadixCache.checkpoint``,
``BasePrefixCache.free_kv_row``, ``BasePrefixCache.on_release``) and look the manager up by tree
instance, so a tree without a manager behaves exactly as before.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from .eviction import EvictionManager

_MANAGERS: dict[int, EvictionManager] = {}
_INSTALLED: list[tuple[type, str, Callable]] = []


def register_manager(tree_cache: Any, manager: EvictionManager) -> None:
    """Attach ``manager`` to one tree cache instance (one per scheduler)."""
    _MANAGERS[id(tree_cache)] = manager


def unregister_manager(tree_cache: Any) -> None:
    _MANAGERS.pop(id(tree_cache), None)


def manager_for(tree_cache: Any) -> EvictionManager | None:
    return _MANAGERS.get(id(tree_cache))


def install_memory_hooks(radix_cache_cls: type, base_prefix_cache_cls: type) -> None:
    """Wrap ``checkpoint`` / ``free_kv_row`` / ``on_release`` (idempotent).

    Args: SGLang's ``RadixCache`` and ``BasePrefixCache`` classes (passed in so this module
    imports nothing from SGLang).
    """
    if _INSTALLED:
        return
    orig_checkpoint = radix_cache_cls.checkpoint
    orig_free = base_prefix_cache_cls.free_kv_row
    orig_on_release = base_prefix_cache_cls.on_release

    @functools.wraps(orig_checkpoint)
    def checkpoint(self, req, *, up_to: int, **kwargs):
        mgr = manager_for(self)
        if mgr is not None and mgr.is_managed(req):
            up_to = min(up_to, int(req.kv.cache_protected_len))
        return orig_checkpoint(self, req, up_to=up_to, **kwargs)

    @functools.wraps(orig_free)
    def free_kv_row(self, kv, ranges):
        mgr = manager_for(self)
        if mgr is not None and kv.req_pool_idx is not None:
            ranges = mgr.filter_release_ranges(int(kv.req_pool_idx), list(ranges))
            if not ranges:
                return None
        return orig_free(self, kv, ranges)

    @functools.wraps(orig_on_release)
    def on_release(self, req, *, checkpointed: bool):
        mgr = manager_for(self)
        if mgr is not None and mgr.is_managed(req):
            # released before it finished: retraction (re-prefilled later) or an abort
            mgr.finish(req, early=not req.finished())
        return orig_on_release(self, req, checkpointed=checkpointed)

    for cls, name, new, old in ((radix_cache_cls, "checkpoint", checkpoint, orig_checkpoint),
                                (base_prefix_cache_cls, "free_kv_row", free_kv_row, orig_free),
                                (base_prefix_cache_cls, "on_release", on_release, orig_on_release)):
        # Keep the class's own attribute (it may be inherited): restore by deleting when so.
        _INSTALLED.append((cls, name, cls.__dict__.get(name)))
        setattr(cls, name, new)


def uninstall_memory_hooks() -> None:
    """Undo :func:`install_memory_hooks` (tests)."""
    while _INSTALLED:
        cls, name, old = _INSTALLED.pop()
        if old is None:
            delattr(cls, name)
        else:
            setattr(cls, name, old)

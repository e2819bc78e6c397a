"""Shared fixtures. Plain ``pytest`` runs CPU tests; GPU tests are marked ``gpu`` and skip with the reason."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (Transformer Engine / FlexAttention backward / SGLang kernels have no CPU path)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory):
    from megatron_smd.model.tiny import init_model_dir

    return init_model_dir(tmp_path_factory.mktemp("models") / "tiny-qwen2", "qwen2", seed=0)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    from megatron_smd.model.tiny import init_model_dir

    return init_model_dir(tmp_path_factory.mktemp("models") / "tiny-llama", "llama", seed=1)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of tiny in-process runs: their matmuls are microseconds, and
    on a shared 2-core machine extra threads only contend (25x slower measured). Restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

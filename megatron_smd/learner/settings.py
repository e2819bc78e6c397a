"""The learner's settings: the ``learner.*`` config section, as :class:`~megatron_smd.learner.learner.Learner`
takes it. Light (no Megatron import), so the trainer and SFT build settings without loading the learner."""

from __future__ import annotations

import torch
from pydantic import ConfigDict

from ..config import ExperimentConfig, LearnerConfig


class LearnerSettings(LearnerConfig):
    """The ``learner.*`` config section (:class:`~megatron_smd.config.LearnerConfig`, every field and
    default), as the learner takes it. Built in code (tests, tools), ``attention_backend`` may also
    name the backends only :func:`~megatron_smd.learner.model.build_gpt_model` knows (``megatron``,
    the dense reference) and ``precision`` is checked when the learner is built (``ConfigError``)."""

    model_config = ConfigDict(extra="forbid", strict=False, use_attribute_docstrings=True)

    attention_backend: str = "sdpa"
    precision: str = "fp32"

    @property
    def params_dtype(self) -> torch.dtype:
        if self.precision not in PRECISIONS:
            from ..errors import ConfigError

            raise ConfigError(f"learner.precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")
        return PRECISIONS[self.precision]


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def learner_settings(cfg: ExperimentConfig, **over) -> LearnerSettings:
    """The run's ``learner.*`` section with ``over`` replacing fields (SFT: its own ``lr``)."""
    return LearnerSettings(**{**cfg.learner.model_dump(), **over})

"""Configuration: typed pydantic models are the source of truth, YAML is their serialized form.

Three layers, later wins:

1. a model preset (``configs/models/*.yaml``), named by the experiment's ``preset:`` key (a path
   relative to the experiment file, or a bare name looked up in ``configs/models/``);
2. the experiment file (``configs/*.yaml``);
3. ``key=value`` overrides from the command line (values parsed as YAML: ``rollout.policy.budget=64``,
   ``rollout.policy.name=h2o``, ``task.num_pairs=[1,2]``).

Unknown keys and wrong types are errors that name the dotted key and the layer (file or
``command line``) that set it. Cross-field constraints (a policy budget smaller than its sinks plus
window, ...) are checked here too, at config time.

The package, by concern: :mod:`.schema` (the pydantic models), :mod:`.loading` (the layers, YAML,
overrides, error messages), :mod:`.settings` (what every field does) and :mod:`.checks` (what a
run refuses at start). Every name is importable from ``megatron_smd.config``.
"""

from ..errors import ConfigError
from ..policies import PolicyConfig
from ..tasks import TaskConfig
from .checks import (MEGATRON_OWNED, apply_cpu_threads, check_arch_matches, check_kv_scales,
                     check_megatron_passthrough, check_runnable)
from .loading import REPO_CONFIGS, dump_config, load_config, parse_override
from .schema import (AlgorithmConfig, DistillConfig, ExperimentConfig, FaultConfig, LearnerConfig, LoggingConfig,
                     ModelArchConfig, ModelConfig, ResourcesConfig, RolloutConfig, SFTConfig, SparseRLConfig,
                     SyncConfig, TinyInitConfig, TrainConfig)
from .settings import PLAN, RUN, SETTINGS, schema_fields

__all__ = [
    "AlgorithmConfig", "ConfigError", "DistillConfig", "ExperimentConfig", "FaultConfig", "LearnerConfig",
    "LoggingConfig", "MEGATRON_OWNED", "ModelArchConfig", "ModelConfig", "PLAN", "PolicyConfig", "REPO_CONFIGS",
    "RUN", "ResourcesConfig", "RolloutConfig", "SETTINGS", "SFTConfig", "SparseRLConfig", "SyncConfig",
    "TaskConfig", "TinyInitConfig", "TrainConfig", "apply_cpu_threads", "check_arch_matches",
    "check_kv_scales", "check_megatron_passthrough", "check_runnable", "dump_config", "load_config",
    "parse_override", "schema_fields",
]

"""Typed run configuration: the single source of defaults (see dsft/config/schema.py).

    schema   the dataclasses (every default, one comment per field) and their checks
    loading  YAML + dotted overrides -> a validated Config (every problem at once); saving
    batch    BatchShape: the one place the batch equation is solved

The package imports nothing from the rest of dsft but its exceptions (the bottom layer).
"""

from dsft.config.batch import (
    BatchShape,
    batch_shape,
)
from dsft.config.loading import (
    config_from_dict,
    load_config,
    parse_overrides,
    read_yaml,
    save_config,
    to_dict,
)
from dsft.config.schema import (
    ATTENTION,
    COLUMNS,
    HUB_ID,
    REFERENCE_FREE,
    SP_ATTENTION,
    CheckpointConfig,
    Config,
    DataConfig,
    DeepSpeedConfig,
    EvalConfig,
    FreezeConfig,
    LoggingConfig,
    LoraConfig,
    ModelConfig,
    PreferenceConfig,
    TrainConfig,
    has_test_split,
    has_val_split,
    is_hub_id,
    live_reference_copy,
    model_heads,
    needs_reference,
    validate,
    validate_data,
    validate_sequence_parallel,
)
from dsft.errors import ConfigError

__all__ = [
    "ATTENTION",
    "COLUMNS",
    "HUB_ID",
    "REFERENCE_FREE",
    "SP_ATTENTION",
    "BatchShape",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DeepSpeedConfig",
    "EvalConfig",
    "FreezeConfig",
    "LoggingConfig",
    "LoraConfig",
    "ModelConfig",
    "PreferenceConfig",
    "TrainConfig",
    "batch_shape",
    "config_from_dict",
    "has_test_split",
    "has_val_split",
    "is_hub_id",
    "live_reference_copy",
    "load_config",
    "model_heads",
    "needs_reference",
    "parse_overrides",
    "read_yaml",
    "save_config",
    "to_dict",
    "validate",
    "validate_data",
    "validate_sequence_parallel",
]

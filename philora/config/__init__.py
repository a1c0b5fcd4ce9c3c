"""Configuration: the fields with their defaults, help and checks; YAML files, presets and `--set`."""

from philora.config.fields import (
    PACKAGED_CONFIGS,
    Config,
    DataSection,
    ModelSection,
    PeftSection,
    TrainingSection,
)
from philora.config.load import dump_documented, load_config, resolve_config_path

__all__ = [
    "PACKAGED_CONFIGS",
    "Config",
    "DataSection",
    "ModelSection",
    "PeftSection",
    "TrainingSection",
    "dump_documented",
    "load_config",
    "resolve_config_path",
]

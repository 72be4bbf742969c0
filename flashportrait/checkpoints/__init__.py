"""Checkpoint formats, key maps and strict loading (SPEC.md section 3)."""

from .common import (
    CheckpointError,
    check_state_dict,
    empty_model,
    format_key_report,
    load_state_dict_strict,
    read_state_dict,
    unwrap_state_dict,
)

__all__ = [
    "CheckpointError",
    "check_state_dict",
    "empty_model",
    "format_key_report",
    "load_state_dict_strict",
    "read_state_dict",
    "unwrap_state_dict",
]

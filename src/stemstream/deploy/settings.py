"""A pipeline config as a deployment reads it: the file's settings (core.config) plus the check
that its ``[analysis]`` table names analyses that exist and accept their settings. That check
imports the analysis registry (and user modules it names), which is why it is not in core."""

from __future__ import annotations

from pathlib import Path

from stemstream.analysis import default_analyses
from stemstream.core.config import ConfigError, PipelineConfig, load_config


def check_analyses(config: PipelineConfig) -> PipelineConfig:
    """``config`` when its [analysis] table builds; ConfigError with one sentence otherwise."""
    try:
        default_analyses(config=config.analysis)
    except ValueError as exc:
        raise ConfigError(f"[analysis] {exc}") from None
    return config


def load_settings(path: str | Path | None) -> PipelineConfig:
    """Read and check a TOML config file (None: the defaults). Raises ConfigError."""
    return check_analyses(load_config(path))

"""Compose the run configuration: Hydra's config tree + command-line overrides -> typed Config.

    load_config(["model=tiny", "objective=mdlm", "train.iters=50"])

Hydra picks one file per group from `configs/` and applies the overrides; the result is merged
into the `Config` dataclasses, so an unknown key or a value of the wrong type is refused with a
one-line `ConfigError` before any work starts.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re

from omegaconf import OmegaConf

from .config import Config, ConfigError

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load_config(overrides: list[str] | None = None, config_dir: str = CONFIG_DIR) -> Config:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from hydra.core.config_store import ConfigStore

    # The dataclasses are the schema under the YAML tree: every key exists (with its default)
    # even where no YAML file sets it, and types are checked as the overrides are applied.
    ConfigStore.instance().store(name="prosec_schema", node=Config)
    if not os.path.isdir(config_dir):
        raise ConfigError(f"config directory {config_dir} not found; run from a checkout of prosec-mcore")
    try:
        with initialize_config_dir(config_dir=config_dir, version_base=None):
            composed = compose(config_name="config", overrides=list(overrides or []))
        merged = OmegaConf.merge(OmegaConf.structured(Config), composed)
        return OmegaConf.to_object(merged)
    except (HydraException, OmegaConfBaseException) as err:
        first_line = str(err).strip().splitlines()[0]
        match = re.match(r"Could not override '([\w.]+)'", first_line)
        if match:
            first_line = _unknown_key_message(match.group(1))
        raise ConfigError(f"invalid configuration: {first_line}") from None


def _unknown_key_message(key: str) -> str:
    """'train.itres' -> "unknown key 'train.itres' (did you mean train.iters?)"."""
    node, valid = Config(), []
    *groups, leaf = key.split(".")
    for group in groups:
        node = getattr(node, group, None)
        if node is None or not dataclasses.is_dataclass(node):
            return f"unknown key '{key}'"
    valid = [f.name for f in dataclasses.fields(node)]
    close = difflib.get_close_matches(leaf, valid, n=1)
    hint = f"did you mean {'.'.join(groups + close)}?" if close else f"valid keys: {', '.join(valid)}"
    return f"unknown key '{key}' ({hint})"


def config_from_dict(data: dict) -> Config:
    """The typed Config of a dict written by `config_to_dict` (e.g. a checkpoint's config)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), data))


def config_to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)

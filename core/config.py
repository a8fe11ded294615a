"""The config base every stage builds on.

A run is described by defaults (the stage's pydantic models), an optional YAML file of
differences and ``--set dotted.key=value`` overrides, applied in that order. Unknown keys are
errors that name the valid keys and the closest match; the resolved config is written next to
every run's outputs. Each stage package owns its config classes (``know3d.rendering.config``,
``know3d.annotation.config``, ``know3d.training.config``, ``know3d.evaluation.config``); this module
holds only what they share: :class:`StrictModel`, the loader, one :class:`RayConfig` and one
:class:`TrackingConfig`.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


# query parameters that carry secrets in URLs (SQLAlchemy's ?password=, signed or keyed endpoints)
_SECRET_PARAMS = ("password", "passwd", "pwd", "token", "secret", "key", "signature", "sig", "credential")


def url_credentials(url: str) -> str | None:
    """Where ``url`` carries a credential (``user:pass@``, a user name on HTTP(S), or a query
    parameter such as ``?password=`` / ``?api-key=``), or None. Config URLs are logged (MLflow
    params, ``config.yaml``, messages), so a credential in one would leak: it belongs in the
    environment."""
    from urllib.parse import parse_qsl, urlsplit

    parts = urlsplit(url)
    if parts.password:
        return "a password in the address (user:password@)"
    if parts.username and parts.scheme in ("http", "https"):
        return "a user name in the address (user@)"
    for name, _ in parse_qsl(parts.query, keep_blank_values=True):
        words = name.lower().replace("-", "_").split("_")
        if any(w in _SECRET_PARAMS or w.endswith(("password", "token", "secret")) for w in words):
            return f"a '{name}' query parameter"
    return None


class StrictModel(BaseModel):
    """Unknown keys are errors; assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RayConfig(StrictModel):
    """Where a stage's Ray runs. Stages subclass it only to add their own parallelism."""

    address: str | None = Field(default=None, description="None = start a local Ray; 'auto' or ray://...")
    connect_timeout_s: float = Field(
        default=30.0, gt=0, description="Give up joining the cluster at `address` after this long (one-line error)."
    )
    num_cpus: int | None = Field(default=None, description="CPUs of the local Ray (None = all).")
    object_store_memory: int | None = Field(default=None, description="Bytes of the local Ray's object store.")


class TrackingConfig(StrictModel):
    """Where a stage's MLflow run goes; stages subclass it to set their experiment."""

    enabled: bool = True
    tracking_uri: str | None = Field(default=None, description="None = sqlite file 'mlflow.db' in the working folder.")
    experiment: str = "know3d-data"
    run_name: str | None = None


# --------------------------------------------------------------------------- loading


def _check_keys(data: Any, model: type[BaseModel], prefix: str) -> None:
    """Raise on unknown keys, naming the valid ones and the closest match."""
    if not isinstance(data, dict):
        return
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in model.model_fields:
            valid = sorted(model.model_fields)
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{path}'.{hint} Valid keys here: {', '.join(valid)}")
        annotation = model.model_fields[key].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            _check_keys(value, annotation, f"{path}.")


def parse_override(item: str) -> tuple[list[str], Any]:
    """'render.resolution=256' -> (['render', 'resolution'], 256); values parse as YAML."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.path=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{item}': value is not valid YAML ({exc})") from None
    return key.split("."), value


def apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set '{'.'.join(path)}': '{part}' is not a section")
        node = child
    node[path[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] | None, model: type[M]) -> M:
    """Defaults of ``model`` <- the YAML at ``path`` <- ``overrides``; :class:`ConfigError` on
    anything that does not fit, in a few lines naming the key."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        data = loaded or {}
    for item in overrides or []:
        key_path, value = parse_override(item)
        apply_override(data, key_path, value)
    _check_keys(data, model, "")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()]
        raise ConfigError("invalid config:\n" + "\n".join(lines)) from None


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

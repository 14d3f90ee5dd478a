"""Plain Python values out of numpy / OmegaConf ones: the one converter the package uses.

Checkpoint hyper_parameters, run-directory JSON twins and pickled configs must hold builtins only
(dict, list, str, int, float, bool, None): numpy scalars and OmegaConf containers either fail to
serialise or, in a checkpoint, need their classes at load time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from state.utils.errors import StateError, first_line


def to_plain(value: Any, *, str_keys: bool = False) -> Any:
    """Recursively convert numpy and OmegaConf values to builtins; ``str_keys`` makes keys JSON-safe."""
    if type(value).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return to_plain(OmegaConf.to_container(value, resolve=True), str_keys=str_keys)
    if isinstance(value, Mapping):
        return {(str(k) if str_keys else to_plain(k)): to_plain(v, str_keys=str_keys) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_plain(v, str_keys=str_keys) for v in value]
    if type(value).__module__ == "numpy":
        return to_plain(value.tolist(), str_keys=str_keys) if hasattr(value, "tolist") else value.item()
    return value


def resolved_config(cfg: Any) -> dict[str, Any]:
    """A whole config (DictConfig or mapping) as a plain dict with every ``${...}`` resolved.

    An interpolation that does not resolve is a user error: one line naming it.
    """
    if cfg is None:
        return {}
    if type(cfg).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        try:
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
        except Exception as exc:  # an unresolvable ${...}
            raise StateError(f"the config cannot be resolved: {first_line(exc)}") from exc
    return dict(to_plain(cfg))

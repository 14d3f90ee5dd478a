"""Load pickles and torch checkpoints without ever running code from the file.

arc-state saves plain data through pickle (numpy strings and scalars, OmegaConf configs, a
collator object). A pickle can name any importable callable, so a downloaded file could run a
command when loaded with ``torch.load(weights_only=False)``. Everything here goes through
:class:`RestrictedUnpickler`, which resolves only an allow-list of data types. Classes that are
known to be plain records (OmegaConf nodes, arc-state's collator) become inert
:class:`Placeholder` objects that just hold their pickled state; anything else is refused with a
:class:`~state.utils.errors.StateError`.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

from state.utils.errors import StateError, first_line

# (module, name) pairs that are resolved to the real object. All are data constructors that
# cannot run arbitrary code.
_ALLOWED: set[tuple[str, str]] = {
    ("builtins", "dict"),
    ("builtins", "list"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "tuple"),
    ("builtins", "int"),
    ("builtins", "float"),
    ("builtins", "complex"),
    ("builtins", "bool"),
    ("builtins", "str"),
    ("builtins", "bytes"),
    ("builtins", "bytearray"),
    ("builtins", "slice"),
    ("builtins", "range"),
    ("__builtin__", "dict"),
    ("__builtin__", "list"),
    ("__builtin__", "long"),
    ("__builtin__", "set"),
    ("collections", "OrderedDict"),
    ("collections", "defaultdict"),
    ("collections", "Counter"),
    ("_codecs", "encode"),
    ("typing", "Any"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._utils", "_rebuild_sparse_tensor"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch.nn.parameter", "Parameter"),
}

# Module prefixes whose classes are plain records we keep as placeholders (never instantiated).
_PLACEHOLDER_PREFIXES = ("omegaconf.", "state.emb.data.", "vci.data.", "cell_load.")


class Placeholder:
    """An inert stand-in for a pickled object of a class we do not import.

    It records the class path, the constructor arguments and the pickled state, so callers can
    still read plain data out of it (e.g. an OmegaConf DictConfig's content).
    """

    __slots__ = ("_path", "args", "state", "items", "dict_items")

    def __init__(self, path: str, args: tuple = ()) -> None:
        self._path = path
        self.args = args
        self.state: Any = None
        self.items: list = []
        self.dict_items: dict = {}

    def __setstate__(self, state: Any) -> None:
        self.state = state

    # pickle's APPEND/SETITEM opcodes on list/dict subclasses
    def append(self, item: Any) -> None:
        self.items.append(item)

    def extend(self, items: Any) -> None:
        self.items.extend(items)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.dict_items[key] = value

    def __repr__(self) -> str:
        return f"<Placeholder {self._path}>"


class RestrictedUnpickler(pickle.Unpickler):
    """A pickle.Unpickler that resolves only allow-listed globals."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _resolve(module, name)
        if module == "torch" and (name.endswith("Storage") or _is_torch_dtype(name)):
            return _resolve(module, name)
        if module.startswith("numpy.dtypes") and name.endswith("DType"):
            return _resolve(module, name)
        if module.startswith(_PLACEHOLDER_PREFIXES):
            return _PlaceholderType.make(f"{module}.{name}")
        raise pickle.UnpicklingError(f"refusing to load global '{module}.{name}': it could run code")


class _PlaceholderType(type):
    """Metaclass trick: each placeholder global becomes a tiny class so that pickle's NEWOBJ
    (``cls.__new__(cls, *args)``) and REDUCE (``cls(*args)``) both yield a Placeholder."""

    _cache: dict[str, type] = {}

    @classmethod
    def make(mcs, path: str) -> type:
        if path not in mcs._cache:

            def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:  # noqa: N807
                return Placeholder(path, args)

            mcs._cache[path] = type(path.rsplit(".", 1)[-1], (), {"__new__": __new__})
        return mcs._cache[path]


def _is_torch_dtype(name: str) -> bool:
    import torch

    return isinstance(getattr(torch, name, None), torch.dtype)


def _resolve(module: str, name: str) -> Any:
    import importlib

    if module == "__builtin__":
        module = "builtins"
        name = {"long": "int"}.get(name, name)
    if module.startswith("numpy.core"):
        # numpy 2 moved numpy.core to numpy._core; files written by numpy 1 name the old path.
        try:
            return getattr(importlib.import_module(module.replace("numpy.core", "numpy._core")), name)
        except ImportError:
            pass
    return getattr(importlib.import_module(module), name)


class _RestrictedPickleModule:
    """The ``pickle_module`` handed to ``torch.load``."""

    Unpickler = RestrictedUnpickler
    __name__ = "state_restricted_pickle"

    @staticmethod
    def load(file, **kwargs):
        return RestrictedUnpickler(file, **kwargs).load()

    @staticmethod
    def loads(data: bytes, **kwargs):
        import io

        return RestrictedUnpickler(io.BytesIO(data), **kwargs).load()


def _check_exists(path: Path, what: str) -> None:
    if not path.exists():
        raise StateError(f"{what} not found: {path}", hint="check the path")
    if path.is_dir():
        raise StateError(f"{what} {path} is a folder, expected a file", hint="pass the file inside it")


def safe_pickle_load(path: str | os.PathLike, *, what: str = "pickle file") -> Any:
    """Load a plain pickle (e.g. arc-state's ``var_dims.pkl``) through the restricted unpickler."""
    path = Path(path)
    _check_exists(path, what)
    try:
        with path.open("rb") as fh:
            return RestrictedUnpickler(fh).load()
    except pickle.UnpicklingError as exc:
        raise StateError(f"{path}: {exc}", hint="only load files from sources you trust; re-create it") from exc
    except (EOFError, ValueError, TypeError) as exc:
        raise StateError(f"{path} is not a readable pickle ({exc})", hint="re-create the file") from exc


def safe_torch_load(path: str | os.PathLike, *, what: str = "torch file", map_location: Any = "cpu") -> Any:
    """``torch.load`` through the restricted unpickler. Never executes code from the file."""
    import torch

    path = Path(path)
    _check_exists(path, what)
    try:
        return torch.load(
            path,
            map_location=map_location,
            weights_only=False,
            pickle_module=_RestrictedPickleModule,
        )
    except pickle.UnpicklingError as exc:
        raise StateError(f"{path}: {exc}", hint="only load files from sources you trust; re-create it") from exc
    except (RuntimeError, EOFError, ValueError) as exc:
        raise StateError(
            f"{path} is not a readable {what} ({first_line(exc)})",
            hint="check that the file is complete and was written by torch.save / Lightning",
        ) from exc


def placeholder_to_plain(obj: Any) -> Any:
    """Best-effort conversion of OmegaConf placeholders (DictConfig/ListConfig) to plain data."""
    if isinstance(obj, Placeholder):
        state = obj.state
        if isinstance(state, dict) and "_content" in state:
            return placeholder_to_plain(state["_content"])
        if obj.dict_items:
            return {k: placeholder_to_plain(v) for k, v in obj.dict_items.items()}
        if obj.items:
            return [placeholder_to_plain(v) for v in obj.items]
        if isinstance(state, dict) and "_val" in state:
            return placeholder_to_plain(state["_val"])
        return None
    if isinstance(obj, dict):
        return {k: placeholder_to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(placeholder_to_plain(v) for v in obj)
    return obj


__all__ = [
    "Placeholder",
    "RestrictedUnpickler",
    "placeholder_to_plain",
    "safe_pickle_load",
    "safe_torch_load",
]

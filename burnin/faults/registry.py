"""One registry maps fault names to classes; plug-ins join through the `burnin.faults` entry points."""

from __future__ import annotations

import difflib
import re
from importlib.metadata import entry_points

from burnin.errors import UserError
from burnin.errors import short as _short
from burnin.faults import corruption, memory, network, process, storage
from burnin.faults.base import POINTS, STEP_POINTS, Fault

__all__ = ["register", "get", "names", "all_faults", "UnknownFault"]

_REGISTRY: dict[str, type[Fault]] = {}
_NAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)+")
_plugins_loaded = False


class UnknownFault(UserError):
    """A fault name that nothing registered."""


def register(cls: type[Fault]) -> type[Fault]:
    """Class decorator: add a fault class to the registry under its `name`."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise TypeError(f"{cls.__qualname__}.name must be 'family.kind', got {name!r}")
    if not cls.points:  # the first point is the default: there must be one
        raise TypeError(f"{cls.__qualname__}.points: empty; name at least one of {', '.join(STEP_POINTS)}")
    for point in cls.points:
        if point not in POINTS:
            raise TypeError(f"{cls.__qualname__}.points: unknown step point {point!r}")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise TypeError(f"fault {name!r} is registered twice: {_REGISTRY[name].__qualname__} and {cls.__qualname__}")
    _REGISTRY[name] = cls
    return cls


def _load() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in entry_points(group="burnin.faults"):
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plug-in must not take the CLI down
            _plugins_loaded = False  # nor be forgotten: the next lookup reports it again
            raise UserError(f"fault plug-in {ep.name!r} ({ep.value}) failed to load: {exc}") from None
        if isinstance(obj, type) and issubclass(obj, Fault):
            register(obj)


#: The built-in catalogue. Each fault module lists its faults and imports nothing of this registry, so
#: the registry depends on the catalogue and never the other way round.
for _cls in (*corruption.FAULTS, *memory.FAULTS, *network.FAULTS, *process.FAULTS, *storage.FAULTS):
    register(_cls)
del _cls


def get(name: str) -> type[Fault]:
    """The fault class called `name`; unknown names fail with the closest match suggested."""
    _load()
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):  # TypeError: a name that is no string (unhashable)
        text = name if isinstance(name, str) else _short(name)
        # a long name is like no fault name; comparing it with each one would only cost time
        close = difflib.get_close_matches(text, _REGISTRY, n=1, cutoff=0.5) if len(text) <= 200 else []
        hint = f"did you mean {close[0]!r}?" if close else "`burnin list` shows the catalogue"
        raise UnknownFault(f"unknown fault {_short(name)}: {hint}") from None


def names() -> list[str]:
    _load()
    return sorted(_REGISTRY)


def all_faults() -> list[type[Fault]]:
    _load()
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]

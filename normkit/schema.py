"""Config checks shared by every layer: unknown keys named with the closest valid one, typed values.

Each part of the toolkit knows the keys of its own config section (the data builders, the model builders, the
train and evaluation sections); these helpers give all of them the same clear errors, e.g.
``unknown config key data.meen (did you mean data.mean?)``, ``train.max_iter must be an integer, got 2.9``.
"""
from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping

__all__ = ["check_keys", "config_int", "config_float", "config_bool", "config_mapping"]

_MISSING = object()


def check_keys(section: Mapping, allowed: Iterable[str], where: str) -> None:
    """Raises ValueError naming every key of `section` not in `allowed`, each with the closest allowed key.
    `where` is the dotted name of the section ("data.train"; "" for the top level of a config)."""
    allowed = sorted(allowed)
    unknown = [key for key in section if key not in allowed]
    if not unknown:
        return
    def dotted(key) -> str:
        return f"{where}.{key}" if where else str(key)

    problems = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), allowed, n=1)
        problems.append(dotted(key) + (f" (did you mean {dotted(close[0])}?)" if close else ""))
    raise ValueError(f"unknown config key{'s' if len(unknown) > 1 else ''} {', '.join(problems)}; "
                     f"the keys of {where or 'the top level'} are: {', '.join(allowed)}")


def config_int(section: Mapping, key: str, default, where: str, *, minimum: int | None = None):
    """`section[key]` (or `default` when absent) as an int: floats only when integral (`1e3`), never bools or
    strings; `None` passes through only when it is the default's value. Checked against `minimum`."""
    value = section.get(key, _MISSING)
    if value is _MISSING:
        value = default
    if value is None and default is None:
        return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}.{key} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{where}.{key} must be >= {minimum}, got {value}")
    return value


def config_float(section: Mapping, key: str, default: float, where: str, *, minimum: float | None = None,
                 positive: bool = False) -> float:
    """`section[key]` (or `default` when absent) as a finite float: ints too, never bools or strings. At least
    `minimum`, and > 0 when `positive`."""
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}.{key} must be a finite number, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"{where}.{key} must be > 0, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{where}.{key} must be >= {minimum}, got {value}")
    return float(value)


def config_bool(section: Mapping, key: str, default: bool, where: str) -> bool:
    """`section[key]` (or `default`) as a bool; strings such as "false" are errors, not truthy."""
    value = section.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{where}.{key} must be true or false, got {value!r}")
    return value


def config_mapping(section: Mapping, key: str, where: str) -> dict:
    """`section[key]` as a dict: absent or null gives {}, anything else but a mapping is an error."""
    value = section.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}.{key} must be a mapping of keys to values, got {value!r}")
    return dict(value)

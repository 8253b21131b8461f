"""Typed reads of a message's config values.

A round's config reaches a site as a Flower ``ConfigRecord`` (or, under secure aggregation, a
legacy ``dict[str, Scalar]``): its values are typed as any of ``int | float | str | bytes |
bool`` and their lists. These read one as the number a round needs, with an error that names
the key when the value is of the wrong type. Light on imports: the CLI's status reader and
every ClientApp process load it.
"""

from __future__ import annotations

from collections.abc import Mapping


def _number(config: Mapping[str, object], key: str, default: int | float | None,
            ) -> int | float | str:
    # Flower's config values are never None, so None can stand for "no default".
    value = config[key] if default is None else config.get(key, default)
    # bool is an int to Python, never a count or a rate to us.
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"config value {key!r} must be a number, got "
                        f"{type(value).__name__} {value!r}")
    return value


def config_int(config: Mapping[str, object], key: str, default: int | None = None) -> int:
    """``config[key]`` as an int (a float is truncated, a string parsed, as ``int()`` does);
    ``default`` when given and the key is missing, else ``KeyError``."""
    value = _number(config, key, default)
    try:
        return int(value)
    except ValueError as e:
        raise ValueError(f"config value {key!r} must be an integer, got {value!r}") from e


def config_float(config: Mapping[str, object], key: str, default: float | None = None,
                 ) -> float:
    """``config[key]`` as a float (a string parsed, as ``float()`` does); ``default`` when
    given and the key is missing, else ``KeyError``."""
    value = _number(config, key, default)
    try:
        return float(value)
    except ValueError as e:
        raise ValueError(f"config value {key!r} must be a number, got {value!r}") from e

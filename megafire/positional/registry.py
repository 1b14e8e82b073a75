"""Name -> encoding class. Adding an encoding is one module plus one line here."""
from __future__ import annotations

import importlib
import inspect

from .base import PositionalEncoding

# name -> "module:Class"; modules are imported on first use so one broken encoding
# cannot break the import of the others.
_SPECS: dict[str, str] = {
    "nope": "nope:NoPE",
    "learned": "learned:LearnedAbsolute",
    "sinusoidal": "sinusoidal:Sinusoidal",
    "rope": "rope:RoPE",
    "alibi": "alibi:ALiBi",
    "kerple_log": "kerple:KerpleLog",
    "kerple_power": "kerple:KerplePower",
    "t5": "t5:T5RelativeBias",
    "fire": "fire:FIRE",
}
ENCODINGS: tuple[str, ...] = tuple(_SPECS)
_EXTRA: dict[str, type] = {}


def register(name: str, cls: type) -> None:
    """Register an encoding defined outside this package (research forks, tests)."""
    if not (isinstance(cls, type) and issubclass(cls, PositionalEncoding)):
        raise TypeError(f"{cls!r} is not a PositionalEncoding subclass")
    _EXTRA[name] = cls


def encoding_class(name: str) -> type:
    if name in _EXTRA:
        return _EXTRA[name]
    if name not in _SPECS:
        allowed = ", ".join(sorted(set(_SPECS) | set(_EXTRA)))
        raise ValueError(f"unknown position encoding {name!r}; allowed: {allowed}")
    module, cls = _SPECS[name].split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), cls)


def build_encoding(name: str, *, num_heads: int, head_dim: int, **options) -> PositionalEncoding:
    cls = encoding_class(name)
    params = inspect.signature(cls.__init__).parameters
    accepted = [p for p in params if p not in ("self", "num_heads", "head_dim")
                and params[p].kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for position encoding {name!r}; "
                         f"allowed: {', '.join(sorted(accepted)) or '(none)'}")
    return cls(num_heads=num_heads, head_dim=head_dim, **options)

"""A stored config (a checkpoint's, an exported model's config.json) names components, never code.

Hydra builds whatever `_target_` a config names. A config that comes from a file someone else
wrote (a shared checkpoint, a downloaded model folder) is therefore checked before anything is
built or imported from it:

- a `_target_` may appear only where a component goes (`architecture.decoder`, `data.source`,
  ...) and must name a registered component of that kind (`imcap.registry.allowed_targets()`);
- no other Hydra key (`_args_`, `_partial_`, `_recursive_`, `_convert_`, ...);
- values are plain JSON (None, bool, int, float, str, lists, dicts with str keys), and strings
  hold no `${...}` interpolation (resolvers run code too).

Anything else is refused with one line naming the key path. The stored values are checked too
(`check_stored_values`): a format number newer than this imcap reads, a decoding option it does
not know or a value of the wrong type is one line saying to upgrade imcap, not a traceback.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

from imcap import __version__
from imcap.errors import ImcapError
from imcap.plugins import how_to_provide
from imcap.registry import allowed_targets

# the format of what imcap stores (a checkpoint's `format`, a model folder's `imcap_format`):
# raised when a change means an older imcap would misread it; a newer number is refused
FORMAT = 1
UPGRADE = "upgrade imcap (pip install -U imcap) to read it"

# where a component may be named in a stored config, and which kind it must be
COMPONENT_SLOTS: dict[str, str] = {
    "architecture.encoder": "encoder",
    "architecture.decoder": "decoder",
    "architecture.attention": "attention",
    "architecture.embedding": "embedding",
    "data": "datamodule",
    "data.source": "source",
}
_SCALARS = (type(None), bool, int, float, str)


def check_stored_config(tree: Any, origin: str, path: str = "") -> None:
    """Refuse `tree` (plain containers) unless it names only registered components in their slots.

    `origin` names the file in the error ("checkpoint x.ckpt"); `path` is the key path of `tree`
    itself ("architecture", "data").
    """
    allowed = allowed_targets()

    def refuse(where: str, why: str) -> ImcapError:
        return ImcapError(f"{origin} is refused: {where or '<root>'} {why}; a stored config may only "
                          "name imcap's registered components (imcap.registry), never other code")

    def walk(node: Any, where: str) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                if not isinstance(key, str):
                    raise refuse(where, f"has a non-string key {key!r}")
                child = f"{where}.{key}" if where else key
                if key == "_target_":
                    check_target(value, where, child)
                elif key.startswith("_") and key.endswith("_"):
                    raise refuse(child, "is a Hydra instruction")
                else:
                    walk(value, child)
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}[{i}]")
        elif not isinstance(node, _SCALARS):
            raise refuse(where, f"holds a {type(node).__name__}, not a plain value")
        elif isinstance(node, str) and "${" in node:
            raise refuse(where, f"holds an interpolation {node!r}")

    def check_target(value: Any, slot: str, where: str) -> None:
        kind = COMPONENT_SLOTS.get(slot)
        if kind is None:
            raise refuse(where, f"names {value!r} where no component goes")
        if value is None:  # e.g. model/attention=none
            return
        if isinstance(value, str) and value not in allowed:  # perhaps a plugin's: say how to load it
            raise ImcapError(f"{origin} is refused: {where} names the {kind} {value!r}, which no loaded "
                             f"module registers; {how_to_provide()}")
        if not isinstance(value, str) or allowed.get(value, (None,))[0] != kind:
            raise refuse(where, f"names {value!r}, which is not a registered {kind}")

    walk(tree, path)


def check_stored_values(stored: Mapping[str, Any], origin: str, format_key: str = "format") -> None:
    """Refuse a stored config whose format number is newer than this imcap reads, or whose
    decoding settings hold an option it does not know or a value of the wrong type."""
    number = stored.get(format_key)
    if number is not None:  # None: written before the number was stored, i.e. format 1
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise ImcapError(f"{origin} has {format_key}={number!r}, not a format number; the file is damaged: "
                             "use another checkpoint or export the model again")
        if number > FORMAT:
            raise ImcapError(f"{origin} has {format_key}={number}, a newer format than this imcap "
                             f"({__version__}) reads (up to {FORMAT}); {UPGRADE}")
    decoding = stored.get("decoding")
    if decoding is None:
        return
    if not isinstance(decoding, Mapping):
        raise ImcapError(f"{origin} stores decoding={decoding!r}, not a mapping of decoding options; "
                         "the file is damaged: use another checkpoint or export the model again")
    for key, value in decoding.items():
        problem = decoding_problem(key, value)
        if problem == "unknown":
            raise ImcapError(f"{origin} stores decoding.{key}, an option this imcap ({__version__}) does not know "
                             f"(a newer imcap wrote it); {UPGRADE}")
        if problem:
            raise ImcapError(f"{origin} stores decoding.{key}={value!r}, which is not {problem} (a newer imcap "
                             f"wrote it, or the file was edited); {UPGRADE}, or use a checkpoint written by this one")


def check_decoding_overrides(overrides: Mapping[str, Any]) -> None:
    """Refuse a `decoding.*` value from the command line that has the wrong type."""
    from imcap.models.search import Decoding

    for key, value in overrides.items():
        problem = decoding_problem(key, value)
        if problem == "unknown":  # the config holds every option (imcap.config_compose): only `+decoding.x=`
            raise ImcapError(f"decoding.{key} is not a decoding option; choose one of "
                             f"{', '.join(f.name for f in dataclasses.fields(Decoding))}")
        if problem:
            default = Decoding().to_config()[key]
            raise ImcapError(f"decoding.{key}={value!r} is not {problem}; e.g. decoding.{key}={default}")


def decoding_problem(key: str, value: Any) -> str | None:
    """Why `value` cannot be decoding option `key`: "unknown" (no such option), or what the
    value should be (e.g. "an integer"); None when it fits."""
    from imcap.models.search import Decoding

    hints = typing.get_type_hints(Decoding)
    if key not in hints:
        return "unknown"
    return None if _fits(value, hints[key]) else _describe(hints[key])


def _fits(value: Any, hint: Any) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_fits(value, option) for option in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:  # tuple[str, ...]: stored as a list
        return isinstance(value, (list, tuple)) and all(_fits(v, typing.get_args(hint)[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(option) for option in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        inner = typing.get_args(hint)[0]
        return f"a list of {'strings' if inner is str else _describe(inner)}"
    return {type(None): "null", bool: "true or false", int: "an integer", float: "a number",
            str: "a string"}.get(hint, getattr(hint, "__name__", str(hint)))

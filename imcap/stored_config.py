"""A stored config (a checkpoint's, an exported model's config.json) names components, never code.

Hydra builds whatever `_target_` a config names. A config that comes from a file someone else
wrote (a shared checkpoint, a downloaded model folder) is therefore checked before anything is
built or imported from it:

- a `_target_` may appear only where a component goes (`architecture.decoder`, `data.source`,
  ...) and must name a registered component of that kind (`imcap.registry.allowed_targets()`);
- no other Hydra key (`_args_`, `_partial_`, `_recursive_`, `_convert_`, ...);
- values are plain JSON (None, bool, int, float, str, lists, dicts with str keys), and strings
  hold no `${...}` interpolation (resolvers run code too).

Anything else is refused with one line naming the key path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from imcap.errors import ImcapError
from imcap.plugins import how_to_provide
from imcap.registry import allowed_targets

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
                             f"module registers; {how_to_provide(value)}")
        if not isinstance(value, str) or allowed.get(value, (None,))[0] != kind:
            raise refuse(where, f"names {value!r}, which is not a registered {kind}")

    walk(tree, path)

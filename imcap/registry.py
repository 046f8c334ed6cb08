"""One home for the names of imcap's components, in the style of torchvision's `register_model`.

Each component class registers itself where it is defined:

    @register("attention", "additive")
    class AdditiveAttention(Attention): ...

and everything that needs a list of names derives it from here: the valid decoder x attention
pairs, the sweep over attention variants, the test matrix, and the allowlist of `_target_`s a
checkpoint may name (a checkpoint names components; it never names code).

A component of one's own registers the same way from its own module, a plugin: loaded with
`plugins=[my_pkg.attention]` or an installed package's `imcap.plugins` entry point (imcap.plugins).
The registry imports imcap's own modules and the installed plugins the first time it is consulted.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from imcap.errors import ImcapError
from imcap.plugins import import_modules, load_installed_plugins

T = TypeVar("T", bound=type)

KINDS = ("encoder", "decoder", "attention", "embedding", "source", "datamodule", "metric")

_DECORATED = re.compile(r"^@(registry\.)?register\(", re.MULTILINE)


def modules_that_register(root: Path, package: str) -> tuple[str, ...]:
    """The modules of `package` (its folder `root`) with a class decorated `@register(...)` at
    the start of a line, found by reading the files as text: nothing is imported."""
    found = []
    for path in sorted(root.rglob("*.py")):
        if _DECORATED.search(path.read_text(encoding="utf-8")):
            parts = path.relative_to(root).with_suffix("").parts
            found.append(".".join((package, *parts[: -1 if parts[-1] == "__init__" else None])))
    return tuple(found)


# The modules whose import registers imcap's own components (a few ms to find; they are imported
# when the registry is first consulted): a new component module needs no entry anywhere
BUILTIN_MODULES = modules_that_register(Path(__file__).parent, "imcap")

_registry: dict[str, dict[str, type]] = {kind: {} for kind in KINDS}


def target_of(cls: type) -> str:
    """The dotted path Hydra's `_target_` uses for `cls`."""
    return f"{cls.__module__}.{cls.__qualname__}"


def register(kind: str, name: str) -> Callable[[T], T]:
    """Class decorator: record `cls` as the `kind` component called `name`.

    Re-registering the same class (a reloaded module) is allowed; a second class under a taken
    name is refused, so two components can never answer to one config option.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown component kind {kind!r}; kinds are {KINDS}")

    def decorate(cls: T) -> T:
        taken = _registry[kind].get(name)
        if taken is not None and target_of(taken) != target_of(cls):
            raise ValueError(f"{kind} {name!r} is already registered to {target_of(taken)}")
        _registry[kind][name] = cls
        cls.registry_name = name
        return cls

    return decorate


def import_components(modules: Iterable[str] = BUILTIN_MODULES) -> None:
    """Import modules so that the components they define are registered; with the default,
    imcap's own modules and then the installed plugins (`imcap.plugins` entry points)."""
    import_modules(modules)
    if modules is BUILTIN_MODULES:
        load_installed_plugins()


def components(kind: str) -> dict[str, type]:
    """Every registered `kind` component, name -> class, in registration order."""
    import_components()
    return dict(_registry[kind])


def names(kind: str, pattern: str = "*") -> list[str]:
    """Registered names of `kind` that match a shell-style wildcard, sorted."""
    return sorted(n for n in components(kind) if fnmatch.fnmatch(n, pattern))


def get(kind: str, name: str) -> type:
    """The `kind` component called `name`, or a one-line error listing the choices."""
    found = components(kind).get(name)
    if found is None:
        raise ImcapError(f"unknown {kind} {name!r}; choose one of {names(kind)}")
    return found


def name_of(obj: object) -> str | None:
    """The registered name of a component class or instance (None if it is not one)."""
    cls = obj if isinstance(obj, type) else type(obj)
    return cls.__dict__.get("registry_name")


def allowed_targets() -> dict[str, tuple[str, str]]:
    """Every registered component's `_target_` -> (kind, name): what a checkpoint may name."""
    import_components()
    return {target_of(cls): (kind, name) for kind, found in _registry.items() for name, cls in found.items()}

"""Components of one's own: a module outside imcap that registers them as imcap's own modules do,

    @register("attention", "cosine")
    class CosineAttention(Attention): ...

plus its YAML in the user's own config directory (`hydra.searchpath=[file:///abs/conf]` or
`--config-dir /abs/conf`). Two ways to have such a module imported:

- `plugins=[my_pkg.attention, ...]` on the command line or in a config of one's own: every entry
  point imports them before its task starts (imcap.entry), and so do
  `Captioner.from_checkpoint / from_pretrained / load(..., plugins=[...])`;
- an entry point in the group `imcap.plugins` of an installed package (pyproject.toml:
  `[project.entry-points."imcap.plugins"] my_pkg = "my_pkg.components"`), imported the first
  time the registry is consulted, after imcap's own modules.

Which modules get imported is decided by the user's command line, config and installed packages,
never by a checkpoint: a stored config only names registered components (imcap.config_checks).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from imcap.errors import ImcapError

ENTRY_POINT_GROUP = "imcap.plugins"
_MODULE_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_installed_loaded = False


def import_modules(modules: Iterable[str], what: str = "component module") -> None:
    """Import modules by dotted name; one that is not there is a one-line error naming it.

    A module that is there but fails inside (a dependency it imports is missing, a bug) keeps its
    traceback: that is the module author's to fix, and the traceback says where.
    """
    for module in modules:
        if not isinstance(module, str) or not _MODULE_NAME.match(module):
            raise ImcapError(f"{what} {module!r} is not a module name; give a dotted name as in "
                             "`import`, e.g. plugins=[my_pkg.attention]")
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            # the module itself, or a package on its path (my_pkg of my_pkg.attention), is missing
            if e.name is None or not (module == e.name or module.startswith(e.name + ".")):
                raise
            raise ImcapError(f"{what} {module!r} cannot be imported ({e}); install it or put its "
                             "folder on PYTHONPATH, or check the name") from e


def load_plugins(plugins: str | Iterable[str] | None) -> None:
    """Import the user's plugin modules (`plugins=[...]`: a list, one name, or None)."""
    if not plugins:
        return
    if isinstance(plugins, str):
        plugins = [plugins]
    elif not isinstance(plugins, Iterable) or isinstance(plugins, dict) or hasattr(plugins, "keys"):
        raise ImcapError(f"plugins={plugins!r} is not a list of modules; write plugins=[my_pkg.attention]")
    import_modules(list(plugins), "plugin module")


def installed_plugins() -> list[EntryPoint]:
    """The `imcap.plugins` entry points of installed packages, by name."""
    return sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def load_installed_plugins() -> None:
    """Import every installed plugin once (the registry calls this when first consulted)."""
    global _installed_loaded
    if _installed_loaded:
        return
    _installed_loaded = True  # a plugin that consults the registry while importing must not recurse
    try:
        for ep in installed_plugins():
            _load_entry_point(ep)
    except BaseException:
        _installed_loaded = False  # the next consultation says it again
        raise


def _load_entry_point(ep: EntryPoint) -> Any:
    dist = getattr(ep, "dist", None)
    origin = (f"plugin {ep.name!r} (entry point in group {ENTRY_POINT_GROUP!r} of the installed package "
              f"{dist.name if dist is not None else '?'!r})")
    try:
        return ep.load()
    except ModuleNotFoundError as e:
        module = ep.module
        if e.name is None or not (module == e.name or module.startswith(e.name + ".")):
            raise  # a real import error inside the plugin keeps its traceback
        raise ImcapError(f"{origin} names module {module!r}, which cannot be imported ({e}); "
                         "reinstall that package or uninstall it") from e
    except AttributeError as e:
        raise ImcapError(f"{origin} names {ep.value!r}, which does not exist ({e}); "
                         "reinstall that package or uninstall it") from e


def how_to_provide() -> str:
    """What to do about a stored config that names a component nobody registered. Generic on
    purpose: the module part of the name is the file's choice (a shared checkpoint may name
    `os.system`), so the hint never quotes it as a module to load."""
    return ("if it is a component of your own, load the module that registers it with plugins=[your_pkg.module] "
            "(on the command line, in your config, or Captioner.from_checkpoint(path, plugins=[...])) or install "
            f"the package that declares it as an {ENTRY_POINT_GROUP!r} entry point; never load a module only "
            "because a file names it")

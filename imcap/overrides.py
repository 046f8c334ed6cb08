"""What a command line's overrides may name and say: which files of a config group are bases (not
options), and which values Hydra's override grammar reads unquoted, with the quoted form of one it
cannot read. Used by the entry points (imcap.entry) and by configs composed outside them
(imcap.config_compose: the data tools, tests)."""

from __future__ import annotations

import os
from typing import Any


def is_base_file(option: str) -> bool:
    """A `_`-file of a config group (data/_base.yaml) is the base its options extend, not an option
    (docs/guides/configuration.md)."""
    return option.rsplit("/", 1)[-1].startswith("_")


def hide_base_files() -> None:
    """Hydra lists every file of a group as one of its options (--help, tab completion, glob()
    sweeps): leave its bases out. Hydra has no setting for it (its help template's
    $APP_CONFIG_GROUPS lists what this method returns), hence the wrap; composition reads the
    files through another path, so choosing and composing are unchanged."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    listed = ConfigLoaderImpl.get_group_options
    if getattr(listed, "leaves_out_bases", False):
        return

    def get_group_options(self: Any, *args: Any, **kwargs: Any) -> list[str]:
        return [option for option in listed(self, *args, **kwargs) if not is_base_file(option)]

    get_group_options.leaves_out_bases = True  # type: ignore[attr-defined]
    ConfigLoaderImpl.get_group_options = get_group_options  # type: ignore[method-assign]


# what a value of an override may hold outside quotes (hydra/grammar/OverrideLexer.g4: ASCII only)
UNQUOTED = "ASCII letters, digits, spaces and _ - + . / \\ : $ % * @ ? |"


def _quoted(override: str) -> str | None:
    """`override` with its value (each item of a [list]) in Hydra's double quotes, inside the shell's
    single quotes, `~/` as the home folder; None where the value holds quotes or brackets of its own."""
    key, value = override.split("=", 1)
    listed = value.startswith("[") and value.endswith("]")
    items = value[1:-1].split(",") if listed else [value]
    if any(mark in item for item in items for mark in "'\"[](){}"):
        return None
    # inside quotes the shell leaves `~` as it is, and imcap reads paths as given: the home folder written out
    quoted = ",".join(f'"{os.path.expanduser(item.strip())}"' for item in items)
    return f"'{key}=[{quoted}]'" if listed else f"'{key}={quoted}'"


def unreadable_override(args: list[str]) -> str | None:
    """The error line for the first of `args` that Hydra's override grammar cannot read, naming it
    and how to quote it; None if every override reads (Hydra refused something else)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for arg in args:
        if arg.startswith("-") or "=" not in arg:  # a flag (-m, --config-name=x) or a flag's value
            continue
        try:
            parser.parse_overrides([arg])
        except OverrideParseException as exc:
            said = str(exc).splitlines()[0]  # a lexer's error only repeats the override; a parser's says what it met
            why = "" if said.startswith(("LexerNoViableAltException", "Error parsing override")) else f" ({said})"
            key = arg.split("=", 1)[0]
            try:
                parser.parse_overrides([f"{key}=x"])
            except OverrideParseException:  # no quotes help a key: `model.decoder.hidden dim=3`
                return f"cannot read the override {arg}{why}: an option's name holds ASCII letters, digits, _ - and dots"
            quoted = _quoted(arg)
            fix = f"quote it: {quoted}" if quoted else "quote the value (\"...\") inside the shell's quotes"
            return f"cannot read the override {arg}{why}: outside quotes a value may hold only {UNQUOTED}; {fix}"
    return None

"""Config folders of one's own, as a user keeps them outside the repository."""

from __future__ import annotations

from pathlib import Path


def own_data_without_root(folder: Path) -> Path:
    """`folder` holding data/mine.yaml: a data option of one's own that extends _base and names
    no root (for `hydra.searchpath=[file://FOLDER] data=mine`)."""
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "mine.yaml").write_text(
        "defaults: [_base, _self_]\nsource:\n  _target_: imcap.data.sources.custom.CustomSource\n", encoding="utf-8")
    return folder

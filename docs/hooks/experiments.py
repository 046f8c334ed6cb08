"""mkdocs hook: the figures of the study READMEs that docs pages include, served from experiments/.

A results page is one snippet line, `--8<-- "experiments/<study>/README.md"`; the README's relative
links (`![...](results-shapes.png)`) then resolve next to the page. This hook adds each file they
link to, read from experiments/ at build time, at the path the link resolves to, so a new or rerun
figure needs no copy under docs/ (and none can go stale). A link to a file that does not exist is
left alone: `mkdocs build --strict` reports it on the page.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

# pymdownx.snippets' one-line form; the docs pages include study READMEs this way
SNIPPET = re.compile(r"""^[ \t]*-+8<-+[ \t]+(["'])(?P<path>experiments/[^"'\n]+\.md)\1""", re.M)
# the target of a Markdown link or image, `](target)` or `](<target> "title")`
LINK = re.compile(r"\]\(\s*<?(?P<target>[^)\s>]+)")


def repo_root(config: MkDocsConfig) -> Path:
    return Path(config.config_file_path).resolve().parent


def linked_files(readme: Path) -> list[str]:
    """The relative link targets of `readme` that are files beside it or below it in experiments/
    (not pages: a link to another README stays a link mkdocs checks)."""
    experiments = readme.parents[1]
    found = []
    for match in LINK.finditer(readme.read_text(encoding="utf-8")):
        target = match["target"].split("#", 1)[0]
        if not target or "://" in target or target.startswith(("/", "mailto:")) or target.endswith(".md"):
            continue
        source = (readme.parent / target).resolve()
        if source.is_file() and source.is_relative_to(experiments):
            found.append(target)
    return found


def on_files(files: Files, config: MkDocsConfig) -> Files:
    root = repo_root(config)
    served: dict[str, Path] = {}  # src_uri in the site -> the file in experiments/
    for page in files.documentation_pages():
        for include in SNIPPET.finditer(page.content_string):
            readme = root / include["path"]
            if not readme.is_file():
                continue  # pymdownx.snippets (check_paths) fails the build on the page itself
            for target in linked_files(readme):
                uri = posixpath.normpath(posixpath.join(posixpath.dirname(page.src_uri), target))
                source = (readme.parent / target).resolve()
                if served.get(uri, source) != source:
                    raise PluginError(f"error: docs/{uri} would be both {served[uri].relative_to(root)} and "
                                      f"{source.relative_to(root)}: rename one of them in its study")
                existing = files.get_file_from_path(uri)
                if existing is not None and uri not in served:
                    raise PluginError(f"error: docs/{uri} is a copy of {source.relative_to(root)}, which the "
                                      f"docs serve from experiments/ at build time: delete docs/{uri}")
                if uri not in served:
                    files.append(File.generated(config, uri, abs_src_path=str(source)))
                    served[uri] = source
    return files


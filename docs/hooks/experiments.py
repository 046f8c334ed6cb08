"""mkdocs hook: the study files that docs pages show, served from experiments/ when the site builds.

A page shows a study's file in one of two ways, and the hook serves what both link to:
- a results page is one snippet line, `--8<-- "experiments/<study>/README.md"`; the README's
  relative links (`![...](results-shapes.png)`) then resolve next to the page;
- any page links a study's file at its path in the repository, relative to the page, as GitHub
  resolves it: `../experiments/<study>/<file>` from docs/index.md, `../../experiments/...` one
  folder down. The site serves the file at `experiments/<study>/<file>` and the link is rewritten
  to point there (`on_page_markdown`), so one link works on GitHub and in the site.
Each linked file is added, read from experiments/ at build time, so a new or rerun figure needs no
copy under docs/ (and none can go stale): a file under docs/ at such a path, or with the bytes of a
study's file under any name, fails the build. A link to a file that does not exist is left alone:
`mkdocs build --strict` reports it on the page.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from collections.abc import Iterator
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

# pymdownx.snippets' one-line form; the docs pages include study READMEs this way
SNIPPET = re.compile(r"""^[ \t]*-+8<-+[ \t]+(["'])(?P<path>experiments/[^"'\n]+\.md)\1""", re.M)
# the target of a Markdown link or image, `](target)` or `](<target> "title")`
LINK = re.compile(r"\]\(\s*<?(?P<target>[^)\s>]+)")


def repo_root(config: MkDocsConfig) -> Path:
    return Path(config.config_file_path).resolve().parent


def relative_link_matches(markdown: str) -> Iterator[re.Match[str]]:
    """The links of `markdown` whose targets are relative and may be files (not pages: a link to a
    Markdown file stays a link mkdocs checks); `match["target"]` may end in an #anchor."""
    for match in LINK.finditer(markdown):
        target = match["target"].split("#", 1)[0]
        if target and "://" not in target and not target.startswith(("/", "mailto:")) and not target.endswith(".md"):
            yield match


def relative_links(markdown: str) -> list[str]:
    """The relative link targets in `markdown` that may be files, without their #anchors."""
    return [match["target"].split("#", 1)[0] for match in relative_link_matches(markdown)]


def linked_files(readme: Path) -> list[str]:
    """The relative link targets of `readme` that are files beside it or below it in experiments/."""
    experiments = readme.parents[1]
    found = []
    for target in relative_links(readme.read_text(encoding="utf-8")):
        source = (readme.parent / target).resolve()
        if source.is_file() and source.is_relative_to(experiments):
            found.append(target)
    return found


def study_file(page_uri: str, target: str, root: Path, docs: str) -> tuple[str, Path] | None:
    """(path in the site, file under experiments/) that a page's link `target` names, read as
    GitHub reads it (relative to the page in the repository); None if it names no study file."""
    uri = posixpath.normpath(posixpath.join(docs, posixpath.dirname(page_uri), target))  # from the repository root
    source = (root / uri).resolve()
    if uri.startswith("experiments/") and source.is_file() and source.is_relative_to(root / "experiments"):
        return uri, source  # the site mirrors the repository's path: served at the same uri
    return None


def study_files(page_uri: str, markdown: str, root: Path, docs: str) -> Iterator[tuple[str, Path]]:
    """(path in the site, file under experiments/) for each study file the page links directly."""
    for target in relative_links(markdown):
        if (found := study_file(page_uri, target, root, docs)) is not None:
            yield found


def included_files(page_uri: str, markdown: str, root: Path) -> Iterator[tuple[str, Path]]:
    """(path in the site, file under experiments/) for each file the study READMEs that the page
    includes link to."""
    for include in SNIPPET.finditer(markdown):
        readme = root / include["path"]
        if not readme.is_file():
            continue  # pymdownx.snippets (check_paths) fails the build on the page itself
        for target in linked_files(readme):
            yield (posixpath.normpath(posixpath.join(posixpath.dirname(page_uri), target)),
                   (readme.parent / target).resolve())


def docs_path(config: MkDocsConfig) -> str:
    """docs_dir as a path from the repository root (`docs`)."""
    return Path(config.docs_dir).resolve().relative_to(repo_root(config)).as_posix()


def on_files(files: Files, config: MkDocsConfig) -> Files:
    root, docs = repo_root(config), docs_path(config)
    served: dict[str, Path] = {}  # src_uri in the site -> the file in experiments/
    for page in files.documentation_pages():
        markdown = page.content_string
        for uri, source in [*included_files(page.src_uri, markdown, root),
                            *study_files(page.src_uri, markdown, root, docs)]:
            if served.get(uri, source) != source:
                raise PluginError(f"error: docs/{uri} would be both {served[uri].relative_to(root)} and "
                                  f"{source.relative_to(root)}: rename one of them in its study")
            if uri in served:
                continue
            if files.get_file_from_path(uri) is not None:
                raise PluginError(f"error: docs/{uri} is a copy of {source.relative_to(root)}, which the "
                                  f"docs serve from experiments/ at build time: delete docs/{uri}")
            files.append(File.generated(config, uri, abs_src_path=str(source)))
            served[uri] = source
    refuse_copies(files, Path(config.docs_dir).resolve(), root)
    return files


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    """Each link to a study file, written as its path in the repository from the page (which GitHub
    shows), pointed at where the site serves the file, which mkdocs then checks like any link."""
    root, docs = repo_root(config), docs_path(config)
    page_dir = posixpath.dirname(page.file.src_uri)
    parts, end = [], 0
    for match in relative_link_matches(markdown):
        target, hash_, anchor = match["target"].partition("#")
        if (found := study_file(page.file.src_uri, target, root, docs)) is None:
            refuse_site_only_link(page.file.src_uri, target, root, docs)
            continue
        parts += [markdown[end:match.start("target")], posixpath.relpath(found[0], page_dir or "."), hash_, anchor]
        end = match.end("target")
    return "".join(parts) + markdown[end:]


def refuse_site_only_link(page_uri: str, target: str, root: Path, docs: str) -> None:
    """A link to a study file by its path in the site (`experiments/...` from docs/index.md), which
    GitHub shows as a broken link, fails the build in one line naming the link to write instead."""
    uri = posixpath.normpath(posixpath.join(posixpath.dirname(page_uri), target))
    if uri.startswith("experiments/") and (root / uri).is_file() and not (root / docs / uri).exists():
        fix = posixpath.relpath(uri, posixpath.join(docs, posixpath.dirname(page_uri)))
        raise PluginError(f"error: {docs}/{page_uri} links {target}, which is not a file on GitHub "
                          f"({posixpath.join(docs, uri)}): link {fix}, the file's path from the page")


def refuse_copies(files: Files, docs_dir: Path, root: Path) -> None:
    """A file of docs/ with the bytes of a file under experiments/, under any name (a hand copy
    of a figure, which goes stale when the study reruns), fails the build in one line."""
    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    ours = [(file.src_uri, Path(file.abs_src_path)) for file in files
            if file.abs_src_path and Path(file.abs_src_path).resolve().is_relative_to(docs_dir)]
    theirs = [path for path in (root / "experiments").rglob("*") if path.is_file()]
    # only files of a size both sides have are read
    sizes = {path.stat().st_size for _, path in ours} & {path.stat().st_size for path in theirs}
    studies = {digest(path): path for path in theirs if path.stat().st_size in sizes}
    for uri, path in ours:
        if path.stat().st_size in sizes and (source := studies.get(digest(path))) is not None:
            study = source.relative_to(root)
            raise PluginError(f"error: docs/{uri} is a copy of {study}: link {study} from the page instead "
                              f"(the docs serve it from experiments/ at build time) and delete docs/{uri}")

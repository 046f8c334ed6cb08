"""The commands of README.md and docs/getting-started/*.md, run as a user runs them.

Every ```bash, ```sh, ```console and ```python block of those pages runs, in page order, in a new
process and a fresh working directory, where small folders stand in for the datasets a user would
download (`write_fixtures`). A block that cannot run here (a download, a W&B account, a server
that runs until stopped) is preceded by `<!-- docs-test: skip (reason) -->` and a visible line
saying so. The blocks are run as written; what the test adds lives in two places below:
`TINY_ARGS`, an `ARGS` environment variable that make reads when a block gives none (so
`make train` trains for a few batches), and `SUBSTITUTIONS`, for the placeholders a user fills in.
The site itself builds (`make docs`) with the study figures served from experiments/
(docs/hooks/experiments.py).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.coco import write_official
from tests.helpers.images import write_image

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs" / "getting-started").glob("*.md"))]
RUNNABLE = ("bash", "sh", "console", "python")
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->")
FENCE = re.compile(r"^```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^```\s*$", re.M | re.S)

# make reads ARGS from the environment when a command line gives none: a few batches, and no
# METEOR (its Java start is tested in tests/metrics)
TINY_ARGS = ("trainer.max_epochs=1 trainer.limit_train_batches=2 trainer.limit_val_batches=1 "
             "trainer.limit_test_batches=1 data.eval_batch_size=16 model.test_metrics=[BLEU,CIDEr-D]")
# placeholder in a page -> what stands in for it (a function of the working directory)
SUBSTITUTIONS = {
    "logs/train/runs/<run>": lambda cwd: newest_run(cwd),
}


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    text: str
    skip: str | None  # the reason, when the page marks it

    def __str__(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The runnable fenced blocks of `page`, each with the skip marker just above it, if any."""
    text = page.read_text(encoding="utf-8")
    found, previous_end = [], 0
    for match in FENCE.finditer(text):
        lang = match["lang"].lower()
        marker = SKIP.search(text, previous_end, match.start())  # between the previous block and this one
        previous_end = match.end()
        if lang in RUNNABLE:
            found.append(Block(page, text.count("\n", 0, match.start()) + 1, lang, match["body"],
                               marker["reason"] if marker else None))
    return found


def newest_run(cwd: Path) -> str:
    runs = sorted((cwd / "logs" / "train" / "runs").glob("*/checkpoints/best.ckpt"), key=lambda p: p.stat().st_mtime)
    assert runs, f"no trained run under {cwd}/logs/train/runs for the block to use"
    return str(runs[-1].parents[1].relative_to(cwd))


def substitute(text: str, cwd: Path) -> str:
    for placeholder, value in SUBSTITUTIONS.items():
        if placeholder in text:
            text = text.replace(placeholder, value(cwd))
    return text


def commands(block: Block) -> str:
    if block.lang == "console":  # `$ command` lines; the rest is what it prints
        return "\n".join(line[2:] for line in block.text.splitlines() if line.startswith("$ "))
    return block.text


def run_block(block: Block, cwd: Path, data: Path | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """`block` run in `cwd`; with `data`, the datasets and feature cache are there (IMCAP_DATA_DIR)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "IMCAP_ROOT": str(cwd), "ARGS": TINY_ARGS, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           **({"IMCAP_DATA_DIR": str(data)} if data else {})}
    text = substitute(commands(block), cwd)
    argv = [sys.executable, "-c", text] if block.lang == "python" else ["bash", "-e", "-o", "pipefail", "-c", text]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def write_fixtures(cwd: Path, data: Path | None = None) -> None:
    """A working directory as a user has it: the checkout's Makefile and .venv, a photo, and
    small folders in the layouts `make data` and `custom` read, standing in for the datasets;
    those in the data folder (`data`, default cwd/data) are written once, when it has none."""
    data = data or cwd / "data"
    new_data = not (data / "flickr8k").is_dir()
    for name in ("Makefile", ".venv"):
        (cwd / name).symlink_to(REPO / name)
    colours = {"red": (200, 30, 30), "green": (30, 160, 60), "blue": (40, 60, 200), "yellow": (220, 200, 40),
               "purple": (120, 40, 140), "orange": (230, 130, 30)}
    things = ["dog", "ball", "car", "house", "boat"]
    captions = {}
    for i in range(30):
        colour, thing = list(colours)[i % len(colours)], things[i % len(things)]
        captions[i] = [f"a {colour} {thing} on the grass", f"the {thing} is {colour}", f"a {thing} that is {colour}",
                       f"one {colour} {thing}", f"a small {colour} {thing} outside"]
        if new_data:
            write_image(data / "flickr8k" / "Flicker8k_Dataset" / f"{1000 + i}_fixture.jpg", colours[colour], 32)
        write_image(cwd / "my_photos" / "beach" / f"img_{i:04d}.jpg", colours[colour], 32)
    (cwd / "my_photos" / "captions.csv").write_text("image,caption\n" + "".join(
        f"beach/img_{i:04d}.jpg,{text}\n" for i, texts in captions.items() for text in texts), encoding="utf-8")
    write_image(cwd / "photo.jpg", colours["red"], 64)
    if not new_data:
        return
    (data / "flickr8k" / "Flickr8k.token.txt").write_text("".join(
        f"{1000 + i}_fixture.jpg#{k}\t{text}\n" for i, texts in captions.items() for k, text in enumerate(texts)),
        encoding="utf-8")
    coco_captions = ["a red dog on the grass", "a blue car in the street", "a green ball on the grass",
                     "the dog is red", "a car that is blue"]
    write_official(data / "coco", "train", range(1, 25), captions=coco_captions, size=32)
    write_official(data / "coco", "val", range(100, 112), captions=coco_captions, size=32)


def page_id(page: Path) -> str:
    return str(page.relative_to(REPO))


def test_every_page_has_blocks_and_every_skip_says_why_in_the_page():
    for page in PAGES:
        found = blocks(page)
        assert any(b.skip is None for b in found), f"{page_id(page)}: no block that runs"
        text = page.read_text(encoding="utf-8")
        for marker in SKIP.finditer(text):  # the HTML comment is invisible: a line the reader sees follows
            after = text[marker.end():].lstrip("\n").split("\n", 1)[0]
            assert after.startswith("*(Not run by the docs test"), f"{page_id(page)}: {marker[0]} has no visible note"


# each argument: a module, or a name inside one (imcap.registry.KINDS); prints those that are neither
RESOLVE = """
import importlib, sys
for name in sys.argv[1:]:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError as missing:
            if missing.name != ".".join(parts[:i]):  # the module exists and needs one that does not
                raise
            continue
        for part in parts[i:]:
            found = getattr(found, part, None)
        if found is None:
            print(name)
        break
"""


def test_every_module_and_path_the_architecture_page_names_exists():
    """Every `imcap.` dotted name on the page (in code or prose) imports, and every `imcap/` path
    is there, so a rename that misses the page fails here."""
    page = (REPO / "docs" / "explanation" / "architecture.md").read_text(encoding="utf-8")
    names = sorted(set(re.findall(r"\bimcap(?:\.\w+)+", page)))
    paths = sorted(set(re.findall(r"\bimcap/[\w/]*(?:\.py)?", page)))
    assert len(names) > 20, names
    assert [p for p in paths if not (REPO / p).exists()] == []
    result = subprocess.run([sys.executable, "-c", RESOLVE, *names], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [], f"names on the page that do not exist: {result.stdout.split()}"


def test_the_readme_is_a_page_for_users():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    for command in ("make install", "make train", "make data dataset=flickr8k", "make train dataset=flickr8k",
                    "make train dataset=custom root=DIR", "make sweep dataset=flickr8k ARGS=\"logger=wandb\"",
                    "make compare"):
        assert command in readme, command


def relative_links(markdown: str) -> list[str]:
    """The relative link targets of a page (Markdown links and images), without their #anchors."""
    targets = [match["target"].split("#", 1)[0] for match in re.finditer(r"\]\(\s*<?(?P<target>[^)\s>]+)", markdown)]
    return [target for target in targets if target and "://" not in target and not target.startswith(("mailto:", "/"))]


def test_every_relative_link_of_the_readme_is_a_file_in_the_repository():
    """GitHub renders the README's repository paths, its picture included; nothing else checks them."""
    targets = relative_links((REPO / "README.md").read_text(encoding="utf-8"))
    assert any(target.endswith(".png") for target in targets), targets
    assert [target for target in targets if not (REPO / target).is_file()] == []


def links_out_of_docs(page: Path, docs: Path = REPO / "docs") -> list[str]:
    """The page's relative links to repository files outside `docs` (read as GitHub reads them)."""
    return [target for target in relative_links(page.read_text(encoding="utf-8"))
            if not (page.parent / target).resolve().is_relative_to(docs)]


def test_every_relative_link_of_the_docs_is_a_file_at_that_path_on_github():
    """GitHub shows docs/*.md with their links relative to the page in the repository: a link to a
    study's file outside docs/ (the home page's picture) is its path from the page, which the site
    serves too (test_a_new_or_rerun_study_figure_reaches_the_site_with_no_copy_under_docs)."""
    pages = sorted((REPO / "docs").rglob("*.md"))
    broken = [f"{page_id(page)}: {target}" for page in pages for target in relative_links(page.read_text(encoding="utf-8"))
              if not (page.parent / target).exists()]
    assert broken == []
    assert "../experiments/attention_variants/example-attention-photo.png" in links_out_of_docs(REPO / "docs" / "index.md")


def site_page(site: Path, page: str) -> Path:
    """The built HTML of docs/<page> (use_directory_urls: guides/x.md -> guides/x/index.html,
    extending/index.md -> extending/index.html)."""
    stem = page.removesuffix(".md")
    return site / (f"{stem}.html" if stem == "index" or stem.endswith("/index") else f"{stem}/index.html")


def linked_site_files(site: Path, page: str) -> list[Path]:
    """The files of the site that the built page shows or links (img src, a href)."""
    html = site_page(site, page)
    targets = re.findall(r'<(?:img [^>]*src|a [^>]*href)="([^"#?]+)', html.read_text(encoding="utf-8"))
    return [(html.parent / target).resolve() for target in targets if "://" not in target
            and (html.parent / target).resolve().is_file()]


def build_site(checkout: Path, site: Path) -> subprocess.CompletedProcess:
    """`make docs` in `checkout`: the site built with --strict into `site`, in a new process."""
    return subprocess.run([str(Path(sys.executable).parent / "mkdocs"), "build", "--strict", "-d", str(site)],
                          cwd=checkout, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
                          capture_output=True, text=True, timeout=300)


def docs_checkout(tmp_path: Path) -> Path:
    """The site's sources as a checkout has them, in a folder a test may change."""
    checkout = tmp_path / "checkout"
    for name in ("docs", "experiments"):
        shutil.copytree(REPO / name, checkout / name)
    shutil.copy(REPO / "mkdocs.yml", checkout)
    (checkout / "imcap").symlink_to(REPO / "imcap")  # the API reference pages read it
    return checkout


@pytest.mark.slow
def test_a_new_or_rerun_study_figure_reaches_the_site_with_no_copy_under_docs(tmp_path):
    checkout = docs_checkout(tmp_path)
    study = checkout / "experiments" / "attention_variants"
    write_image(study / "results-new.png", (200, 30, 30), 16)
    with (study / "README.md").open("a", encoding="utf-8") as readme:
        readme.write("\n![a figure added to the study](results-new.png)\n")
    write_image(study / "results-shapes.png", (30, 160, 60), 16)  # the study rerun: its figure replaced
    write_image(study / "example-attention-photo.png", (30, 60, 160), 16)  # and the home page's picture
    write_image(study / "results-guide.png", (220, 200, 40), 16)  # linked, as GitHub reads it, one folder down
    with (checkout / "docs" / "guides" / "decoding.md").open("a", encoding="utf-8") as guide:
        guide.write("\n![a study figure](../../experiments/attention_variants/results-guide.png)\n")
    result = build_site(checkout, tmp_path / "site")
    assert result.returncode == 0, result.stderr[-3000:]
    docs = checkout / "docs"
    out_of_docs = {page: links_out_of_docs(page, docs) for page in sorted(docs.rglob("*.md"))}
    assert sum(map(len, out_of_docs.values())) >= 2, out_of_docs  # the home page's picture and the guide's
    for page, targets in out_of_docs.items():  # each shows the repository's file in the site too
        shown = [path.read_bytes() for path in linked_site_files(tmp_path / "site", page.relative_to(docs).as_posix())]
        for target in targets:
            assert (page.parent / target).read_bytes() in shown, f"{page.relative_to(checkout)}: {target} not in the site"
    for name in ("results-new.png", "results-shapes.png"):
        assert (tmp_path / "site" / "results" / name).read_bytes() == (study / name).read_bytes(), name
    home = (tmp_path / "site" / "index.html").read_text(encoding="utf-8")
    pictures = re.findall(r'<img [^>]*src="([^"]+)"', home)
    assert len(pictures) == 1, pictures
    assert (tmp_path / "site" / pictures[0]).read_bytes() == (study / "example-attention-photo.png").read_bytes(), \
        f"the home page shows {pictures[0]}, not the study's rerun picture"


@pytest.mark.slow
@pytest.mark.parametrize(("figure", "copy"), [
    ("results-shapes.png", "results/results-shapes.png"),  # at the path the hook serves it at
    ("example-attention-photo.png", "assets/attention-photo.png"),  # under a name of its own
])
def test_a_figure_copied_under_docs_fails_the_build_with_one_line_saying_to_delete_it(tmp_path, figure, copy):
    checkout = docs_checkout(tmp_path)
    (checkout / "docs" / copy).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(checkout / "experiments" / "attention_variants" / figure, checkout / "docs" / copy)
    error = the_one_build_error(build_site(checkout, tmp_path / "site"))
    assert f"error: docs/{copy} is a copy of experiments/attention_variants/{figure}" in error, error
    assert f"delete docs/{copy}" in error, error


@pytest.mark.slow
def test_a_study_file_linked_by_its_path_in_the_site_fails_the_build_naming_the_link_github_shows(tmp_path):
    """`experiments/...` from docs/index.md is where the site serves the picture, but a broken
    link on GitHub: the build says which link to write instead."""
    checkout = docs_checkout(tmp_path)
    index = checkout / "docs" / "index.md"
    picture = "experiments/attention_variants/example-attention-photo.png"
    index.write_text(index.read_text(encoding="utf-8").replace(f"../{picture}", picture), encoding="utf-8")
    error = the_one_build_error(build_site(checkout, tmp_path / "site"))
    assert f"error: docs/index.md links {picture}" in error, error
    assert f"link ../{picture}," in error, error


def the_one_build_error(result) -> str:
    """The build failed, with one `error:` line: that line."""
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error: " in line]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def test_a_renamed_option_fails_its_block(tmp_path):
    write_fixtures(tmp_path)
    block = Block(REPO / "README.md", 0, "bash", 'make train ARGS="trainer.max_epochz=1"\n', None)
    result = run_block(block, tmp_path)
    assert result.returncode != 0 and "max_epochz" in result.stderr, result.stderr


_PAGE_DIRS: dict[Path, list] = {}  # page -> [working directory, blocks run so far]
# One data folder for every page, as IMCAP_DATA_DIR shares one between checkouts: the shapes demo
# of `make train` (2,500 images) is generated and its features extracted once, by the README's
# first block in a fresh folder, instead of again for the quickstart's
_DATA: dict[str, Path] = {}


def page_data(factory: pytest.TempPathFactory) -> Path:
    if "data" not in _DATA:
        _DATA["data"] = factory.mktemp("data")
    return _DATA["data"]


def page_dir(page: Path, upto: int, factory: pytest.TempPathFactory) -> Path:
    """The page's working directory, with its blocks before `upto` run (once), as a reader
    runs them top to bottom."""
    if page not in _PAGE_DIRS:
        cwd = factory.mktemp(page.stem)
        write_fixtures(cwd, page_data(factory))
        _PAGE_DIRS[page] = [cwd, 0]
    cwd, done = _PAGE_DIRS[page]
    for block in blocks(page)[done:upto]:
        _PAGE_DIRS[page][1] += 1
        if not block.skip:
            result = run_block(block, cwd, page_data(factory))
            assert result.returncode == 0, f"an earlier block, {block}, failed:\n{result.stderr[-3000:]}"
    return cwd


PAGE_BLOCKS = [(page, index) for page in PAGES for index in range(len(blocks(page)))]


@pytest.mark.slow
@pytest.mark.parametrize(("page", "index"), PAGE_BLOCKS,
                         ids=[f"{page_id(page)}:{blocks(page)[i].line}" for page, i in PAGE_BLOCKS])
def test_a_command_block_runs(page, index, tmp_path_factory):
    block = blocks(page)[index]
    if block.skip:
        pytest.skip(f"{block}: {block.skip}")
    cwd = page_dir(page, index, tmp_path_factory)
    _PAGE_DIRS[page][1] = index + 1
    result = run_block(block, cwd, page_data(tmp_path_factory))
    assert result.returncode == 0, f"{block} failed:\n{block.text}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"

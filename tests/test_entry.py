"""How train, eval and caption start: Hydra's refusals of a command line become one `error:`
line with exit status 2 (Hydra alone prints several lines and exits 1), and a run refused before
it wrote anything leaves no folder it made."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.configs import own_data_without_root
from tests.helpers.runs import assert_one_line_error, module


@pytest.mark.slow
def test_unknown_option_names_it(tmp_path):
    result = module("train", "model.decoder.hiden_dim=3", cwd=tmp_path)
    assert_one_line_error(result, "hiden_dim")
    assert result.returncode == 2  # as for every user error (README)
    assert result.stderr.splitlines() == [
        "error: Could not override 'model.decoder.hiden_dim'; To append to your config use "
        "+model.decoder.hiden_dim=3; Key 'hiden_dim' is not in struct; full_key: model.decoder.hiden_dim"]


@pytest.mark.slow
def test_unknown_group_option_lists_the_choices(tmp_path):
    result = module("train", "model/attention=bogus", cwd=tmp_path)
    assert_one_line_error(result, "bogus", "additive, dot")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1


def tree(folder: Path) -> list[str]:
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*"))


@pytest.mark.slow
@pytest.mark.parametrize("before", [
    [],  # a fresh directory
    ["logs"],  # an empty folder the user made stays
    ["logs/train/multiruns/2026-12-01_10-00-00_ab12/0/train.log"],  # a sweep's folders stay as they are
], ids=["fresh", "empty-logs", "sweep"])
def test_a_refused_run_leaves_no_folder_it_made_and_every_folder_that_was_there(tmp_path, before):
    """A typo in a new process: no empty logs/train/runs/ left behind, nothing there before touched."""
    for name in before:
        path = tmp_path / name
        if name.endswith(".log"):
            path.parent.mkdir(parents=True)
            path.write_text("a job's log\n", encoding="utf-8")
        else:
            path.mkdir(parents=True)
    there = tree(tmp_path)
    result = module("train", "data.batch_size=-1", cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result, "data.batch_size=-1")
    assert tree(tmp_path) == there


def conf_options_left_required() -> set[str]:
    """The full key (data.root) of every `???` value in conf/, by each file's package."""
    from omegaconf import OmegaConf

    from imcap.config_compose import CONF_DIR
    from imcap.entry import missing_options

    found = set()
    for path in Path(CONF_DIR).rglob("*.yaml"):
        group = path.parent.relative_to(CONF_DIR).as_posix()
        first = path.read_text(encoding="utf-8").splitlines()[:1]
        package = first[0].split("@package", 1)[1].strip() if first and "@package" in first[0] else group.replace("/", ".")
        prefix = "" if package in ("", ".", "_global_") else f"{package}."
        found.update(prefix + key for key in missing_options(OmegaConf.load(path)))
    return found


def test_every_option_conf_leaves_required_has_its_example():
    from imcap.entry import REQUIRED_OPTIONS

    required = conf_options_left_required()
    assert {"ckpt_path", "images", "out", "data.root"} <= required  # the walk finds them
    assert required <= set(REQUIRED_OPTIONS), "give each its example in imcap.entry.REQUIRED_OPTIONS"


@pytest.mark.slow
@pytest.mark.parametrize(("command", "line"), [
    (["caption"],  # `make caption` with no ARGS
     "error: ckpt_path and images are required: give ckpt_path=RUN/checkpoints/best.ckpt (or an exported folder, "
     "or a Hub repo id) and 'images=[photo.jpg,photos/]' (image files or folders)"),
    (["export"],  # a training checkpoint only: no exported folder nor Hub repo id
     "error: ckpt_path and out are required: give ckpt_path=RUN/checkpoints/best.ckpt and out=DIR (the folder to "
     "write the exported model to)"),
    # a data option of one's own that extends _base and names no root: read through data.source.root's ${data.root}
    (["train", "hydra.searchpath=[file://{own}]", "data=mine"], "error: data.root is required: give data.root=DIR"),
], ids=["caption", "export", "train-own-data"])
def test_a_required_option_left_out_is_one_line_naming_it_with_an_example(tmp_path, command, line):
    own = own_data_without_root(tmp_path / "own")
    work = tmp_path / "work"
    work.mkdir()
    result = module(*(arg.format(own=own) for arg in command), cwd=work)
    assert result.returncode == 2
    assert_one_line_error(result, line)
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert tree(work) == []  # refused before it wrote anything: no run folder


def test_a_missing_value_the_command_did_not_leave_required_is_a_bug():
    """A `???` in a config built in code or read from a checkpoint is not the user's to give."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    from imcap.entry import missing_options, required_option_error

    command = OmegaConf.create({"ckpt_path": "???", "data": {"root": "???", "source": {"root": "${data.root}"}}})
    missing = ["ckpt_path", "data.root"]
    assert missing_options(command) == missing
    for read in (lambda: command.ckpt_path, lambda: command.data.source.root):
        with pytest.raises(Exception) as user:
            read()
        assert str(required_option_error(user.value, missing, "eval")).startswith("ckpt_path and data.root are required")
    stored = OmegaConf.create({"model": {"vocab_size": "???"}})
    with pytest.raises(MissingMandatoryValue) as bug:
        _ = stored.model.vocab_size
    assert required_option_error(bug.value, missing, "eval") is None


@pytest.mark.slow
def test_a_base_file_is_no_option_in_help_nor_on_the_command_line(tmp_path):
    shown = module("train", "--help", cwd=tmp_path)
    assert shown.returncode == 0
    assert "data: coco, custom, flickr30k, flickr8k, shapes, shards\n" in shown.stdout
    chosen = module("train", "data=_base", cwd=tmp_path)
    assert chosen.returncode == 2
    assert_one_line_error(chosen, "error: data=_base is the base file that every data option extends, not an "
                                  "option: choose one of coco, custom, flickr30k, flickr8k, shapes, shards (data=NAME)")
    assert len(chosen.stderr.splitlines()) == 1, chosen.stderr


def test_the_options_hydra_lists_for_an_unknown_choice_leave_out_the_bases():
    from imcap.entry import _HeldStderr

    held = _HeldStderr(None)
    held.write("In 'train': Could not find 'data/bogus'\n\nAvailable options in 'data':\n\t_base\n\tcoco\n\tshapes\n"
               "Config search path:\n\tprovider=hydra, path=pkg://hydra.conf\n")
    assert held.one_line() == "In 'train': Could not find 'data/bogus'; Available options in 'data': coco, shapes"


@pytest.mark.slow
def test_a_name_hydra_cannot_read_unquoted_says_how_to_quote_it(tmp_path):
    result = module("caption", "ckpt_path=best.ckpt", "images=[café.jpg]", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: cannot read the override images=[café.jpg]: outside quotes a value may hold only ASCII letters, "
        "digits, spaces and _ - + . / \\ : $ % * @ ? |; quote it: 'images=[\"café.jpg\"]'"]


def test_the_data_tools_word_an_unreadable_override_the_same():
    """`python -m imcap.data stats data.root=café` composes outside @hydra.main (imcap.config_compose)."""
    from imcap.config_compose import compose_config
    from imcap.errors import ImcapError

    with pytest.raises(ImcapError) as refused:
        compose_config("train", ["data=custom", "data.root=données"])
    assert str(refused.value).startswith("cannot read the override data.root=données: ")
    assert str(refused.value).endswith("quote it: 'data.root=\"données\"'")

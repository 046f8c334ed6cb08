"""compose_config: conf/ composed outside a Hydra app, as `@hydra.main` would; its mistakes are
user errors. And the plain-data views of a run's config, and the decoding overrides."""

from __future__ import annotations

from dataclasses import dataclass, fields

import pytest
from omegaconf import OmegaConf

from imcap.config_compose import compose_config, decoding_with_overrides, plain_config, save_config
from imcap.errors import ImcapError


def test_composes_with_the_run_and_data_directories_the_caller_gives(tmp_path):
    cfg = compose_config("train", ["data=flickr8k"], tmp_path / "run", tmp_path / "data")
    assert cfg.paths.output_dir == str(tmp_path / "run")
    assert cfg.data.root == cfg.data.source.root == str(tmp_path / "data" / "flickr8k")
    assert cfg.trainer.default_root_dir == str(tmp_path / "run")


def test_without_an_output_directory_the_working_directory_is_the_run_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose_config("train")
    assert cfg.paths.output_dir == str(tmp_path)


@pytest.mark.parametrize("override,named", [("data=bogus", "bogus"), ("model.decoder.hiden_dim=3", "hiden_dim"),
                                            ("data.root", "data.root")])
def test_a_bad_override_is_a_one_line_user_error(override, named):
    with pytest.raises(ImcapError, match=named) as err:
        compose_config("train", [override])
    assert "\n" not in str(err.value)


def test_data_root_is_the_short_form_of_the_source_root(tmp_path):
    from imcap.registry import components

    # each of imcap's own registered sources is a conf/data option of its name (a plugin's YAML is elsewhere)
    for name in [n for n, cls in components("source").items() if cls.__module__.startswith("imcap.")]:
        cfg = compose_config("train", [f"data={name}", f"data.root={tmp_path}/{name}"], tmp_path / "run")
        assert cfg.data.source.root == f"{tmp_path}/{name}", name


def test_plain_config_is_resolved_and_leaves_out_hydra(tmp_path):
    cfg = compose_config("train", ["seed=7"], tmp_path / "run", tmp_path / "data")
    plain = plain_config(cfg)
    assert "hydra" not in plain and plain["data"]["seed"] == 7
    save_config(cfg, tmp_path / "out" / "config.yaml")
    assert OmegaConf.load(tmp_path / "out" / "config.yaml").data.seed == 7


def test_decoding_overrides_replace_only_what_is_set():
    stored = {"method": "greedy", "beam_size": 3, "max_length": 20}
    overrides = OmegaConf.create({"method": "beam", "beam_size": None, "max_length": 12})
    assert decoding_with_overrides(stored, overrides) == {"method": "beam", "beam_size": 3, "max_length": 12}
    assert decoding_with_overrides(stored, None) == stored


def test_an_unknown_decoding_override_names_the_options():
    with pytest.raises(ImcapError, match=r"^decoding.beam_width is not a decoding option; choose one of "
                                         r"method, beam_size, .*, rerank_memory_images$"):
        decoding_with_overrides({}, OmegaConf.create({"beam_width": 5}))


@pytest.mark.parametrize("name,required", [("eval", ["ckpt_path=x.ckpt"]),
                                           ("caption", ["ckpt_path=x.ckpt", "images=[a.jpg]"])])
def test_a_new_decoding_field_is_an_option_of_eval_and_caption_without_a_yaml_edit(monkeypatch, name, required):
    """The `_decoding_overrides` node that eval.yaml and caption.yaml name is built from Decoding."""
    import imcap.models.search as search

    @dataclass(frozen=True)
    class WithTemperature(search.Decoding):
        temperature: float = 1.0

    monkeypatch.setattr(search, "Decoding", WithTemperature)
    cfg = compose_config(name, [*required, "decoding.temperature=0.7"])
    assert OmegaConf.to_container(cfg.decoding) == {**dict.fromkeys(f.name for f in fields(search.Decoding)),
                                                    "temperature": 0.7}

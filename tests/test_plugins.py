"""Components of one's own (imcap.plugins): the example package in examples/ loaded with
`plugins=[...]` or an installed package's `imcap.plugins` entry point, its YAML from its own config
directory, run as a user runs imcap (new processes, in a folder outside the repository); and a
checkpoint naming a component nobody registered, refused without importing anything it names."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from imcap import plugins, registry
from imcap.config_checks import check_stored_config
from imcap.data.vocab import Vocabulary
from imcap.errors import ImcapError
from imcap.models.captioner import build_captioner
from imcap.models.grid_encoder import GridEncoder
from tests.helpers.paths import ROOT
from tests.helpers.runs import TINY, assert_one_line_error

EXAMPLE = ROOT / "examples" / "imcap_example_plugin"
USER_CONF = [f"hydra.searchpath=[file://{EXAMPLE / 'conf'}]"]
COSINE = "imcap_example_plugin.attention.CosineAttention"
PATCHES = "imcap_example_plugin.patches.PatchEncoder"
STRIPES = "imcap_example_plugin.stripes.StripesSource"
# the user's experiment config (which lists the plugin) with the plugin's metric among the test metrics
USER_RUN = [*USER_CONF, "experiment=stripes_cosine", *TINY, "model.test_metrics=[BLEU,distinct-1]"]


def imcap(*args: str, cwd: Path, pythonpath: tuple[Path, ...] = (EXAMPLE,), timeout: int = 600,
          command: tuple[str, ...] | None = None) -> subprocess.CompletedProcess:
    """`python -m imcap.<args[0]> args[1:]` in a new process in `cwd`, with `pythonpath` (the
    user's own package) importable; `command` replaces `-m imcap.<...>` (e.g. `-c CODE`)."""
    argv = [sys.executable, *(command or ("-m", f"imcap.{args[0]}")), *(args if command else args[1:])]
    env = {**os.environ, "IMCAP_ROOT": str(cwd), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(str(p) for p in (*pythonpath, ROOT))}
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def installed_example(folder: Path, entry: str = "imcap_example_plugin = imcap_example_plugin") -> Path:
    """`folder` made to hold what `pip install` of the example leaves for importlib.metadata: a
    dist-info with its `imcap.plugins` entry point (the package itself stays in examples/)."""
    info = folder / "imcap_example_plugin-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: imcap-example-plugin\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[imcap.plugins]\n{entry}\n")
    return folder


def run_dirs(cwd: Path, task: str) -> list[Path]:
    return sorted((cwd / "logs" / task / "runs").iterdir())


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny run of the example's cosine attention on its stripes source, started in a folder
    outside the repository from the user's own experiment config (which lists the plugin), tested
    with BLEU and the plugin's metric distinct-1."""
    cwd = tmp_path_factory.mktemp("user")
    result = imcap("train", *USER_RUN, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = run_dirs(cwd, "train")
    return run


def test_a_missing_plugin_module_or_its_package_is_one_line_naming_it():
    with pytest.raises(ImcapError, match=r"plugin module 'no_such_pkg_xyz.attention' cannot be imported"):
        plugins.load_plugins(["no_such_pkg_xyz.attention"])  # its package is what is missing
    with pytest.raises(ImcapError, match=r"plugin module 'imcap.no_such_module_xyz' cannot be imported"):
        plugins.load_plugins("imcap.no_such_module_xyz")
    with pytest.raises(ImcapError, match=r"'my_pkg/attention.py' is not a module name.*plugins=\[my_pkg.attention\]"):
        plugins.load_plugins(["my_pkg/attention.py"])
    with pytest.raises(ImcapError, match="is not a list of modules"):
        plugins.load_plugins({"my_pkg": 1})


def test_a_plugin_that_fails_inside_keeps_its_traceback(tmp_path, monkeypatch):
    (tmp_path / "plugin_with_missing_dependency_xyz.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):
        plugins.load_plugins(["plugin_with_missing_dependency_xyz"])


@pytest.fixture
def fresh_entry_points(monkeypatch):
    """The installed plugins are read again (they are loaded once per process)."""
    monkeypatch.setattr(plugins, "_installed_loaded", False)
    yield
    registry._registry["attention"].pop("entry_point_for_test", None)


def test_an_installed_packages_entry_point_registers_when_the_registry_is_consulted(tmp_path, monkeypatch,
                                                                                     fresh_entry_points):
    (tmp_path / "entry_point_plugin_xyz.py").write_text(
        "from imcap.registry import register\n\n"
        "@register('attention', 'entry_point_for_test')\nclass Mine:\n    pass\n")
    installed_example(tmp_path, "mine = entry_point_plugin_xyz")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "entry_point_for_test" in registry.names("attention")
    assert registry.allowed_targets()["entry_point_plugin_xyz.Mine"] == ("attention", "entry_point_for_test")


def test_an_entry_point_naming_a_missing_module_is_one_line_naming_plugin_and_package(tmp_path, monkeypatch,
                                                                                     fresh_entry_points):
    installed_example(tmp_path, "gone = no_such_plugin_module_xyz")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImcapError, match=r"plugin 'gone' \(entry point in group 'imcap.plugins' of the installed "
                                         r"package 'imcap-example-plugin'\) names module 'no_such_plugin_module_xyz'"):
        registry.names("attention")


def test_a_stored_config_naming_an_unregistered_component_says_how_to_provide_it_and_imports_nothing(
        tmp_path, monkeypatch):
    marker = tmp_path / "imported.txt"
    (tmp_path / "marker_plugin_xyz.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = {"architecture": {"attention": {"_target_": "marker_plugin_xyz.Sneaky", "attention_dim": 8}}}
    with pytest.raises(ImcapError) as caught:
        check_stored_config(config, "checkpoint x.ckpt")
    assert str(caught.value).startswith(
        "checkpoint x.ckpt is refused: architecture.attention._target_ names the attention "
        "'marker_plugin_xyz.Sneaky', which no loaded module registers; if it is a component of your own, load "
        "the module that registers it with plugins=[your_pkg.module]")
    assert "'imcap.plugins' entry point" in str(caught.value) and "\n" not in str(caught.value)
    assert not marker.exists() and "marker_plugin_xyz" not in sys.modules


@pytest.mark.parametrize("target", ["os.system", "subprocess.Popen", "builtins.exec", "system"])
def test_the_hint_for_an_unregistered_component_never_offers_the_module_the_file_chose(target):
    """A downloaded checkpoint chooses the name: the hint must not invite plugins=[os]."""
    config = {"architecture": {"decoder": {"_target_": target, "hidden_dim": 8}}}
    with pytest.raises(ImcapError) as caught:
        check_stored_config(config, "checkpoint x.ckpt")
    message = str(caught.value)
    assert f"names the decoder {target!r}, which no loaded module registers" in message
    assert "plugins=[your_pkg.module]" in message and "\n" not in message
    module = target.rsplit(".", 1)[0]
    assert f"plugins=[{module}" not in message and f"{module}]" not in message


@pytest.fixture
def example_imported(monkeypatch):
    """The example package imported in this process; its registrations are undone afterwards."""
    for kind in registry.KINDS:
        monkeypatch.setitem(registry._registry, kind, dict(registry.components(kind)))
    monkeypatch.syspath_prepend(str(EXAMPLE))
    plugins.load_plugins(["imcap_example_plugin"])
    yield
    for name in [m for m in sys.modules if m.split(".")[0] == "imcap_example_plugin"]:
        del sys.modules[name]


def test_the_examples_signature_defaults_are_its_yamls(make_cfg, example_imported):
    """One home per default holds for a plugin as for imcap's own components: each class's
    signature defaults are its YAML's, or None where the YAML takes the value from another option."""
    from tests.test_defaults import competing_defaults

    cfg = make_cfg(*USER_CONF, "data=stripes", "model/encoder=patches", "model/attention=cosine", tiny=False)
    found = [*competing_defaults(registry.get("attention", "cosine"), cfg.model.attention),
             *competing_defaults(registry.get("encoder", "patches"), cfg.model.encoder),
             *competing_defaults(registry.get("source", "stripes"), cfg.data.source, skip=("root",))]
    assert found == []
    interpolated = [k for k in cfg.model.attention if OmegaConf.is_interpolation(cfg.model.attention, k)]
    signature = inspect.signature(registry.get("attention", "cosine")).parameters
    assert interpolated == ["attention_dim"] and signature["attention_dim"].default is None


@pytest.mark.slow
def test_a_checkpoint_naming_an_unregistered_component_is_refused_by_every_loader_without_importing_it(
        trained, tmp_path):
    """The marker module is importable (on PYTHONPATH) yet never imported: the checkpoint names it,
    the user did not ask for it."""
    marker = tmp_path / "imported.txt"
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "marker_plugin_xyz.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    checkpoint = torch.load(trained / "checkpoints" / "best.ckpt", weights_only=True)
    checkpoint["imcap"]["architecture"]["attention"]["_target_"] = "marker_plugin_xyz.Sneaky"
    torch.save(checkpoint, tmp_path / "shared.ckpt")
    path = tmp_path / "shared.ckpt"
    pythonpath = (EXAMPLE, tmp_path / "site")
    image = next((trained.parents[3] / "data" / "stripes").glob("stripes-*/test_00000.png"))
    for args in (["eval", f"ckpt_path={path}", "plugins=[imcap_example_plugin]"],
                 ["caption", f"ckpt_path={path}", f"images=[{image}]", "plugins=[imcap_example_plugin]"]):
        result = imcap(*args, cwd=tmp_path, pythonpath=pythonpath)
        assert_one_line_error(result, f"error: checkpoint {path} is refused: architecture.attention._target_ names "
                                      "the attention 'marker_plugin_xyz.Sneaky'", "plugins=[your_pkg.module]")
        assert result.stderr.strip().count("\n") == 0 and "plugins=[marker_plugin_xyz" not in result.stderr
    code = (f"from imcap.models.captioner import Captioner\n"
            f"Captioner.from_checkpoint({str(path)!r}, plugins=['imcap_example_plugin'])")
    result = imcap(code, cwd=tmp_path, pythonpath=pythonpath, command=("-c",))
    assert "no loaded module registers; if it is a component of your own, load the module that registers it " \
           "with plugins=[your_pkg.module]" in result.stderr and "plugins=[marker_plugin_xyz" not in result.stderr
    assert not marker.exists()


@pytest.mark.slow
def test_the_users_components_train_from_their_config_dir_and_resume(trained):
    config = (trained / "config.yaml").read_text()
    assert all(t in config for t in (COSINE, STRIPES, PATCHES))  # the user's YAML, from their config directory
    assert json.loads((trained / "metrics.json").read_text())["test/BLEU-4"] >= 0
    cwd = trained.parents[3]
    result = imcap("train", *USER_RUN, "trainer.max_epochs=2",
                   f"ckpt_path={trained / 'checkpoints' / 'last.ckpt'}", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = run_dirs(cwd, "train")[-1]
    assert torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1  # its second epoch


@pytest.mark.slow
def test_evaluate_with_plugins_and_without_them_a_line_that_says_how(trained, tmp_path):
    ckpt = trained / "checkpoints" / "best.ckpt"
    refused = imcap("eval", f"ckpt_path={ckpt}", cwd=tmp_path)
    assert_one_line_error(refused, f"names the encoder '{PATCHES}', which no loaded module registers",
                          "plugins=[your_pkg.module]", "'imcap.plugins' entry point")
    assert_one_line_error(imcap("eval", f"ckpt_path={ckpt}", "plugins=[imcap_example_plugin,no_such_plugin_xyz]",
                                cwd=tmp_path), "error: plugin module 'no_such_plugin_xyz' cannot be imported")
    result = imcap("eval", f"ckpt_path={ckpt}", "plugins=[imcap_example_plugin]", "metrics=[BLEU,CIDEr-D]",
                   cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = [run for run in run_dirs(tmp_path, "eval") if (run / "metrics.json").is_file()]
    assert "test/CIDEr-D" in json.loads((run / "metrics.json").read_text())
    assert json.loads((run / "predictions" / "test.json").read_text())  # the stripes test split, decoded


@pytest.mark.slow
def test_export_caption_and_python_load_with_plugins(trained, tmp_path):
    ckpt, folder = trained / "checkpoints" / "best.ckpt", tmp_path / "model"
    image = next((trained.parents[3] / "data" / "stripes").glob("stripes-*/test_00000.png"))
    result = imcap("export", f"ckpt_path={ckpt}", f"out={folder}", "plugins=[imcap_example_plugin]", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert COSINE in (folder / "config.json").read_text()
    assert_one_line_error(imcap("caption", f"ckpt_path={folder}", f"images=[{image}]", cwd=tmp_path),
                          f"model config {folder / 'config.json'} is refused", "plugins=[your_pkg.module]")
    result = imcap("caption", f"ckpt_path={folder}", f"images=[{image}]", "plugins=[imcap_example_plugin]",
                   cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = [run for run in run_dirs(tmp_path, "caption") if (run / "captions.json").is_file()]
    from_cli = json.loads((run / "captions.json").read_text())[0]["caption"]
    code = ("import sys\nfrom imcap.models.captioner import Captioner\n"
            "loads = ((Captioner.from_checkpoint, sys.argv[1]), (Captioner.from_pretrained, sys.argv[2]),\n"
            "         (Captioner.load, sys.argv[2]))\n"
            "for load, source in loads:\n"
            "    captioner = load(source, plugins=['imcap_example_plugin'])\n"
            "    print(type(captioner.decoder.attention).__name__, '|', captioner.caption([sys.argv[3]])[0].text)\n")
    result = imcap(code, str(ckpt), str(folder), str(image), cwd=tmp_path, command=("-c",))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == [f"CosineAttention | {from_cli}"] * 3


@pytest.mark.slow
def test_an_installed_plugin_needs_no_plugins_option(trained, tmp_path):
    site = installed_example(tmp_path / "site")
    ckpt = trained / "checkpoints" / "best.ckpt"
    result = imcap("eval", f"ckpt_path={ckpt}", "metrics=[BLEU]", cwd=tmp_path, pythonpath=(EXAMPLE, site))
    assert result.returncode == 0, result.stderr[-3000:]
    # the lists derived from the registry pick it up: names, and the decoders that can drive it
    code = ("from imcap import registry\nfrom imcap.models.decoder import valid_pairs\n"
            "print(registry.names('attention', 'cos*'), registry.names('source', 'str*'))\n"
            "print(' '.join(d for d, a in valid_pairs() if a == 'cosine'))")
    result = imcap(code, cwd=tmp_path, pythonpath=(EXAMPLE, site), command=("-c",))
    names, decoders = result.stdout.splitlines()
    assert names == "['cosine'] ['stripes']" and "lstm" in decoders.split(), result.stderr[-3000:]


@pytest.mark.slow
def test_a_sweep_over_the_users_attention_with_their_encoder_from_config_dir(tmp_path):
    result = imcap("train", "--multirun", "--config-dir", str(EXAMPLE / "conf"), "data=stripes",
                   "model/encoder=patches", "model/attention=cosine,additive", "plugins=[imcap_example_plugin]",
                   *TINY, "test=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = [job for job in (tmp_path / "logs" / "train" / "multiruns").glob("*/*") if (job / "metrics.json").is_file()]
    models = sorted((m.attention._target_, m.encoder._target_)
                    for m in (OmegaConf.load(job / "config.yaml").model for job in jobs))
    assert models == [("imcap.models.attention.AdditiveAttention", PATCHES), (COSINE, PATCHES)]


@pytest.mark.slow
def test_the_demo_serves_a_users_model_with_plugins(trained, tmp_path):
    ckpt = trained / "checkpoints" / "best.ckpt"
    assert_one_line_error(imcap("demo", f"ckpt_path={ckpt}", "port=1", cwd=tmp_path),
                          "which no loaded module registers", "plugins=[your_pkg.module]")
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADIO_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "imcap.demo", f"ckpt_path={ckpt}", f"port={port}", "plugins=[imcap_example_plugin]"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL,
        env={**env, "IMCAP_ROOT": str(tmp_path), "PYTHONPATH": os.pathsep.join((str(EXAMPLE), str(ROOT)))})
    try:
        deadline = time.monotonic() + 300  # a limit for a loaded machine, not a speed requirement
        while True:
            assert process.poll() is None, process.stdout.read()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the demo did not start serving"
            time.sleep(0.5)
    finally:
        process.kill()
        process.wait()


def test_the_attention_variants_sweep_lists_a_plugins_attention(tmp_path):
    """hparams_search=attention_variants lists the variants the decoder accepts when the sweep
    is composed, before any task runs: the plugins named in the config are loaded for it."""
    code = ("import imcap\nfrom hydra import compose, initialize_config_dir\n"
            f"with initialize_config_dir(config_dir={str(ROOT / 'conf')!r}, version_base='1.3'):\n"
            "    cfg = compose('train', ['hparams_search=attention_variants', 'plugins=[imcap_example_plugin]'],"
            " return_hydra_config=True)\n"
            "    print(cfg.hydra.sweeper.params['model/attention'])")
    result = imcap(code, cwd=tmp_path, command=("-c",))
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"cosine", "additive", "none"} <= set(result.stdout.strip().split(","))


@pytest.mark.slow
def test_a_plugin_metric_named_in_test_metrics_is_computed_into_metrics_json(trained):
    """The `trained` run names distinct-1 in model.test_metrics; its plugin is loaded by the config."""
    from imcap.metrics.tokenizer import tokenize

    run = trained
    metrics = json.loads((run / "metrics.json").read_text())
    words = [w for p in json.loads((run / "predictions" / "test.json").read_text()) for w in tokenize(p["caption"]).split()]
    assert metrics["test/distinct-1"] == pytest.approx(len(set(words)) / len(words), rel=1e-6)  # logged as float32
    assert "test/BLEU-4" in metrics and "test/CIDEr-D" not in metrics  # exactly the metrics named


class EncoderNamingNoWeights(GridEncoder):
    """An encoder of one's own that follows docs/extending/encoder.md and has no weight option."""

    def __init__(self, channels: int = 8, finetune: str = "none"):
        super().__init__(finetune)
        self.trunk = torch.nn.Conv2d(3, channels, 8, stride=8)
        self.out_channels = channels

    def identity(self) -> str:
        return "no-weights"

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grid = self.trunk(images).flatten(2).transpose(1, 2)  # (B, N, C)
        return grid, grid.mean(dim=1)


@pytest.mark.parametrize("pretrained", [True, False], ids=["training", "from_a_checkpoint"])
def test_an_encoder_that_names_no_weights_builds_for_training_and_from_a_checkpoint(pretrained):
    """build_captioner clears the weight options when a checkpoint holds the weights: only those
    the encoder takes (before: TypeError 'weights' from every loader of such a checkpoint)."""
    arch = {"encoder": {"_target_": f"{__name__}.EncoderNamingNoWeights"},
            "decoder": {"_target_": "imcap.models.lstm.LSTMDecoder", "hidden_dim": 16},
            "attention": {"_target_": "imcap.models.attention.AdditiveAttention"},
            "embedding": {"_target_": "imcap.models.embeddings.LearnedEmbedding", "dim": 8}}
    vocab = Vocabulary.build([["a", "dot"]])
    captioner = build_captioner(arch, vocab, 32, pretrained=pretrained)
    assert isinstance(captioner.encoder, EncoderNamingNoWeights)

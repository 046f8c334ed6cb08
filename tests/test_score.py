import json
import os
import subprocess
import sys

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from imcap.score import main, score
from tests.helpers.coco_reference import coco_meteor, requires_java
from tests.helpers.paths import ROOT

REFERENCES = {
    1: ["A black dog is running across the grass.", "A dog runs on a green lawn!", "The black dog sprints."],
    2: ["Two children are playing soccer in a park.", "Kids kick a ball on the grass.", "Two boys play football."],
    3: ["A man in a red shirt rides a bicycle down the street.", "A cyclist, wearing red, on a road."],
    4: ["A woman's hand holding a cup of coffee.", "Someone holds a white mug."],
    5: ["A group of people stand on a snowy mountain top.", "Hikers (four of them) on a snowy peak."],
    6: ["A brown horse grazing in a field.", "The horse is eating grass in the meadow."],
    7: ['A sign that says "STOP" at a street corner.', "A red stop sign near a road."],
    8: ["A little girl in a pink dress is climbing stairs.", "A child climbs up a set of stairs."],
}
PREDICTIONS = {1: "a black dog running on the grass", 2: "two kids playing soccer in a park",
               3: "a man riding a bike", 4: "", 5: "people", 6: "a horse eating grass in a field",
               7: "a red stop sign", 8: "a girl in a pink dress climbing the stairs"}
KEYS = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D"]


def write(path, data):
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("score")
    coco_refs = {"images": [{"id": i, "file_name": f"{i}.jpg"} for i in REFERENCES],
                 "annotations": [{"image_id": i, "id": 10 * i + k, "caption": c}
                                 for i, refs in REFERENCES.items() for k, c in enumerate(refs)]}
    # ids as strings in one prediction: they are matched as text
    preds = [{"image_id": str(i) if i == 3 else i, "caption": c} for i, c in PREDICTIONS.items()]
    return {"refs": write(folder / "refs.json", coco_refs), "preds": write(folder / "preds.json", preds),
            "flat": write(folder / "flat.json", {str(i): r for i, r in REFERENCES.items()}),
            "dup": write(folder / "dup.json", preds + [{"image_id": 5, "caption": "again"}]), "folder": folder}


def run_cli(*args):
    return subprocess.Popen([sys.executable, "-m", "imcap.score", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def cli_run(files):
    """The command and the reference's METEOR start together: both take seconds to load."""
    process = run_cli("--references", files["refs"], "--predictions", files["preds"])
    coco_meteor()
    return process


def coco_eval_cap():
    """What pycocoevalcap's COCOEvalCap.evaluate() computes, without pycocotools' COCO objects:
    the Java PTB tokenizer over gts and res, then each scorer (Meteor shared with its tests)."""
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in refs] for i, refs in REFERENCES.items()})
    res = tokenizer.tokenize({i: [{"caption": c}] for i, c in PREDICTIONS.items()})
    out = dict(zip(KEYS[:4], Bleu(4).compute_score(gts, res, verbose=0)[0]))
    out["METEOR"] = coco_meteor().compute_score(gts, res)[0]
    out["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
    out["CIDEr-D"] = Cider().compute_score(gts, res)[0]
    return out


@requires_java
def test_cli_prints_the_scores_coco_eval_cap_reports(cli_run):
    expected = coco_eval_cap()  # while the command runs
    stdout, stderr = cli_run.communicate(timeout=300)
    assert cli_run.returncode == 0, stderr
    printed = json.loads(stdout)
    assert list(printed)[:7] == KEYS and set(printed) <= {*KEYS, "SPICE"}
    assert printed == pytest.approx({**expected, **{k: printed[k] for k in printed if k == "SPICE"}}, abs=1e-4)
    assert 0.5 < printed["CIDEr-D"] < 5 and 0 < printed["BLEU-4"] < printed["BLEU-1"] < 1
    assert "Traceback" not in stderr


def test_duplicate_predictions_are_a_user_error(files, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--references", str(files["refs"]), "--predictions", str(files["dup"])])
    assert exit_info.value.code == 2
    assert capsys.readouterr() == ("", f"error: {files['dup']}: image 5 has two predictions "
                                       "(entries 4 and 8); keep one caption per image\n")


def test_flat_references_and_text_ids_give_the_same_scores(files):
    metrics = ["BLEU", "ROUGE-L", "CIDEr-D"]
    assert score(files["flat"], files["preds"], metrics) == score(files["refs"], files["preds"], metrics)


ERRORS = [
    ("preds", '[{"image_id": 1, "caption": "a dog"', ":1: not valid JSON (Expecting ',' delimiter, column"),
    ("preds", '{"1": "a dog"}', "expected a COCO results list"),
    ("preds", '[{"image_id": 1}]', "entry 0 must be an object with image_id and caption"),
    ("preds", '[{"image_id": 1.5, "caption": "a"}]', "entry 0: image_id must be an integer or a string, got 1.5"),
    ("preds", '[{"image_id": 1, "caption": 7}]', "entry 0: caption must be a string, got 7"),
    ("preds", json.dumps([{"image_id": i, "caption": "a"} for i in range(1, 10)]),
     "1 predictions are for images that {refs} does not have (e.g. 9)"),
    ("preds", json.dumps([{"image_id": i, "caption": "a"} for i in range(1, 7)]),
     "no prediction for 2 of the 8 images in {refs} (e.g. 7, 8)"),
    ("refs", '{"annotations": [{"image_id": 1, "text": "a"}]}', "annotations[0] must be an object with image_id and caption"),
    ("refs", '{"images": [{"id": 1}, {"id": 2}], "annotations": [{"image_id": 1, "caption": "a"}]}',
     "1 images listed in 'images' have no caption (e.g. 2)"),
    ("refs", '{"1": []}', "image 1: expected a non-empty list of reference captions"),
    ("refs", "[1, 2]", "expected a COCO captions file"),
    ("refs", "", ":1: not valid JSON (Expecting value, column 1); fix or replace the file (given as --references)"),
]


@pytest.mark.parametrize("which,content,message", ERRORS)
def test_user_errors_name_the_file_and_the_problem(which, content, message, files, tmp_path, capsys):
    paths = {"refs": files["refs"], "preds": files["preds"]}
    paths[which] = tmp_path / f"bad-{which}.json"
    paths[which].write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        main(["--references", str(paths["refs"]), "--predictions", str(paths["preds"]), "--metrics", "BLEU"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {paths[which]}:") and err.count("\n") == 1
    assert message.format(refs=paths["refs"]) in err


def test_a_missing_file_is_a_user_error(files, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--references", str(files["folder"] / "nope.json"), "--predictions", str(files["preds"])])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {files['folder'] / 'nope.json'}: no such file (given as --references)\n"


def test_the_cli_offers_every_registered_metric_and_defaults_to_coco_captions(capsys):
    from imcap import registry
    from imcap.score import parse_args

    assert parse_args(["--references", "r", "--predictions", "p"]).metrics == [
        "BLEU", "METEOR", "ROUGE-L", "CIDEr-D", "SPICE"]
    with pytest.raises(SystemExit):
        parse_args(["-h"])
    out = capsys.readouterr().out
    assert all(name in out for name in registry.names("metric")), out
    assert parse_args(["--references", "r", "--predictions", "p", "--metrics", "BLEU_nltk"]).metrics == ["BLEU_nltk"]


@requires_java
def test_plugins_registers_a_metric_of_ones_own_for_metrics(files):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "examples" / "imcap_example_plugin")}
    done = subprocess.run([sys.executable, "-m", "imcap.score", "--plugins", "imcap_example_plugin",
                           "--references", str(files["refs"]), "--predictions", str(files["preds"]),
                           "--metrics", "BLEU", "distinct-1"],
                          cwd=files["folder"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    words = [word for caption in PREDICTIONS.values() for word in caption.split()]
    printed = json.loads(done.stdout)
    assert set(printed) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "distinct-1"}
    assert printed["distinct-1"] == pytest.approx(len(set(words)) / len(words))

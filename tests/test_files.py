"""Atomic writes: a process killed while it writes leaves the old file whole."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

from tests.helpers.paths import ROOT

# A process whose writes past 64 KiB kill it (SIGXFSZ with its default action: termination
# inside the write call), rewriting a small valid metrics.json with a large one.
KILLED_WRITER = """
import resource, signal, sys
from imcap.files import write_json
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.RLIM_INFINITY))
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
write_json(sys.argv[1], {f"val/metric_{i}": i / 7 for i in range(20000)})
"""


def test_a_kill_during_a_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"test/BLEU-4": 0.25}))
    result = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path)], cwd=ROOT, timeout=120)
    assert result.returncode == -signal.SIGXFSZ  # killed in the middle of writing
    assert json.loads(path.read_text()) == {"test/BLEU-4": 0.25}


def test_a_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    from imcap.files import write_json

    write_json(tmp_path / "out" / "a.json", {"x": "é"})
    write_json(tmp_path / "out" / "a.json", [1, 2])
    assert json.loads((tmp_path / "out" / "a.json").read_text(encoding="utf-8")) == [1, 2]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.json"]

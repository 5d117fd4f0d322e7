"""`make demo` runs tasks/demo.py: it must run offline and print what the model computed."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_offline_and_reports_the_fused_sequence():
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "tasks/demo.py"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "image+text: last_hidden_state (1, 254, 64), text starts at index 197" in result.stdout
    assert "image CLS changes when the caption is attended" in result.stdout

"""The README's measured sections are generated from the committed outputs, never typed."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_figures_match_committed_outputs():
    result = subprocess.run([sys.executable, "scripts/update_readme.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, "README.md is stale: run `python scripts/update_readme.py` and commit it"

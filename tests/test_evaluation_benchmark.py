"""benchmarks/evaluation.py (multi-token scoring, each prompt once against one sequence per
pair) runs and its two paths agree; its seconds are for the benchmark to print, not checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_evaluation_benchmark_compares_two_paths_that_agree() -> None:
    command = [sys.executable, "benchmarks/evaluation.py", "--size", "tiny", "--prompt-words"]
    done = subprocess.run(
        [*command, "16", "--repeat", "1", "--threads", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout[done.stdout.index("{") :])
    assert result["examples"] > 0 and result["choices"] == 4
    assert result["prompt_tokens_mean"] > 16
    assert result["seconds_each_prompt_once"] > 0 and result["seconds_per_pair"] > 0
    assert result["loss_gap"] < 1e-4 and result["choice_loss_gap"] < 1e-4
    assert result["accuracy_gap"] == 0.0

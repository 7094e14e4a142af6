"""benchmarks/gpu_check.sh end to end in smoke mode (CPU, tiny sizes): the script a GPU session runs
must not need debugging there. Every step has a row in the report's one steps table, which the console
ends with; on CPU each GPU-only step says 'skipped: no CUDA' (vLLM's: 'not installed') rather than
vanishing, and the fp16 step runs on its CPU stand-in."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STEPS = ["a1", "a2", "d", "f", "g", "b", "c", "i", "e1", "e2", "e3", "h", "a3", "c2"]
GPU_ONLY = ["d", "c", "c2"]
MUST_PASS = ["a1", "a2", "b", "i", "a3", "f", "g"]  # the steps that run on CPU too (f on its stand-in)


@pytest.mark.slow
def test_gpu_check_smoke_writes_a_row_per_step(tmp_path):
    """A budget of 1 s: the smoke run has none (the GPU run's budget must not skip a step of a slow,
    loaded CPU machine's smoke run), so every step still runs."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "SITE": str(tmp_path / "site")}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke", "--budget", "1",
                           "--work", str(tmp_path / "work")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=3600)  # a guard against a hang only: it takes a few minutes
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (out / "gpu_check.md").read_text()
    assert "SMOKE (CPU, tiny sizes): numbers are meaningless" in text and "(smoke: no time budget)" in text
    assert "time budget (" not in text  # no step skipped for time
    table = text.split("### Steps\n\n")[1]
    assert table.startswith("| step | what it proves | status | result | seconds |")
    assert proc.stdout.rstrip().rsplit("\n\n", 1)[0].endswith(table.rstrip())  # the console ends with it
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ") and line.split("|")[1].strip() in STEPS}
    assert sorted(rows) == sorted(STEPS), text
    cuda = json.loads((out / "gpu_check.json").read_text())["env"].get("cuda")
    if not cuda:
        for sid in GPU_ONLY:
            assert rows[sid][1] == "skipped" and rows[sid][2].startswith("skipped: no CUDA"), (sid, rows[sid])
    for sid in MUST_PASS:
        assert rows[sid][1] == "passed", (sid, rows[sid], text)
    assert "tokens/s" in rows["a1"][2] and "MFU" in rows["a1"][2]
    assert (out / "gpu_check_logs.tar.gz").is_file() and (out / "gpu_check_console.log").is_file()
    assert rows["e2"][1] == "passed" and "FSDP2 sharded the reference over 2 and the policy over 2" in rows["e2"][2], \
        rows["e2"]
    assert rows["e3"][1] == "passed" and \
        "ZeRO-3 partitioned the policy over 2 and the reference over 2" in rows["e3"][2], rows["e3"]
    assert "scaler.json at step 3" in rows["f"][2] and "rows max diff 0, weights 0" in rows["f"][2], rows["f"]
    assert "max diff" in rows["g"][2], rows["g"]
    vllm = json.loads((out / "gpu_check.json").read_text())["env"].get("vllm")
    if not vllm:
        assert rows["h"][1] == "skipped" and rows["h"][2].startswith("skipped: vllm is not installed"), rows["h"]

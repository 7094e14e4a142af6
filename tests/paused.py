"""`python -m preftune`, held after a given optimizer step until the test lets it go on, so that a test
can kill or signal a run between two known steps however fast or loaded the machine is (a sleep after
every step would race the test's polling: on a busy machine the run could end first).

    script, go = paused_preftune(tmp_path, after_step=4)
    proc = subprocess.Popen([sys.executable, script, "train", "cfg.yaml"], ...)   # or torchrun's script
    ...                                   # checkpoint-3 is in place; the run waits after step 4
    go.touch()                            # it goes on (a killed run never needs this)

A helper module, not a test module (test_resume.py and test_distributed.py use it).
"""

from __future__ import annotations

from pathlib import Path

SCRIPT = """
import sys, time
from pathlib import Path

import torch
from preftune.cli import main

AFTER, GO = {after_step!r}, Path({go!r})
step, steps = torch.optim.AdamW.step, []


def held_step(self, *args, **kwargs):
    out = step(self, *args, **kwargs)
    steps.append(1)
    if len(steps) == AFTER:  # each process holds here until the test creates GO (at most an hour:
        give_up = time.monotonic() + 3600  # never an orphan if the test itself died)
        while not GO.exists() and time.monotonic() < give_up:
            time.sleep(0.05)
    return out


torch.optim.AdamW.step = held_step
sys.exit(main(sys.argv[1:]))
"""


def paused_preftune(folder: Path, after_step: int) -> tuple[str, Path]:
    """A script that runs preftune's CLI with its arguments, each process holding after its optimizer
    step `after_step` until the file `go` exists; (the script's path, go). The numbers are untouched."""
    script, go = Path(folder) / f"paused_after_{after_step}.py", Path(folder) / f"go_after_{after_step}"
    script.write_text(SCRIPT.format(after_step=after_step, go=str(go)))
    return str(script), go

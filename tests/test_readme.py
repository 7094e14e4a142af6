"""README.md's commands run, in order, as written: every ```bash and ```python block of the README is
executed top to bottom in a scratch folder holding a copy of examples/, on a tiny local model.

What the test changes, all listed here and nothing else:
- MODEL_IDS: the hub ids the README names become the tiny local model (no network in tests), the
  vision-language one the tiny Qwen2-VL that `preftune demo --vision` made just before;
- SMALLER: options appended to each preftune command (a later --key wins), sizes only: fewer steps,
  prompts and tokens, never another behaviour;
- NOT_RUN: commands that are not run, each with the reason (installing, the demo, a GPU server);
- `preftune demo --vision` draws no training curves (plot_loss: false; matplotlib takes seconds here).
Any other command in a README block is run; a command the test cannot run fails the test, so a new
block cannot silently escape it. `preftune label` (a local web server) runs as a subprocess and is
driven through its page's API by a scripted annotator, as the page would: /api/next, /api/judge."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

from preftune.cli import main
from preftune.commands import demo

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

MODEL_IDS = {"Qwen/Qwen2.5-0.5B": "{tiny_model}", "Qwen/Qwen2-VL-2B-Instruct": "output/demo_vision/base_model"}
SMALLER = {
    "sft": ["--max_steps", "2", "--per_device_train_batch_size", "8", "--val_size", "4"],
    "sample": ["--max_samples", "6", "--num_samples", "2", "--max_new_tokens", "12"],
    "label": ["--port", "0"],  # a free port (the default 8765 may be taken); --export ignores it
    "inspect": [],
    "train": ["--max_steps", "2", "--val_size", "2", "--per_device_train_batch_size", "2",
              "--gradient_accumulation_steps", "1"],
    "eval": ["--max_samples", "3", "--num_samples", "1", "--max_new_tokens", "12"],
    "export": [],
    "rm": ["--max_steps", "2", "--val_size", "2", "--per_device_train_batch_size", "2"],
    "iterate": ["--max_samples", "4", "--num_samples", "2", "--max_new_tokens", "6", "--max_steps", "1",
                "--val_size", "0", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1"],
    "demo": ["--pairs", "16", "--eval_pairs", "4", "--epochs", "1"],  # --vision: tests/test_demo_vision.py learns
}
NOT_RUN = {
    "make demo": "tests/test_demo_flow.py runs `preftune demo`, scaled down",
    "make test": "the test suite itself",
    "python3 -m venv": "installing: no network in tests",
    ".venv/bin/pip install": "installing: no network in tests",
    "vllm serve": "vLLM needs a CUDA GPU and is not installed here",
}
RUN = ("bash", "python")
NOT_COMMANDS = ("text", "json", "yaml")  # output shown and records written: nothing to run
THE_FLOW = ["sft", "sample", "label", "train", "eval", "export", "python"]  # the README's order


def blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced block, in order."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def commands(body: str) -> list[list[str]]:
    """A bash block's commands: continuation lines joined, comments dropped, split as bash would."""
    joined = re.sub(r"\\\n", " ", body)
    return [argv for argv in (shlex.split(line, comments=True) for line in joined.splitlines()) if argv]


def not_run(argv: list[str]) -> str | None:
    line = " ".join(argv)
    return next((why for start, why in NOT_RUN.items() if line.startswith(start)), None)


def steps(text: str) -> list[tuple[str, object]]:
    """("python", code) or ("preftune", argv) for everything the README asks to run, in order."""
    found = []
    for language, body in blocks(text):
        assert language in RUN + NOT_COMMANDS, (
            f"README.md has a ```{language} block: mark commands ```bash (or ```python), output ```text")
        if language == "python":
            found.append(("python", body))
        elif language == "bash":
            for argv in commands(body):
                if not_run(argv):
                    continue
                assert argv[0] == ".venv/bin/preftune", (
                    f"README.md command {' '.join(argv)!r}: tests/test_readme.py cannot run it; teach it how, "
                    "or add it to NOT_RUN with the reason")
                found.append(("preftune", argv[1:]))
    return found


def test_every_readme_block_is_run_or_excused():
    """The parsing the flow test relies on: the README's commands, in the order the README promises."""
    found = steps(README.read_text(encoding="utf-8"))
    order = [argv[0] if kind == "preftune" else kind for kind, argv in found]
    it = iter(order)
    assert all(step in it for step in THE_FLOW), f"the README's flow is out of order: {order}"
    assert set(order) <= set(SMALLER) | {"python"}, f"a command without sizes in SMALLER: {order}"
    excused = [" ".join(argv) for _, body in blocks(README.read_text(encoding="utf-8")) for argv in commands(body)
               if not_run(argv)]
    assert all(any(e.startswith(start) for e in excused) for start in NOT_RUN), "NOT_RUN lists a command the README lost"


def section(text: str, title: str) -> str:
    """The markdown section `## title`, up to the next `## ` heading."""
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_pipeline_doc_shows_the_readme_flow():
    """docs/pipeline.md's sequence is the README's step by step flow, command for command."""
    flow = section(README.read_text(encoding="utf-8"), "Your own model, step by step")
    readme = [argv for kind, argv in steps(flow) if kind == "preftune"]
    doc = [argv[1:] for argv in commands(blocks((ROOT / "docs" / "pipeline.md").read_text(encoding="utf-8"))[0][1])]
    assert doc == [argv for argv in readme if argv[0] != "inspect"]


def test_example_configs_read_the_example_data():
    for name in ("dpo.yaml", "lora.yaml"):
        from preftune.config import load_config

        dataset = load_config(str(ROOT / "examples" / name)).dataset
        assert dataset == "examples/data/pairs.jsonl" and (ROOT / dataset).is_file(), (name, dataset)


def label_by_script(argv: list[str], cwd: Path) -> None:
    """`preftune label FILE`: start the server, label every comparison through its API (A, or a tie
    where both texts are the same), stop it with Ctrl+C as a person would."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([sys.executable, "-m", "preftune", *argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(120, server.kill)  # a server that never prints its URL must not hang the suite
    watchdog.start()
    output = []
    for line in server.stdout:
        output.append(line)
        if line.startswith("open http://"):
            break
    watchdog.cancel()
    assert output and output[-1].startswith("open "), "".join(output)
    url = output[-1].split()[1]
    threading.Thread(target=lambda: output.extend(server.stdout), daemon=True).start()
    try:
        with urllib.request.urlopen(url + "api/next?client=readme", timeout=60) as r:
            state = json.load(r)
        judged = 0
        while state["comparison"] is not None:
            c = state["comparison"]
            body = {"client": "readme", "comparison": c["id"], "shown_as_a": c["a"]["index"],
                    "choice": "tie" if c["a"]["text"] == c["b"]["text"] else "A"}
            request = urllib.request.Request(url + "api/judge", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as r:
                state = json.load(r)
            judged += 1
        assert judged > 0 and state["progress"]["labelled"] == state["progress"]["total"] == judged
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)
    assert server.returncode == 0, "".join(output)
    assert f"stopped: {judged} of {judged} comparisons labelled" in "".join(output)


def test_the_readme_flow_runs_as_written(tmp_path, tiny_model_dir, monkeypatch):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # tokenized pairs: not the user's cache
    monkeypatch.setitem(demo.VISION_DPO, "plot_loss", False)
    models = {k: v.format(tiny_model=tiny_model_dir) for k, v in MODEL_IDS.items()}
    substituted = set()

    for kind, step in steps(README.read_text(encoding="utf-8")):
        if kind == "python":
            exec(compile(step, "README.md (python block)", "exec"), {})
            continue
        argv = []
        for token in step:
            substituted.update({token} & models.keys())
            argv.append(models.get(token, token))
        argv += SMALLER[argv[0]]
        if argv[0] == "label" and "--export" not in argv:
            label_by_script(argv, tmp_path)
        else:
            assert main(argv) == 0, f"README command failed: preftune {shlex.join(step)}"

    assert substituted == models.keys(), "MODEL_IDS names a model the README no longer uses"
    # what each step hands the next, where the README says it is
    assert (tmp_path / "saves/sft/sft_metrics/summary.json").is_file()
    assert (tmp_path / "saves/pairs.jsonl").read_text().strip()
    assert (tmp_path / "saves/scored/pairs.jsonl").is_file()
    assert json.loads((tmp_path / "saves/dpo/dpo_metrics/summary.json").read_text())["status"] == "completed"
    assert (tmp_path / "saves/eval/eval.json").is_file()
    assert json.loads((tmp_path / "saves/dpo-bf16/config.json").read_text())["dtype"] == "bfloat16"
    assert (tmp_path / "saves/rm/config.json").is_file()
    rounds = json.loads((tmp_path / "saves/rounds/summary.json").read_text())
    assert rounds["status"] == "completed" and [r["round"] for r in rounds["rounds"]] == [1, 2, 3]
    # the vision section: the demo's LLaMA-Factory-format data, then a LoRA run of a Qwen2-VL on them
    assert (tmp_path / "output/demo_vision/data/dataset_info.json").is_file()
    assert json.loads((tmp_path / "saves/vlm-dpo/dpo_metrics/summary.json").read_text())["status"] == "completed"
    assert (tmp_path / "saves/vlm-dpo/adapter_config.json").is_file() or \
        (tmp_path / "saves/vlm-dpo/model.safetensors").is_file()

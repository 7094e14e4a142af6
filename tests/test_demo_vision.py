"""`preftune demo --vision` (preftune/demo_vision.py, commands/demo.py `run_vision`): the shapes data are
balanced so that only the image tells the chosen answer from the rejected one, written in LLaMA-Factory's
format; the demo runs through `preftune train` on its tiny Qwen2-VL, writes its outputs, and the held-out
preference accuracy rises from chance.

Measured, the default demo (480 pairs, 3 epochs): held-out accuracy 0.5 -> 0.975, 0.992, 0.983 for seeds 0, 1,
2 (docs/vision.md, "The demo")."""

import json
from collections import Counter

import numpy as np
import PIL.Image
import pytest

from preftune.cli import main
from preftune.commands import demo
from preftune.demo_vision import COLOURS, QUESTIONS, SHAPES, write_data

# A scaled-down demo: its settings, half the pairs, 2 epochs (30 steps). Held-out accuracy measured for seeds 0, 1,
# 2: 0.825, 0.85, 0.925 (with 160 pairs: 0.9, 0.575, 0.7: too few steps to be sure).
SMALL = ["--pairs", "240", "--eval_pairs", "40", "--epochs", "2"]


def test_shapes_data_tell_nothing_without_the_image(tmp_path):
    """Every ordered (chosen, rejected) colour pair equally often under every question wording, so the text alone
    is at chance; the shape in each image has the chosen colour and no other colour is drawn; LLaMA-Factory's
    sharegpt shape with `<image>` and dataset_info.json entries with its images column; seeded."""

    folder = write_data(tmp_path / "a", 96, 24, seed=3)  # 96: each of the 4 wordings x 12 colour pairs twice
    pairs = json.loads((folder / "shapes_train.json").read_text())

    def named(text):  # the colour an answer names
        (found,) = [c for c in COLOURS if c in text.lower()]
        return found

    def wording(question):
        return next(q for q in QUESTIONS if any(question == "<image>" + q.format(shape=s) for s in SHAPES))

    counts = Counter((wording(p["conversations"][0]["value"]), named(p["chosen"]["value"]),
                      named(p["rejected"]["value"])) for p in pairs)
    assert len(counts) == len(QUESTIONS) * len(COLOURS) * (len(COLOURS) - 1) and set(counts.values()) == {2}
    for p in pairs:
        assert len(p["images"]) == 1
        with PIL.Image.open(folder / p["images"][0]) as image:
            pixels = {tuple(rgb) for rgb in np.asarray(image.convert("RGB")).reshape(-1, 3).tolist()}
        assert {c for c, rgb in COLOURS.items() if rgb in pixels} == {named(p["chosen"]["value"])}
    info = json.loads((folder / "dataset_info.json").read_text())
    assert info["shapes_train"]["columns"]["images"] == "images" and info["shapes_val"]["ranking"]
    assert (write_data(tmp_path / "b", 96, 24, seed=3) / "shapes_train.json").read_bytes() == \
        (folder / "shapes_train.json").read_bytes()


def test_vision_demo_runs_and_learns_from_the_image(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(demo.VISION_DPO, "plot_loss", False)  # its training curves take seconds to draw here
    out = tmp_path / "demo"
    assert main(["demo", "--vision", "--output_dir", str(out), *SMALL]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "demo.json").read_text())
    for path in ("data/dataset_info.json", "data/shapes_train.json", "data/images/val_0039.png",
                 "base_model/processor_config.json", "dpo/model.safetensors", "dpo/processor_config.json",
                 "dpo/preftune_config.yaml", "dpo/dpo_metrics/summary.json"):
        assert (out / path).is_file(), path
    before, after = result["heldout_accuracy"]
    assert before == 0.5 and after >= 0.7, result
    assert "before DPO 50.0%" in printed and f"after DPO {after:.1%}" in printed


@pytest.mark.parametrize("args,message", [
    (["--pairs", "0"], "--pairs must be at least 1"),
    (["--epochs", "x"], "--epochs: expected a float"),
    (["--reviews", "10"], "unknown option --reviews"),  # the review demo's option
])
def test_vision_demo_refuses_bad_options_in_one_line(args, message, capsys):
    assert main(["demo", "--vision", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err

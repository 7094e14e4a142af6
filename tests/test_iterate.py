"""`preftune iterate`: rounds of sample -> score -> pair -> DPO -> eval from the current policy, on the tiny
model, 3 rounds end to end with each way of scoring (a reward function: 2 steps a round; a reward model and
people: 1): the round folders, summary.json and the frontier; the reference fixed at the SFT model unless
round_reference says previous; a reward model folder as the reward; a run stopped after round 1's training,
then killed in the middle of round 2's, resumes each time where it stopped (round 2 from its last complete
checkpoint) and ends with the uninterrupted run's numbers and weights; without a reward each round waits on
the label page, labelled by a scripted client over HTTP, and resumes its labels after Ctrl+C; bad input in
one line."""

import json
import logging
import os
import signal
import socket
import threading
import urllib.request

import pytest
import torch
import yaml

from preftune.cli import main

REWARD = '''
def length(prompts, completions):
    return [float(len(c)) for c in completions]
'''


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def project(tmp_path_factory, demo_pairs):
    folder = tmp_path_factory.mktemp("iterate")
    (folder / "rewards.py").write_text(REWARD)
    write_jsonl(folder / "prompts.jsonl", [{"prompt": p["prompt"]} for p in demo_pairs[:12]])
    write_jsonl(folder / "few_prompts.jsonl", [{"prompt": p["prompt"]} for p in demo_pairs[:3]])
    write_jsonl(folder / "eval_prompts.jsonl", [{"prompt": p["prompt"]} for p in demo_pairs[40:43]])
    return folder


def args(project, model_dir, out, *extra, reward=None, dataset="prompts.jsonl", steps=2):
    return ["iterate", "--model_name_or_path", str(model_dir), "--dataset", str(project / dataset),
            "--prompts", str(project / "eval_prompts.jsonl"),
            "--reward", reward or f"{project / 'rewards.py'}:length", "--rounds", "3", "--num_samples", "3",
            "--max_new_tokens", "8", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4",
            "--max_steps", str(steps), "--learning_rate", "1e-3", "--logging_steps", "1", "--progress_bar", "false",
            "--tokenized_cache_dir", str(project / "cache"), "--output_dir", str(project / out), *extra]


def run_config(folder):
    return yaml.safe_load((folder / "preftune_config.yaml").read_text())


@pytest.fixture(scope="module")
def whole(project, tiny_model_dir):
    """An uninterrupted run with a reward function: its output folder."""
    assert main(args(project, tiny_model_dir, "whole")) == 0
    return project / "whole"


def test_rounds_write_their_folders_summary_and_frontier(whole, tiny_model_dir):
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["status"] == "completed" and [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    assert (whole / "frontier.png").stat().st_size > 0
    # 12 prompts, 3 rounds, 2 pairs per optimizer step: three disjoint parts of 4
    assert summary["prompts"]["fresh"] is True and summary["prompts"]["per_round"] == [4, 4, 4]
    parts = [{json.loads(line)["prompt"] for line in (whole / f"round_{r}" / "prompts.jsonl").read_text().splitlines()}
             for r in (1, 2, 3)]
    assert len(parts[0] | parts[1] | parts[2]) == 12
    sft = str(tiny_model_dir)
    for r, row in enumerate(summary["rounds"], 1):
        folder = whole / f"round_{r}"
        for path in ("sample/samples.jsonl", "sample/pairs.jsonl", "model/config.json", "model/dpo_metrics/summary.json",
                     "eval/eval.json", "round.json"):
            assert (folder / path).is_file(), path
        pairs = (folder / "sample" / "pairs.jsonl").read_text().splitlines()
        assert row["pairs"] == len(pairs) > 0 and row["steps"] == 2
        assert row["kl_to_sft"] == pytest.approx(json.loads((folder / "eval" / "eval.json").read_text())
                                                 ["models"][0]["prompts"]["kl_per_sequence"])
        assert row["kl_to_sft"] != 0 and isinstance(row["health"], list)  # the policy moved from the SFT model
        # each round starts from the previous one's policy, the reference stays the SFT model
        started = run_config(folder / "model")["model_name_or_path"]
        assert started == (sft if r == 1 else str(whole / f"round_{r - 1}" / "model"))
        assert row["reference"] == sft and run_config(folder / "model")["ref_model"] in (None if r == 1 else sft,)
        assert json.loads((folder / "eval" / "eval.json").read_text())["models"][0]["reference"] == sft
    # round r sampled from round r - 1's policy
    for r in (2, 3):
        settings = json.loads((whole / f"round_{r}" / "sample" / "sample_settings.json").read_text())
        assert settings["model_name_or_path"] == str((whole / f"round_{r - 1}" / "model").resolve())


class Killed(BaseException):
    """A kill: nothing of preftune's catches it (it is no Exception), as nothing outlives a SIGKILL."""


def test_a_run_stopped_then_killed_in_round_2s_training_resumes_and_ends_as_the_uninterrupted_run(
        project, tiny_model_dir, whole, monkeypatch):
    """Stopped in round 1's evaluation (after its training): the rerun neither samples nor trains round 1
    again. Killed in round 2's training right after checkpoint-1 is written (save_steps 1; checkpoints do
    not change the numbers): the next rerun trains round 2 on from checkpoint-1, not from the start, and the
    three rounds end with the uninterrupted run's figures and weights; a last run finds every round done."""
    from safetensors.torch import load_file

    from preftune import checkpoints
    from preftune import train as train_module
    from preftune.commands import eval as eval_cmd
    from preftune.commands import sample as sample_cmd

    calls = []

    def counted(name, fn, fail=False):
        def wrapper(cfg):
            calls.append((name, cfg.output_dir))
            if fail:
                raise KeyboardInterrupt
            return fn(cfg)
        return wrapper

    real = {"sample": sample_cmd.run, "train": train_module.train, "eval": eval_cmd.run,
            "save": checkpoints.save_checkpoint}
    argv = args(project, tiny_model_dir, "killed", "--save_steps", "1")
    monkeypatch.setattr(sample_cmd, "run", counted("sample", real["sample"]))
    monkeypatch.setattr(train_module, "train", counted("train", real["train"]))
    monkeypatch.setattr(eval_cmd, "run", counted("eval", real["eval"], fail=True))
    assert main(argv) == 130
    out = project / "killed"
    assert [c[0] for c in calls] == ["sample", "train", "eval"] and not (out / "summary.json").exists()

    def save_then_kill(*a):
        real["save"](*a)
        if a[6] == 1 and "round_2" in a[5].output_dir:  # (engine, ..., cfg, step, ...): round 2's checkpoint-1
            raise Killed

    calls.clear()
    monkeypatch.setattr(eval_cmd, "run", counted("eval", real["eval"]))
    monkeypatch.setattr(checkpoints, "save_checkpoint", save_then_kill)
    with pytest.raises(Killed):
        main(argv)
    assert calls == [("eval", str(out / "round_1" / "eval")), ("sample", str(out / "round_2" / "sample")),
                     ("train", str(out / "round_2" / "model"))]
    model = out / "round_2" / "model"
    assert (model / "checkpoint-1").is_dir() and not (model / "model.safetensors").exists()

    calls.clear()
    monkeypatch.setattr(checkpoints, "save_checkpoint", real["save"])
    assert main(argv) == 0
    assert calls == [("train", str(model)), ("eval", str(out / "round_2" / "eval")),
                     ("sample", str(out / "round_3" / "sample")), ("train", str(out / "round_3" / "model")),
                     ("eval", str(out / "round_3" / "eval"))]
    summary = json.loads((model / "dpo_metrics" / "summary.json").read_text())
    assert summary["resumed_from"] == {"checkpoint": str(model / "checkpoint-1"), "step": 1}
    resumed, uninterrupted = (json.loads((folder / "summary.json").read_text()) for folder in (out, whole))
    assert len(resumed["rounds"]) == len(uninterrupted["rounds"]) == 3
    for one, two in zip(resumed["rounds"], uninterrupted["rounds"]):
        for key in ("pairs", "steps", "reward", "kl_to_sft", "sample_reward_mean"):
            assert one[key] == pytest.approx(two[key], abs=1e-5), key
    for r in (2, 3):
        weights, expected = (load_file(folder / f"round_{r}" / "model" / "model.safetensors") for folder in (out, whole))
        assert all(torch.equal(weights[k], expected[k]) for k in expected), r

    calls.clear()
    assert main(argv) == 0
    assert calls == []  # every round done: nothing sampled, trained or evaluated again


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tiny_model_dir, tiny_tokenizer):
    """A sequence classifier with one output, built from the tiny model (what `preftune rm` writes)."""
    from transformers import AutoModelForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny_rm")
    torch.manual_seed(3)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    with torch.no_grad():
        model.score.weight.normal_(0, 0.5)
    model.config.pad_token_id = tiny_tokenizer.pad_token_id
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def test_a_reward_model_scores_and_previous_rounds_policy_is_the_reference(project, tiny_model_dir, reward_model_dir):
    """round_reference: previous: round 2 trains against round 1's policy (train's default, a frozen copy of
    the policy it starts from); too few prompts to split: every round samples all of them, and says so."""
    out = project / "previous"
    assert main(args(project, tiny_model_dir, "previous", "--round_reference", "previous", reward=str(reward_model_dir),
                     dataset="few_prompts.jsonl", steps=1)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and [r["steps"] for r in summary["rounds"]] == [1, 1, 1]
    assert summary["prompts"]["fresh"] is False and summary["prompts"]["per_round"] == [3, 3, 3]
    assert "every round samples all of them" in summary["prompts"]["why"]
    round_1, round_2 = (str(out / f"round_{r}" / "model") for r in (1, 2))
    assert [r["reference"] for r in summary["rounds"]] == [str(tiny_model_dir), round_1, round_2]
    for r, start in ((2, round_1), (3, round_2)):
        config = run_config(out / f"round_{r}" / "model")
        assert config["model_name_or_path"] == start and config["ref_model"] is None
    scores = [c["score"] for line in (out / "round_1" / "sample" / "samples.jsonl").read_text().splitlines()
              for c in json.loads(line)["completions"]]
    assert len(set(scores)) > 1 and all(isinstance(s, float) for s in scores)  # the reward model's, not lengths
    # the evaluation's KL is to the SFT model whatever the training's reference
    for r in (1, 2, 3):
        eval_json = json.loads((out / f"round_{r}" / "eval" / "eval.json").read_text())
        assert eval_json["models"][0]["reference"] == str(tiny_model_dir)
        assert summary["rounds"][r - 1]["reward"] == pytest.approx(eval_json["models"][0]["prompts"]["reward"])


@pytest.mark.parametrize("drop,extra,message", [
    ("--reward", (), "prompts: without reward people score the rounds"),
    ("--prompts", (), "preftune iterate needs prompts"),
    (None, ("--rounds", "0"), "rounds must be at least 1"),
    (None, ("--round_reference", "last"), "round_reference: unknown value 'last'; use sft or previous"),
])
def test_bad_input_is_one_line(project, tiny_model_dir, capsys, drop, extra, message):
    argv = args(project, tiny_model_dir, "bad", *extra)
    if drop:
        i = argv.index(drop)
        argv = argv[:i] + argv[i + 2:]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_other_settings_on_resume_are_refused(project, tiny_model_dir, whole, capsys):
    assert main(args(project, tiny_model_dir, "whole", "--learning_rate", "2e-3")) == 2
    err = capsys.readouterr().err.strip()
    assert "holds rounds run with other settings (learning_rate 0.001 -> 0.002)" in err and "\n" not in err


def test_a_key_added_to_preftune_since_the_rounds_ran_does_not_block_their_resume(project, tiny_model_dir, whole,
                                                                                capsys):
    """Rounds begun with an earlier preftune, whose settings lack a key added since: at its default it changes
    nothing and the run goes on; set to another value it is refused as any change is."""
    import shutil

    shutil.copytree(whole, project / "older")
    path = project / "older" / "iterate_settings.json"
    saved = json.loads(path.read_text())
    saved.pop("health_max_seed_kl_ratio")
    path.write_text(json.dumps(saved))
    assert main(args(project, tiny_model_dir, "older", "--health_max_seed_kl_ratio", "3")) == 2
    assert "(health_max_seed_kl_ratio 2.0 -> 3.0)" in capsys.readouterr().err
    assert main(args(project, tiny_model_dir, "older")) == 0


# --- scored by people: the label page inside the loop ---------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def annotate(port: int, stop: threading.Event, judged: list, interrupt_after: int | None = None):
    """A scripted annotator on the page's HTTP API, as the page calls it: asks for the next comparison and
    prefers the longer completion (the larger text at equal length, a tie when equal), until stop; with
    interrupt_after, presses Ctrl+C (SIGINT to this process) after that many judgements."""
    base = f"http://127.0.0.1:{port}"
    while not stop.is_set():
        try:
            with urllib.request.urlopen(f"{base}/api/next?client=script", timeout=10) as reply:
                comparison = json.load(reply)["comparison"]
        except OSError:  # no page served: sampling or training between two rounds
            stop.wait(0.05)
            continue
        if comparison is None:  # all labelled: the round is about to go on
            stop.wait(0.05)
            continue
        a, b = comparison["a"]["text"], comparison["b"]["text"]
        choice = "tie" if a == b else "A" if (len(a), a) > (len(b), b) else "B"
        body = json.dumps({"comparison": comparison["id"], "choice": choice, "shown_as_a": comparison["a"]["index"],
                           "annotator": "script", "client": "script"}).encode()
        request = urllib.request.Request(f"{base}/api/judge", data=body, headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(request, timeout=10).read()
        except OSError:  # the server stopping under the request: asked again
            continue
        judged.append(comparison["id"])
        if interrupt_after is not None and len(judged) == interrupt_after:
            os.kill(os.getpid(), signal.SIGINT)
            return


def test_rounds_scored_by_people_wait_on_the_label_page_and_resume(project, tiny_model_dir, caplog):
    """No reward: each round serves the label page on its candidates and waits; a scripted client labels
    over HTTP. Stopped (Ctrl+C) after 2 labels of round 1, the rerun keeps them, waits for the other 2 and
    runs the 3 rounds: the labelled pairs trained on, each round from the previous one's policy, no
    evaluation."""
    port, out = free_port(), project / "people"
    argv = ["iterate", "--model_name_or_path", str(tiny_model_dir), "--dataset", str(project / "prompts.jsonl"),
            "--rounds", "3", "--num_samples", "2", "--max_new_tokens", "8", "--per_device_train_batch_size", "2",
            "--max_steps", "1", "--learning_rate", "1e-3", "--logging_steps", "1", "--progress_bar", "false",
            "--label_port", str(port), "--tokenized_cache_dir", str(project / "cache"), "--output_dir", str(out)]
    labels = out / "round_1" / "sample" / "samples.jsonl.labels.jsonl"
    caplog.set_level(logging.INFO, logger="preftune")

    stop, judged = threading.Event(), []
    client = threading.Thread(target=annotate, args=(port, stop, judged, 2), daemon=True)
    client.start()
    try:
        assert main(argv) == 130  # Ctrl+C while round 1 waits
    finally:
        stop.set()
        client.join()
    assert len(labels.read_text().splitlines()) == 2 and not (out / "round_1" / "model").exists()
    # 4 prompts a round, 2 completions each: 4 comparisons
    assert f"round 1/3: waiting for 4 labels (every comparison) at http://127.0.0.1:{port}/ (0 of 4" in caplog.text

    caplog.clear()
    stop, judged = threading.Event(), []
    client = threading.Thread(target=annotate, args=(port, stop, judged), daemon=True)
    client.start()
    try:
        assert main(argv) == 0
    finally:
        stop.set()
        client.join()
    assert "round 1/3: waiting for 4 labels (every comparison)" in caplog.text and "(2 of 4 comparisons" in caplog.text
    assert "round 2/3: waiting for 4 labels" in caplog.text and "round 3/3: waiting for 4 labels" in caplog.text
    assert len(judged) == 2 + 4 + 4  # the rest of round 1, rounds 2 and 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["sft"] is None and not (out / "frontier.png").exists()
    for r, row in enumerate(summary["rounds"], 1):
        folder = out / f"round_{r}"
        judgements = [json.loads(line) for line in
                      (folder / "sample" / "samples.jsonl.labels.jsonl").read_text().splitlines()]
        preferred = [j for j in judgements if j["choice"] not in ("tie", "skip")]
        pairs = (folder / "sample" / "pairs.jsonl").read_text().splitlines()
        assert len(judgements) == 4 and row["pairs"] == len(pairs) == len(preferred) > 0
        for pair in map(json.loads, pairs):  # the client's preference is what training got
            assert (len(pair["chosen"]), pair["chosen"]) > (len(pair["rejected"]), pair["rejected"])
        assert row["scored_by"] == "people (label page)" and row["reward"] is None and row["steps"] == 1
        assert (folder / "model" / "config.json").is_file() and not (folder / "eval").exists()
        assert json.loads((folder / "round.json").read_text())["done"] is True
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    for r in (2, 3):  # round r sampled and trained from round r - 1's policy
        assert run_config(out / f"round_{r}" / "model")["model_name_or_path"] == str(out / f"round_{r - 1}" / "model")
        settings = json.loads((out / f"round_{r}" / "sample" / "sample_settings.json").read_text())
        assert settings["model_name_or_path"] == str((out / f"round_{r - 1}" / "model").resolve())


def test_a_round_goes_on_when_all_are_labelled_or_label_min_pairs_are_preferred():
    from preftune.commands.iterate import enough_labels

    def progress(labelled, preferred, total=6):
        return {"total": total, "labelled": labelled, "preferred": preferred, "unlabelled": total - labelled}

    assert not enough_labels(progress(5, 5), 0) and enough_labels(progress(6, 0), 0)  # 0: every comparison
    assert enough_labels(progress(3, 3), 3) and not enough_labels(progress(4, 2), 3)  # ties and skips: no pair
    assert enough_labels(progress(6, 2), 3)  # nothing left to label: goes on below label_min_pairs

"""`preftune label`: the labels store and export (no server), the HTTP API through FastAPI's
TestClient, bad input as one line, and one real headless-Chromium session that labels by keyboard,
survives a SIGKILL of the server and exports what was labelled."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from preftune.cli import main
from preftune.data import read_dataset
from preftune.errors import DataError
from preftune.config.load import from_dict
from preftune.labels import AlreadyJudged, LabelStore, NotJudged, dataset_folders, export_pairs, labels_path

ROOT = Path(__file__).resolve().parents[1]

RECORDS = [
    {"id": "r1", "prompt": "How do I reverse a list in Python?",
     "completions": [{"text": "Use **slicing**: `xs[::-1]`, or in place:\n\n```python\nxs.reverse()\n```", "score": 0.9},
                     {"text": "<script>window.pwned = 1</script><b>bold?</b> no idea", "score": None}]},
    {"id": "r2", "prompt": "Name a colour.", "completions": [{"text": "Red.", "score": 1}, {"text": "Blue.", "score": 0.5},
                                                             {"text": "Seven.", "score": None}]},
    {"id": "r3", "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "How are you?"}],
     "completions": [{"text": "Fine, thanks.", "score": None}, {"text": "Go away.", "score": None}]},
    {"id": "r4", "prompt": "Capital of France?", "system": "You are a geography teacher.",
     "completions": [{"text": "Paris.", "score": None}, {"text": "Lyon.", "score": None}]},
    {"id": "r5", "prompt": "How many squares?", "images": ["img/square.png"],  # beside the file: shown above the prompt
     "completions": [{"text": "One.", "score": None}, {"text": "Five.", "score": None}]},
]
# r1#0-1, r2#0-1, r2#0-2, r2#1-2, r3#0-1, r4#0-1, r5#0-1
COMPARISONS = 7


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_image(path: Path, colour: str = "red", size: tuple[int, int] = (24, 16), fmt: str | None = None) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, fmt)
    return path


@pytest.fixture
def candidates(tmp_path) -> Path:
    write_image(tmp_path / "img" / "square.png")
    return write_jsonl(tmp_path / "candidates.jsonl", RECORDS)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --- the store -----------------------------------------------------------------------------------

def test_comparisons_are_every_pair_in_a_seeded_random_order(tmp_path, candidates):
    store = LabelStore(candidates, seed=0)
    assert [c.id for c in store.comparisons] == ["r1#0-1", "r2#0-1", "r2#0-2", "r2#1-2", "r3#0-1", "r4#0-1", "r5#0-1"]
    assert all(c.first < c.second and c.shown_as_a in (c.first, c.second) for c in store.comparisons)
    # the same seed gives the same order on every restart; over many comparisons both orders occur
    assert [c.shown_as_a for c in LabelStore(candidates, seed=0).comparisons] == [c.shown_as_a for c in store.comparisons]
    many = write_jsonl(tmp_path / "many.jsonl", [{"id": str(i), "prompt": "p", "completions": [
        {"text": "x", "score": None}, {"text": "y", "score": None}]} for i in range(200)])
    first_as_a = [c.shown_as_a == c.first for c in LabelStore(many, seed=0).comparisons]
    assert 60 < sum(first_as_a) < 140
    assert first_as_a != [c.shown_as_a == c.first for c in LabelStore(many, seed=1).comparisons]


def test_each_judgement_is_on_disk_before_judge_returns(candidates, monkeypatch):
    store = LabelStore(candidates, writable=True)
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    c = store.hand_out("tab")
    entry = store.judge(c.id, "B", c.shown_as_a, annotator=" ana ", seconds=2.5, client="tab")
    assert synced and synced[-1] == store._fd
    assert lines(labels_path(candidates)) == [entry]
    assert entry["choice"] == c.shown_as_b and entry["shown_as_a"] == c.shown_as_a
    assert entry["record"] == "r1" and entry["completions"] == [0, 1]
    assert entry["annotator"] == "ana" and entry["seconds"] == 2.5 and entry["time"].endswith("Z")


def test_undo_appends_and_a_reopened_store_resumes_at_the_next_unlabelled(candidates):
    store = LabelStore(candidates, writable=True)
    for choice in ("A", "tie", "skip"):
        c = store.hand_out("tab")
        store.judge(c.id, choice, c.shown_as_a, client="tab")
    before = labels_path(candidates).read_bytes()
    assert store.undo(client="tab").id == "r2#0-2"  # the latest judgement by default
    assert store.hand_out("tab").id == "r2#0-2"  # handed back to the one who undid it
    with pytest.raises(NotJudged):
        store.undo("r2#0-2")
    c = store.comparison("r2#0-2")
    store.judge(c.id, "A", c.shown_as_a, client="tab")  # undo then redo is accepted
    with pytest.raises(AlreadyJudged):
        store.judge(c.id, "B", c.shown_as_a)
    assert labels_path(candidates).read_bytes().startswith(before)  # appended, never rewritten
    assert [e.get("undo") for e in lines(labels_path(candidates))] == [None, None, None, "r2#0-2", None]
    store.close()

    again = LabelStore(candidates, writable=True)
    assert again.current == store.current
    assert again.progress() == {"total": COMPARISONS, "labelled": 3, "preferred": 2, "ties": 1, "skips": 0,
                                "unlabelled": 4}
    assert again.hand_out("new tab").id == "r2#1-2"
    assert again.undo().id == "r2#0-2"  # the order of judgements survives the restart too


def test_two_tabs_are_handed_different_comparisons(candidates):
    store = LabelStore(candidates, writable=True)
    assert store.hand_out("one").id == "r1#0-1"
    assert store.hand_out("two").id == "r2#0-1"
    assert store.hand_out("one").id == "r1#0-1"  # asking again keeps what it holds
    for c in store.comparisons[2:]:
        store.judge(c.id, "A", c.shown_as_a)
    # nothing free left: a third tab is not blocked by the others' holds, the server refuses the duplicate
    assert store.hand_out("three").id == "r1#0-1"
    c = store.comparison("r1#0-1")
    store.judge(c.id, "A", c.shown_as_a, client="three")
    with pytest.raises(AlreadyJudged):
        store.judge(c.id, "B", c.shown_as_a, client="one")


def test_a_half_written_last_line_is_dropped_not_an_error(candidates, caplog):
    store = LabelStore(candidates, writable=True)
    c = store.hand_out("tab")
    store.judge(c.id, "A", c.shown_as_a)
    store.close()
    with open(labels_path(candidates), "a") as f:
        f.write('{"comparison": "r2#0-1", "reco')  # a crash in the middle of a write
    assert LabelStore(candidates).progress()["labelled"] == 1  # export reads past it
    store = LabelStore(candidates, writable=True)
    assert "half-written" in caplog.text
    c = store.hand_out("tab")
    store.judge(c.id, "B", c.shown_as_a)
    assert [e["comparison"] for e in lines(labels_path(candidates))] == ["r1#0-1", "r2#0-1"]
    store.close()
    with open(labels_path(candidates), "a") as f:
        f.write('{"undo": "r2#0-1"}')  # a whole line whose newline was lost in an edit: kept
    store = LabelStore(candidates, writable=True)
    assert store.hand_out("tab").id == "r2#0-1"
    store.judge("r2#0-1", "tie", store.comparison("r2#0-1").shown_as_a)
    assert [e.get("undo") or e["choice"] for e in lines(labels_path(candidates))][-2:] == ["r2#0-1", "tie"]


def test_a_second_server_on_the_same_file_is_refused(candidates):
    store = LabelStore(candidates, writable=True)
    with pytest.raises(DataError, match="in use by another `preftune label`"):
        LabelStore(candidates, writable=True)
    store.close()
    LabelStore(candidates, writable=True).close()


def test_labels_are_not_applied_to_texts_that_changed(candidates, capsys):
    store = LabelStore(candidates, writable=True)
    c = store.hand_out("tab")
    store.judge(c.id, "A", c.shown_as_a)
    store.close()
    records = json.loads(json.dumps(RECORDS))
    records[0]["completions"][1]["text"] = "an edited answer"
    write_jsonl(candidates, records)
    assert main(["label", str(candidates), "--export", str(candidates.with_name("pairs.jsonl"))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{labels_path(candidates)}:1" in err[0] and "other texts" in err[0]
    write_jsonl(candidates, RECORDS[1:])
    assert main(["label", str(candidates), "--export", str(candidates.with_name("pairs.jsonl"))]) == 2
    assert "comparison 'r1#0-1' is not in" in capsys.readouterr().err


def test_export_writes_pairs_that_training_reads(candidates, tmp_path, capsys):
    store = LabelStore(candidates, writable=True)
    answers = {"r1#0-1": "A", "r2#0-1": "B", "r2#0-2": "tie", "r2#1-2": "skip", "r3#0-1": "A", "r4#0-1": "B"}
    for cid, choice in answers.items():  # r5 stays unlabelled
        c = store.comparison(cid)
        store.judge(cid, choice, c.shown_as_a)
    store.close()
    out = tmp_path / "pairs.jsonl"
    assert main(["label", str(candidates), "--export", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wrote 4 pairs" in printed and "1 tied, 1 skipped, 1 unlabelled" in printed

    texts = {r["id"]: [c["text"] for c in r["completions"]] for r in RECORDS}
    comparisons = {c.id: c for c in LabelStore(candidates).comparisons}
    expected = []
    for cid in ("r1#0-1", "r2#0-1", "r3#0-1", "r4#0-1"):
        c = comparisons[cid]
        chosen = c.shown_as_a if answers[cid] == "A" else c.shown_as_b
        rejected = c.second if chosen == c.first else c.first
        expected.append((texts[c.record.id][chosen], texts[c.record.id][rejected]))
    pairs = lines(out)
    assert [p["chosen"] if isinstance(p["chosen"], str) else p["chosen"][0]["content"] for p in pairs] == \
        [e[0] for e in expected]
    # a prompt given as messages stays messages (TRL's conversational format); system kept
    assert pairs[2]["prompt"] == RECORDS[2]["prompt"]
    assert pairs[2]["rejected"] == [{"role": "assistant", "content": expected[2][1]}]
    assert pairs[3]["system"] == "You are a geography teacher."

    read = read_dataset(str(out), str(tmp_path))
    assert [(p.chosen, p.rejected) for p in read] == expected
    assert read[2].system == "Be brief." and [m["role"] for m in read[2].messages] == ["user", "assistant", "user"]
    assert read[3].system == "You are a geography teacher." and read[3].prompt == "Capital of France?"


def test_a_pairs_file_can_be_labelled_again(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "Q1", "chosen": "good", "rejected": "bad"},
        {"prompt": [{"role": "user", "content": "Q2"}], "chosen": [{"role": "assistant", "content": "yes"}],
         "rejected": [{"role": "assistant", "content": "no"}], "system": "S"},
        {"prompt": "Q1", "chosen": "good", "rejected": "bad"},  # a duplicate is its own comparison
    ])
    store = LabelStore(pairs, writable=True)
    assert len(store.comparisons) == 3 and len({c.record.id for c in store.comparisons}) == 3
    for c in store.comparisons:
        store.judge(c.id, "A" if c.shown_as_a == 1 else "B", c.shown_as_a)  # prefer the old rejected
    counts = export_pairs(store, tmp_path / "relabelled.jsonl")
    assert counts["pairs"] == 3
    assert lines(tmp_path / "relabelled.jsonl")[:2] == [
        {"prompt": "Q1", "chosen": "bad", "rejected": "good"},
        {"prompt": [{"role": "user", "content": "Q2"}], "chosen": [{"role": "assistant", "content": "no"}],
         "rejected": [{"role": "assistant", "content": "yes"}], "system": "S"}]
    # ids come from the texts: a pair inserted above does not move the labels onto other pairs
    write_jsonl(pairs, [{"prompt": "Q0", "chosen": "a", "rejected": "b"}] + lines(pairs))
    assert LabelStore(pairs).progress()["labelled"] == 3


def vision_candidates(tmp_path) -> Path:
    """Records as `preftune sample` writes image prompts (TRL's vision format: messages with image parts,
    `images` as absolute paths, system apart), a text prompt with a relative image, and a text-only record."""
    data = tmp_path / "data"
    cat, dog = write_image(data / "img" / "cat.png", "red"), write_image(data / "img" / "dog.jpg", "blue", fmt="JPEG")
    two = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which is first?"},
                                        {"type": "image"}]}]
    pair = [{"text": "The cat.", "score": None}, {"text": "The dog.", "score": None}]
    return write_jsonl(data / "samples.jsonl", [
        {"id": "0", "prompt": two, "system": "Look closely.", "images": [str(cat), str(dog)], "completions": pair},
        {"id": "1", "prompt": "What colour?", "system": None, "images": ["img/cat.png"], "completions": pair},
        {"id": "2", "prompt": [{"role": "user", "content": "No image here."}], "system": None, "images": [],
         "completions": pair}])


def test_export_keeps_the_images_and_training_reads_them_as_image_pairs(tmp_path, capsys):
    path = vision_candidates(tmp_path)
    store = LabelStore(path, writable=True)
    for c in store.comparisons:  # the first completion preferred each time
        store.judge(c.id, "A" if c.shown_as_a == 0 else "B", c.shown_as_a)
    store.close()
    out = tmp_path / "pairs.jsonl"  # another folder than the candidates': the paths are absolute
    assert main(["label", str(path), "--export", str(out)]) == 0
    assert "wrote 3 pairs" in capsys.readouterr().out
    written = lines(out)
    img = tmp_path / "data" / "img"
    assert [p["images"] for p in written] == [[str(img / "cat.png"), str(img / "dog.jpg")], [str(img / "cat.png")], []]
    assert written[0]["prompt"][0] == {"role": "system", "content": "Look closely."}  # where the vision reader takes it

    read = read_dataset(str(out), str(tmp_path))  # training's reader: image pairs, the same pixels
    assert [len(p.images) for p in read] == [2, 1, 0] and read[0].images[0] == read[1].images[0]
    assert [r.size for r in read[0].images] == [(24, 16), (24, 16)] and read[0].images[0] != read[0].images[1]
    assert read[0].system == "Look closely." and read[0].messages == written[0]["prompt"][1:]
    assert read[1].messages == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    assert [(p.chosen, p.rejected) for p in read] == [("The cat.", "The dog.")] * 3

    # a TRL vision pairs file (completions as text parts) is labelled again, its images kept
    trl = write_jsonl(tmp_path / "data" / "trl.jsonl", [{
        "prompt": written[1]["prompt"], "images": ["img/cat.png"],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "Red."}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "Blue."}]}]}])
    store = LabelStore(trl, writable=True)
    (c,) = store.comparisons
    store.judge(c.id, "A" if c.shown_as_a == 1 else "B", c.shown_as_a)  # prefers Blue.
    export_pairs(store, out)
    (pair,) = read_dataset(str(out), str(tmp_path))
    assert (pair.chosen, pair.rejected, pair.images) == ("Blue.", "Red.", read[1].images)


def test_images_are_served_from_the_datasets_folder_only(tmp_path, caplog):
    from fastapi.testclient import TestClient

    from preftune.commands.label import create_app

    data, outside = tmp_path / "data", tmp_path / "outside"
    cat = write_image(data / "img" / "cat.png")
    write_image(data / "scan.tiff", "green", fmt="TIFF")  # no browser shows TIFF: sent as PNG
    photo = write_image(data / "photo.jpg", "blue", fmt="JPEG")
    secret = write_image(outside / "secret.png", "black")
    (data / "notes.txt").write_text("not an image")
    (data / "escape.png").symlink_to(secret)
    (data / "img" / "alias.png").symlink_to(cat)  # a link that stays inside is served
    images = ["img/cat.png", str(cat), "scan.tiff", "img/alias.png", "../outside/secret.png", str(secret),
              "escape.png", "notes.txt", "img/missing.png", "/etc/passwd", "photo.jpg"]
    path = write_jsonl(data / "candidates.jsonl", [
        {"id": "v", "prompt": "Look.", "images": images, "completions": [{"text": "a"}, {"text": "b"}]},
        {"id": "t", "prompt": "Text only.", "completions": [{"text": "a"}, {"text": "b"}]}])
    store = LabelStore(path, writable=True)
    client = TestClient(create_app(store))
    assert "8 image(s) of" not in caplog.text and "6 image(s) of" in caplog.text  # one warning at start

    r = client.get("/")  # the page's policy: images from this server only, nothing inline
    img_src = re.search(r"img-src ([^;]*)", r.headers["content-security-policy"]).group(1)
    assert img_src == "'self'" and "default-src 'none'" in r.headers["content-security-policy"]

    shown = client.get("/api/next").json()["comparison"]
    assert [i["url"] for i in shown["images"]] == [f"/image/0/{n}" for n in range(len(images))]
    assert [i["error"] is None for i in shown["images"]] == [True] * 4 + [False] * 6 + [True]
    assert "outside the folders images are served from" in shown["images"][4]["error"]
    assert "links to a file outside" in shown["images"][6]["error"]

    r = client.get("/image/0/0")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content == cat.read_bytes()
    assert r.headers["x-content-type-options"] == "nosniff"
    assert client.get("/image/0/3").content == cat.read_bytes()
    r = client.get("/image/0/2")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content.startswith(b"\x89PNG")
    r = client.get("/image/0/10")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg" and r.content == photo.read_bytes()
    statuses = {n: client.get(f"/image/0/{n}") for n in range(4, 10)}
    assert {n: r.status_code for n, r in statuses.items()} == {4: 403, 5: 403, 6: 403, 7: 415, 8: 404, 9: 403}
    assert all(r.headers["content-type"] == "application/json" and b"black" not in r.content for r in statuses.values())
    for url in ("/image/1/0", "/image/2/0", "/image/0/99", "/image/x/0", "/image/-1/0", "/image/%C2%B2/0",
                "/image/0/..%2F..%2Fsecret.png",
                "/image/..%2Foutside%2Fsecret.png/0"):
        assert client.get(url).status_code == 404, url
    # the same page in a shared text-only flow: nothing changes
    store.judge("v#0-1", "skip", store.comparison("v#0-1").shown_as_a)
    assert client.get("/api/next").json()["comparison"]["images"] == []
    store.close()

    # --media_dir serves its folder too, and relative paths are read from it
    store = LabelStore(path, media_dir=str(outside))
    assert store.images.read("secret.png")[0] == secret.read_bytes() and store.images.problem("../data/img/cat.png") is None
    # iterate's page serves the folder of the prompts it sampled (their images are absolute paths there)
    (outside / "prompts.jsonl").write_text("{}\n")
    store = LabelStore(path, image_roots=dataset_folders(from_dict({"dataset": str(outside / "prompts.jsonl")})))
    assert store.images.problem(str(secret)) is None and store.images.problem("/etc/passwd") is not None


# --- bad input: one line naming file, line and field, exit 2 -----------------------------------

GOOD = {"id": "x", "prompt": "p", "completions": [{"text": "a", "score": None}, {"text": "b", "score": 0.1}]}


@pytest.mark.parametrize("text,message", [
    ('{"id": "x", "prompt": "p", "completions": [{"text": "a"}, {"text": "b"}]}\n{"id": "y", "prom\n',
     r":2: malformed JSON line"),
    (json.dumps(GOOD) + "\n" + '{"id": "y", "prom', r":2: the last line is cut off .* looks truncated"),  # data's reader
    (json.dumps({**GOOD, "completions": None}), r":1: field 'completions' is missing"),
    (json.dumps({**GOOD, "completions": [{"text": "a"}]}), r":1: field 'completions' has 1 completion"),
    (json.dumps(GOOD) + "\n" + json.dumps(GOOD), r":2: duplicate id 'x' \(first at .*:1\)"),
    (json.dumps({**GOOD, "id": 7}), r":1: field 'id' is int, expected a string; quote it"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "id"}), r":1: missing field 'id'"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "prompt"}), r":1: missing field 'prompt'"),
    (json.dumps({**GOOD, "completions": [{"text": "a"}, {"text": 3}]}), r":1: field 'completions' item 1"),
    (json.dumps({**GOOD, "completions": [{"text": "a"}, {"text": "b", "score": "high"}]}), r"'score' is str"),
    (json.dumps({**GOOD, "prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}),
     r":1: field 'prompt' ends on a message with role 'assistant'"),
    (json.dumps([GOOD]), r":1: a JSON array, but labelling reads JSON Lines"),
    (json.dumps(GOOD) + "\n" + json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}),
     r":2: a pairs record in a candidates file"),
    (json.dumps({"prompt": "p", "chosen": "a"}), r":1: missing field 'rejected'"),
    (json.dumps({**GOOD, "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}],
                 "images": ["a.png", "b.png"]}), r":1: 1 image placeholder\(s\) .* but 2 image\(s\) in 'images'"),
    (json.dumps({**GOOD, "images": [{"bytes": None}]}), r":1: field 'images' must be a list of image file paths"),
    (json.dumps({**GOOD, "prompt": [{"role": "system", "content": [{"type": "image"}]}, {"role": "user", "content": "q"}],
                 "images": ["a.png"]}), r":1: field 'prompt': a system message holds an image part"),
    ("", r"no records"),
])
def test_a_bad_candidates_file_is_one_line(tmp_path, capsys, text, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    assert main(["label", str(path), "--export", str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"preftune: error: {path}")
    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("args,message", [
    ([], "no FILE given"),
    (["{file}", "--pref_beta", "0.1"], "unknown option --pref_beta; options: --host, --port"),
    (["{file}", "--config", "x.yaml"], "config file not found: x.yaml"),
    (["{file}", "--port", "http"], "--port must be a port number"),
    (["{file}", "--seed", "-1"], "--seed must be a non-negative integer"),
    (["missing.jsonl"], "missing.jsonl: no such file"),
    (["{file}", "--export", "{file}"], "would overwrite the file it is made from"),
    (["{file}", "--export", "no/such/folder/pairs.jsonl"], "folder 'no/such/folder' does not exist"),
    (["{file}", "--media_dir", "no/such/folder"], "--media_dir no/such/folder: no such folder"),
])
def test_bad_options_are_one_line(candidates, capsys, args, message):
    assert main(["label", *[a.format(file=candidates) for a in args]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_serving_without_fastapi_names_the_extra(candidates, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # what an install without the extra looks like
    assert main(["label", str(candidates)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'preftune[label]'" in err[0]


def test_a_taken_port_is_one_line(candidates, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["label", str(candidates), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--port {port}: cannot listen there" in err[0] and "0 picks a free one" in err[0]


# --- the HTTP API ---------------------------------------------------------------------------------

@pytest.fixture
def api(candidates):
    from fastapi.testclient import TestClient

    from preftune.commands.label import create_app

    store = LabelStore(candidates, seed=0, writable=True)
    yield TestClient(create_app(store, annotator="ana")), store
    store.close()


def test_the_page_is_served_with_a_policy_that_runs_only_its_own_script(api):
    import base64
    import hashlib

    client, _ = api
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    policy = r.headers["content-security-policy"]
    (script,) = re.findall(r"<script>(.*?)</script>", r.text, flags=re.DOTALL)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}';" in policy and "unsafe-inline" not in policy
    assert "default-src 'none'" in policy


def test_judge_refuses_a_labelled_comparison_with_409_unless_undone(api, candidates):
    client, store = api
    one = client.get("/api/next", params={"client": "one"}).json()
    two = client.get("/api/next", params={"client": "two"}).json()
    assert one["comparison"]["id"] == "r1#0-1" and two["comparison"]["id"] == "r2#0-1"
    assert one["progress"]["total"] == COMPARISONS and one["annotator"] == "ana"
    shown = one["comparison"]
    assert {shown["a"]["index"], shown["b"]["index"]} == {0, 1} and "score" not in json.dumps(shown)

    r = client.post("/api/judge", json={"client": "one", "comparison": "r1#0-1", "choice": "B",
                                        "shown_as_a": shown["a"]["index"], "seconds": 3.25})
    assert r.status_code == 200
    body = r.json()
    assert body["saved"]["choice"] == shown["b"]["index"] and body["saved"]["annotator"] == "ana"
    assert body["comparison"]["id"] == "r2#0-2"  # r2#0-1 is held by the other tab
    assert body["progress"]["labelled"] == 1

    # the other tab answers the same comparison: refused, and it is given the next one to show
    r = client.post("/api/judge", json={"client": "two", "comparison": "r1#0-1", "choice": "A", "shown_as_a": 0})
    assert r.status_code == 409 and "already labelled by ana" in r.json()["error"]
    assert r.json()["comparison"]["id"] == "r2#0-1" and r.json()["progress"]["labelled"] == 1

    r = client.post("/api/undo", json={"client": "one", "comparison": "r1#0-1"})
    assert r.status_code == 200 and r.json()["undone"] == "r1#0-1" and r.json()["comparison"]["id"] == "r1#0-1"
    assert r.json()["progress"]["labelled"] == 0
    r = client.post("/api/undo", json={"client": "one", "comparison": "r1#0-1"})
    assert r.status_code == 409 and "no judgement to undo" in r.json()["error"]
    r = client.post("/api/judge", json={"client": "one", "comparison": "r1#0-1", "choice": "tie", "shown_as_a": 1,
                                        "annotator": "bo"})
    assert r.status_code == 200 and r.json()["saved"]["choice"] == "tie" and r.json()["saved"]["annotator"] == "bo"

    saved = lines(labels_path(candidates))
    assert [(e.get("comparison"), e.get("undo"), e.get("choice")) for e in saved] == [
        ("r1#0-1", None, shown["b"]["index"]), (None, "r1#0-1", None), ("r1#0-1", None, "tie")]
    assert saved[0]["seconds"] == 3.25 and saved[0]["shown_as_a"] == shown["a"]["index"]


@pytest.mark.parametrize("body,status,message", [
    ({"comparison": "r1#0-1", "choice": "C", "shown_as_a": 0}, 400, "choice must be one of A, B, tie, skip"),
    ({"comparison": "r1#0-1", "choice": "A", "shown_as_a": 2}, 400, "shown_as_a must be 0 or 1"),
    ({"comparison": "r1#0-1", "choice": "A"}, 400, "'shown_as_a' is None"),
    ({"comparison": "r1#0-1", "choice": "A", "shown_as_a": 0, "seconds": -1}, 400, "seconds must be"),
    ({"comparison": "nope#0-1", "choice": "A", "shown_as_a": 0}, 404, "no comparison 'nope#0-1'"),
])
def test_bad_judgements_are_refused_and_not_saved(api, candidates, body, status, message):
    client, _ = api
    r = client.post("/api/judge", json=body)
    assert r.status_code == status and message in r.json()["error"]
    assert not labels_path(candidates).read_text()


def test_a_failed_write_is_reported_and_nothing_is_recorded(api, candidates, monkeypatch):
    import errno

    client, store = api
    real_write = os.write

    def disk_full(fd, data):
        real_write(fd, data[:10])  # part of the line made it to the file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full)
    r = client.post("/api/judge", json={"comparison": "r1#0-1", "choice": "A", "shown_as_a": 0})
    assert r.status_code == 500 and "No space left on device; nothing was saved" in r.json()["error"]
    assert store.progress()["labelled"] == 0 and labels_path(candidates).read_text() == ""
    monkeypatch.setattr(os, "write", real_write)
    r = client.post("/api/judge", json={"comparison": "r1#0-1", "choice": "A", "shown_as_a": 0})
    assert r.status_code == 200 and [e["comparison"] for e in lines(labels_path(candidates))] == ["r1#0-1"]


def test_only_the_servers_own_host_names_are_answered(candidates):
    from fastapi.testclient import TestClient

    from preftune.commands.label import create_app

    store = LabelStore(candidates, writable=True)
    client = TestClient(create_app(store, allowed_hosts=["127.0.0.1", "localhost"]), base_url="http://127.0.0.1:8765")
    assert client.get("/api/next").status_code == 200
    # a page on another domain that resolves to 127.0.0.1 (DNS rebinding) gets nothing
    assert client.get("/api/next", headers={"Host": "attacker.example:8765"}).status_code == 400
    assert client.post("/api/undo", json={}, headers={"Host": "attacker.example"}).status_code == 400
    store.close()


# --- the page in a real browser ---------------------------------------------------------------------

def start_server(path: Path) -> tuple[subprocess.Popen, str, list[str]]:
    """`preftune label` in a subprocess on a free loopback port; returns it, its URL and its output so far."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "preftune", "label", str(path), "--port", "0", "--seed", "3",
                             "--annotator", "tester"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(120, proc.kill)  # a server that never prints its URL must not hang the suite
    watchdog.start()
    output = []
    for line in proc.stdout:
        output.append(line)
        if line.startswith("open http://127.0.0.1:"):
            break
    watchdog.cancel()
    if not output or not output[-1].startswith("open "):
        pytest.fail(f"preftune label did not start:\n{''.join(output)}")
    # keep reading, so that a full pipe never blocks the server
    threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True).start()
    return proc, output[-1].split()[1], output


def post(url: str, body: dict) -> int:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture
def browser(tmp_path_factory):
    """Headless Chromium through selenium and the system's chromedriver. Missing ones fail the test
    (never skip it): `make test` installs them when run as root."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install -e '.[test]'")
    if not chromium or not driver:
        pytest.fail("the browser test needs Chromium and its driver: apt-get install -y chromium chromium-driver "
                    "(make test does this when run as root); or deselect it with -m 'not slow'")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900",
                "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")  # nothing left behind
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(driver), options=options)
    yield d
    d.quit()


@pytest.mark.slow
@pytest.mark.one_process
def test_label_by_keyboard_in_a_browser_survives_a_killed_server(browser, candidates, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    def shown() -> str:
        return browser.execute_script("return document.body.dataset.comparison || ''")

    def index(side: str) -> int:
        return int(browser.find_element(By.ID, side).get_attribute("data-index"))

    def press(key: str, then: str) -> None:
        """Press a key and wait for the page to show comparison `then` (the server answered)."""
        browser.find_element(By.TAG_NAME, "body").send_keys(key)
        WebDriverWait(browser, 120).until(lambda _: shown() == then, f"after {key!r}: {shown()!r}, expected {then!r}")

    def progress() -> str:
        return browser.find_element(By.ID, "progress").text

    server, url, _ = start_server(candidates)
    try:
        browser.get(url)
        WebDriverWait(browser, 120).until(lambda _: shown() == "r1#0-1", "the first comparison never appeared")
        assert progress() == f"0 of {COMPARISONS} labelled"
        # completions are shown as text: the script is visible and never ran; markdown code becomes code
        texts = browser.find_element(By.ID, "a").text + browser.find_element(By.ID, "b").text
        assert "<script>window.pwned = 1</script><b>bold?</b> no idea" in texts
        assert browser.execute_script("return window.pwned") is None
        assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#a pre code, #b pre code")] == ["xs.reverse()"]
        assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#a strong, #b strong")] == ["slicing"]

        seen = {}  # comparison -> (index shown as A, index shown as B)
        for key, now, then in [("a", "r1#0-1", "r2#0-1"), ("b", "r2#0-1", "r2#0-2"), ("t", "r2#0-2", "r2#1-2"),
                               ("u", "r2#1-2", "r2#0-2"), ("a", "r2#0-2", "r2#1-2")]:
            assert shown() == now
            seen[now] = (index("a"), index("b"))
            press(key, then)
        assert progress() == f"3 of {COMPARISONS} labelled"
        saved = lines(labels_path(candidates))
        assert [(e.get("comparison") or "undo " + e["undo"], e.get("choice")) for e in saved] == [
            ("r1#0-1", seen["r1#0-1"][0]), ("r2#0-1", seen["r2#0-1"][1]), ("r2#0-2", "tie"), ("undo r2#0-2", None),
            ("r2#0-2", seen["r2#0-2"][0])]
        assert all(e["annotator"] == "tester" for e in saved)
        assert all(e["seconds"] >= 0 and e["shown_as_a"] == seen[e["comparison"]][0] for e in saved if "choice" in e)

        server.send_signal(signal.SIGKILL)
        server.wait(timeout=120)
        # a key pressed while the server is down is not lost silently: the page says so and stays put
        browser.find_element(By.TAG_NAME, "body").send_keys("b")
        WebDriverWait(browser, 120).until(lambda _: "cannot reach the server" in browser.find_element(By.ID, "notice").text)
        assert shown() == "r2#1-2" and lines(labels_path(candidates)) == saved

        server, url, _ = start_server(candidates)
        browser.get(url)
        WebDriverWait(browser, 120).until(lambda _: shown() == "r2#1-2", f"resumed at {shown()!r}, not r2#1-2")
        browser.get_log("browser")  # drop the failed request while the server was down: expected
        assert progress() == f"3 of {COMPARISONS} labelled"
        seen["r2#1-2"] = (index("a"), index("b"))

        # another tab labels the comparison on screen: this one's answer is refused and it moves on, past
        # r3#0-1, which the server now holds for that other tab
        assert post(url + "api/judge", {"client": "other tab", "comparison": "r2#1-2", "choice": "B",
                                        "shown_as_a": seen["r2#1-2"][0]}) == 200
        press("a", "r4#0-1")
        assert "not saved" in browser.find_element(By.ID, "notice").text
        assert progress() == f"4 of {COMPARISONS} labelled"
        press("s", "r5#0-1")
        seen["r5#0-1"] = (index("a"), index("b"))
        # its image, served by the server, is drawn above the prompt
        WebDriverWait(browser, 120, poll_frequency=0.05).until(lambda _: browser.execute_script(
            "const i = document.querySelector('#images img'); return i && i.complete && i.naturalWidth"),
            "the prompt's image was not drawn")
        assert browser.execute_script("const i = document.querySelector('#images img'); return [i.naturalWidth, "
                                      "i.getBoundingClientRect().bottom <= "
                                      "document.getElementById('prompt').getBoundingClientRect().top]"
                                      ) == [24, True]
        press("a", "r3#0-1")  # nothing else left: the other tab's hold does not block the end
        roles = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#prompt .role")]
        assert roles == ["system", "user", "assistant", "user"]
        press("s", "")
        assert browser.find_element(By.ID, "done").is_displayed()
        assert progress() == f"{COMPARISONS} of {COMPARISONS} labelled (0 ties, 2 skipped)"
        # no script errors, nothing blocked by the page's policy (the refused judgement's 409 is expected)
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "status of 409" not in e["message"]]
        assert not errors

        server.send_signal(signal.SIGINT)  # Ctrl+C: a clean stop with a summary
        assert server.wait(timeout=120) == 0
    finally:
        if server.poll() is None:
            server.kill()

    out = tmp_path / "pairs.jsonl"
    assert main(["label", str(candidates), "--export", str(out)]) == 0
    pairs = lines(out)
    texts = {r["id"]: [c["text"] for c in r["completions"]] for r in RECORDS}
    expected = {"r1#0-1": seen["r1#0-1"][0], "r2#0-1": seen["r2#0-1"][1], "r2#0-2": seen["r2#0-2"][0],
                "r2#1-2": seen["r2#1-2"][1], "r5#0-1": seen["r5#0-1"][0]}
    assert [p["chosen"] if isinstance(p["chosen"], str) else p["chosen"][0]["content"] for p in pairs] == \
        [texts[cid.split("#")[0]][i] for cid, i in expected.items()]
    assert pairs[-1]["images"] == [str(tmp_path / "img" / "square.png")]

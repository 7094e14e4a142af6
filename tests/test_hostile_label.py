"""Hostile input around the labelling flow (issue 19), through the `preftune` command and the label
server's HTTP API: JSON Lines holding the line separators JSON allows inside strings, lone surrogates,
Host headers of other sites on every bind address, bodies too big to echo, and --export paths that
are not a file. Refusals follow tests/hostile.py's rule: one error line, nothing outside touched."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading

import pytest
from hostile import cli_env, run_refused

from preftune.cli import main
from preftune.data import read_dataset, read_prompts
from preftune.labels import LabelStore, labels_path

NEL, LS, PS = "\u0085", "\u2028", "\u2029"  # str.splitlines() splits at each; JSON allows them raw in a string
PAIR = [{"text": "a", "score": None}, {"text": "b", "score": None}]


def jsonl(path, records, end="\n"):
    """Records as preftune's writers write them: ensure_ascii=False, so U+2028 and friends stay raw."""
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + end for r in records).encode("utf-8"))
    return path


# --- JSON Lines split at "\n" only -----------------------------------------------------------------

def test_label_and_training_read_lines_holding_unicode_line_separators(tmp_path, capsys):
    samples = jsonl(tmp_path / "samples.jsonl", [
        {"id": "r1", "prompt": f"Say{LS}it", "completions": [{"text": f"one{NEL}two", "score": None},
                                                            {"text": f"three{PS}four", "score": None}]},
        {"id": "r2", "prompt": "p", "completions": PAIR}], end="\r\n")  # and CRLF line ends
    assert NEL.encode() in samples.read_bytes()
    store = LabelStore(samples, writable=True)
    c = store.comparison("r1#0-1")
    store.judge(c.id, "A" if c.shown_as_a == 0 else "B", c.shown_as_a, annotator=f"ana{LS}bo")  # prefers 0
    store.close()
    assert LS.encode() in labels_path(samples).read_bytes()  # the labels file holds it raw too, and is read back

    out = tmp_path / "pairs.jsonl"
    assert main(["label", str(samples), "--export", str(out)]) == 0
    assert "wrote 1 pair " in capsys.readouterr().out
    assert NEL.encode() in out.read_bytes()
    (pair,) = read_dataset(str(out), str(tmp_path))  # training's reader
    assert (pair.prompt, pair.chosen, pair.rejected) == (f"Say{LS}it", f"one{NEL}two", f"three{PS}four")


def test_sample_reads_a_prompt_holding_u2028_and_label_reads_what_sample_wrote(tmp_path, tiny_model_dir):
    prompts = jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"First line{LS}second line"}, {"prompt": f"Hi{NEL}"}])
    expected = [f"First line{LS}second line", f"Hi{NEL}"]
    assert [p.prompt for p in read_prompts(str(prompts), str(tmp_path))] == expected  # sample's prompt reader
    out = tmp_path / "out"
    assert main(["sample", "--model_name_or_path", str(tiny_model_dir), "--dataset", str(prompts), "--num_samples", "2",
                 "--max_new_tokens", "2", "--output_dir", str(out)]) == 0
    assert LS.encode() in (out / "samples.jsonl").read_bytes()
    assert [r.prompt for r in LabelStore(out / "samples.jsonl").records] == expected


# --- lone surrogates: refused when the file is loaded, not a 500 for ever ---------------------------

@pytest.mark.parametrize("record,field", [
    ({"id": "x", "prompt": "p", "completions": [{"text": "ok"}, {"text": "cut \ud83d"}]},
     "field 'completions' item 1 'text' holds a lone surrogate (\\ud83d"),
    ({"id": "x", "prompt": [{"role": "user", "content": "\udc00 hi"}], "completions": PAIR},
     "field 'prompt' message 0 'content' holds a lone surrogate (\\udc00"),
    ({"id": "x", "prompt": "p", "system": "\ud800", "completions": PAIR}, "field 'system' holds a lone surrogate"),
    ({"id": "x\ud800", "prompt": "p", "completions": PAIR}, "field 'id' holds a lone surrogate"),
    ({"prompt": "p", "chosen": "a", "rejected": [{"role": "assistant", "content": "b\ud83d"}]},
     "field 'rejected' message 0 'content' holds a lone surrogate"),
])
def test_a_lone_surrogate_is_refused_at_load_naming_file_line_and_field(tmp_path, record, field):
    first = {"id": "first", "prompt": "p", "completions": PAIR} if "completions" in record else \
        {"prompt": "q", "chosen": "a", "rejected": "b"}
    path = tmp_path / "candidates.jsonl"
    path.write_text(json.dumps(first) + "\n" + json.dumps(record) + "\n")  # json.dumps escapes it: valid JSON
    message = run_refused(["label", str(path), "--export", str(tmp_path / "pairs.jsonl")], cwd=tmp_path,
                          watch=[tmp_path], expect=[f"{path}:2: {field}", "fix or remove that character"],
                          in_process=True)
    assert "\n" not in message
    with pytest.raises(Exception, match=f"{path}:2: field"):  # the server's store: refused before it serves
        LabelStore(path, writable=True)
    assert not labels_path(path).exists()


# --- the server: Host names, body size, nosniff -------------------------------------------------------

@pytest.fixture
def server_api(tmp_path):
    from fastapi.testclient import TestClient

    from preftune.commands.label import create_app, own_names

    path = jsonl(tmp_path / "candidates.jsonl", [{"id": "r1", "prompt": "p", "completions": PAIR}])
    store = LabelStore(path, writable=True)
    client = TestClient(create_app(store, allowed_hosts=own_names("127.0.0.1")), base_url="http://127.0.0.1:8765")
    yield client, store
    store.close()


def test_foreign_host_names_are_refused_and_addresses_answered(server_api, monkeypatch):
    from preftune.commands.label import own_names

    client, _ = server_api
    for host in ("127.0.0.1:8765", "localhost:8765", "[::1]:8765", "127.0.0.1", "LOCALHOST"):
        assert client.get("/api/next", headers={"Host": host}).status_code == 200, host
    for host in ("attacker.example:8765", "attacker.example", "[::1", "", "localhost.attacker.example"):
        r = client.get("/api/next", headers={"Host": host})
        assert r.status_code == 400 and "not this server's name" in r.json()["error"], host
        assert "comparison" not in r.json()
    # every bind address has its list: on all interfaces this machine's own name, never any name
    monkeypatch.setattr(socket, "getfqdn", lambda: "Box.example.org")  # no name lookup in a test
    assert own_names("0.0.0.0") == ["localhost", socket.gethostname().lower(), "box.example.org"] == own_names("::")
    assert own_names("::1") == own_names("127.0.0.1") == ["localhost"]
    assert own_names("labels.lan")[:2] == ["localhost", "labels.lan"]


def test_a_big_body_is_refused_with_413_and_no_error_echoes_it(server_api):
    client, store = server_api
    big = {"comparison": "x" * 5_000_000, "choice": "A", "shown_as_a": 0}
    r = client.post("/api/judge", json=big)
    assert r.status_code == 413 and "request body over" in r.json()["error"] and len(r.content) < 200
    chunked = (b"x" * 1000 for _ in range(5000))  # no content-length: counted as it arrives
    r = client.post("/api/judge", content=chunked, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and len(r.content) < 200
    # under the cap, a refused value is still not repeated whole
    for body in ({"comparison": "x" * 50_000, "choice": "A", "shown_as_a": 0},
                 {"comparison": "r1#0-1", "choice": "C" * 50_000, "shown_as_a": 0}):
        r = client.post("/api/judge", json=body)
        assert r.status_code in (400, 404) and len(r.content) < 1000, r.status_code
    r = client.post("/api/judge", json=[1] * 20_000)  # FastAPI's own reply repeats the whole body
    assert r.status_code == 400 and "must be one JSON object" in r.json()["error"] and len(r.content) < 200
    assert store.progress()["labelled"] == 0 and labels_path(store.path).read_text() == ""


def test_a_lone_surrogate_in_a_judgement_is_refused_and_the_next_call_works(server_api):
    client, store = server_api
    body = b'{"comparison": "r1#0-1", "choice": "A", "shown_as_a": 0, "annotator": "ana\\ud800"}'
    as_json = {"Content-Type": "application/json"}
    r = client.post("/api/judge", content=body, headers=as_json)
    assert r.status_code == 400 and "'annotator' holds a lone surrogate" in r.json()["error"]
    r = client.post("/api/judge", content=body.replace(b"r1#0-1", b"\\udc00"), headers=as_json)
    assert r.status_code == 400 and "'comparison' holds a lone surrogate" in r.json()["error"]
    assert client.get("/api/next").status_code == 200 and labels_path(store.path).read_text() == ""


def test_every_response_is_nosniff(server_api):
    client, _ = server_api
    replies = [client.get("/"), client.get("/api/next"), client.get("/favicon.ico"), client.get("/nope"),
               client.post("/api/judge", json={"comparison": "r1#0-1", "choice": "A", "shown_as_a": 0}),
               client.post("/api/judge", json={"comparison": "r1#0-1", "choice": "A", "shown_as_a": 0}),  # 409
               client.post("/api/undo", content=b"{", headers={"Content-Type": "application/json"}),
               client.post("/api/undo", content=b"x" * 70_000), client.get("/", headers={"Host": "evil.example"})]
    assert sorted({r.status_code for r in replies}) == [200, 204, 400, 404, 409, 413]
    assert all(r.headers.get("x-content-type-options") == "nosniff" for r in replies)


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_a_server_on_ipv6_loopback_refuses_a_foreign_host(tmp_path):
    path = jsonl(tmp_path / "candidates.jsonl", [{"id": "r1", "prompt": "p", "completions": PAIR}])
    proc = subprocess.Popen([sys.executable, "-m", "preftune", "label", str(path), "--host", "::1", "--port", "0"],
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(120, proc.kill)  # a server that never prints its address must not hang the suite
    watchdog.start()
    try:
        output = []
        for line in proc.stdout:
            output.append(line)
            if line.startswith("open http://[::1]:"):
                break
        assert output and output[-1].startswith("open "), "".join(output)
        port = int(output[-1].split()[1].rsplit(":", 1)[1].strip("/"))

        def status(host: str) -> int:
            with socket.create_connection(("::1", port), timeout=60) as s:
                s.sendall(f"GET /api/next HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
                reply = b""
                while chunk := s.recv(65536):
                    reply += chunk
            assert b"x-content-type-options: nosniff" in reply.lower()
            return int(reply.split(b" ", 2)[1])

        assert status(f"attacker.example:{port}") == 400  # DNS rebinding: another site's name for ::1
        assert status(f"[::1]:{port}") == 200
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait()


# --- --export paths that are not a file --------------------------------------------------------------

def test_export_onto_a_folder_names_it_and_the_fix_and_leaves_nothing(tmp_path):
    path = jsonl(tmp_path / "candidates.jsonl", [{"id": "r1", "prompt": "p", "completions": PAIR}])
    labels_path(path).write_text("")
    folder = tmp_path / "pairs"
    folder.mkdir()
    message = run_refused(["label", str(path), "--export", str(folder)], cwd=tmp_path, watch=[tmp_path],
                          expect=[f"--export '{folder}' is a folder", f"--export '{folder / 'pairs.jsonl'}'"],
                          in_process=True)
    assert ".tmp" not in message and "permissions" not in message


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_export_is_refused_not_served(tmp_path, monkeypatch, value):
    from preftune.commands import label

    def serve(*args, **kwargs):
        raise AssertionError("served instead of exporting")

    monkeypatch.setattr(label, "serve", serve)
    path = jsonl(tmp_path / "candidates.jsonl", [{"id": "r1", "prompt": "p", "completions": PAIR}])
    run_refused(["label", str(path), "--export", value], cwd=tmp_path, watch=[tmp_path],
                expect=["--export is empty", "--export pairs.jsonl"], in_process=True)
    assert not os.path.exists(labels_path(path))

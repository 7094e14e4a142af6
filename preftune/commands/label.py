"""`preftune label`: a local web page where people label preference pairs by hand.

    preftune label candidates.jsonl --annotator ana          # serves http://127.0.0.1:8765/
    preftune label candidates.jsonl --export pairs.jsonl     # the judgements as training pairs

FILE is what `preftune sample` writes (one prompt and its completions per line) or a plain pairs
file. The page shows a prompt and two of its completions side by side, in a random order per
comparison; keys A / B / T (tie) / S (skip) / U (undo). Every judgement is appended and fsynced
to FILE.labels.jsonl before the page hears back (preftune/labels.py keeps that file; this module
is only the thin HTTP layer over it), so a restarted server resumes where it stopped. Serving
needs FastAPI and uvicorn (`pip install 'preftune[label]'`); --export does not.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import socket
import threading
from importlib import resources

from preftune.config import load_options, parse_command_line
from preftune.errors import ConfigError
from preftune.labels import AlreadyJudged, Comparison, LabelStore, NotJudged, export_pairs

log = logging.getLogger("preftune")

LABEL_INSTALL = ("preftune label needs FastAPI and uvicorn to serve its page, which are not installed: "
                 "pip install 'preftune[label]' (or: pip install fastapi uvicorn)")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def page_and_policy() -> tuple[str, str]:
    """The page, and a Content-Security-Policy that lets only its own inline script and style run:
    even a completion that slipped past the page's escaping could not execute a script."""
    page = resources.files("preftune").joinpath("label_page.html").read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.DOTALL)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)

    policy = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
              "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return page, policy


def view(c: Comparison | None) -> dict | None:
    """What the page shows of a comparison. Scores are left out: they would bias the judgement."""
    if c is None:
        return None
    r = c.record
    return {"id": c.id, "record": r.id, "prompt": r.prompt, "system": r.system,
            "a": {"index": c.shown_as_a, "text": r.completions[c.shown_as_a]},
            "b": {"index": c.shown_as_b, "text": r.completions[c.shown_as_b]}}


def create_app(store: LabelStore, annotator: str | None = None, allowed_hosts: list[str] | None = None):
    """The FastAPI app over `store`: the page and three JSON endpoints, each one call into the store.
    allowed_hosts: the Host headers served (the server's own names); a web page elsewhere that points
    its own domain at 127.0.0.1 (DNS rebinding) is then refused rather than able to read and label."""
    try:
        from fastapi import Body, FastAPI
        from fastapi.middleware.trustedhost import TrustedHostMiddleware
        from fastapi.responses import HTMLResponse, JSONResponse, Response
    except ImportError:
        raise ConfigError(LABEL_INSTALL) from None

    page, policy = page_and_policy()
    lock = threading.Lock()  # FastAPI runs plain handlers on a thread pool; the store is not thread-safe
    app = FastAPI(title="preftune label", docs_url=None, redoc_url=None, openapi_url=None)
    if allowed_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)

    def state(comparison: Comparison | None, **extra) -> dict:
        return {"file": store.path.name, "labels": str(store.labels_path), "annotator": annotator,
                "progress": store.progress(), "comparison": view(comparison), **extra}

    def field(body: dict, name: str, kinds: tuple[type, ...], required: bool = True):
        value = body.get(name)
        if value is None and not required:
            return None
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise ValueError(f"'{name}' is {value!r}; expected {' or '.join(k.__name__ for k in kinds)}")
        return value

    def unsaved(e: OSError) -> JSONResponse:
        return JSONResponse(status_code=500, content={"error": f"cannot write {store.labels_path}: {e.strerror or e}; "
                                                               "nothing was saved for this comparison"})

    def refused(status: int, message: str, client: str) -> JSONResponse:
        """The refusal and the next comparison for this client, so the page can say why and move on."""
        return JSONResponse(status_code=status, content=state(store.hand_out(client), error=message))

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": policy, "Cache-Control": "no-store"})

    @app.get("/favicon.ico")
    def favicon() -> Response:
        return Response(status_code=204)  # none: but a 404 here would be an error in the browser's console

    @app.get("/api/next")
    def next_comparison(client: str = "default") -> dict:
        with lock:
            return state(store.hand_out(client))

    def answer(body: dict, act, reply):
        """One store call for a client under the lock, its refusals as the page expects them:
        409 (already judged / nothing to undo) and 404 with the client's next comparison, 400 for a
        malformed body, 500 when the labels file cannot be written (nothing recorded)."""
        client = body.get("client") if isinstance(body.get("client"), str) else "default"
        with lock:
            try:
                return reply(act(client), client)
            except (AlreadyJudged, NotJudged) as e:
                return refused(409, str(e), client)
            except KeyError as e:
                return refused(404, e.args[0], client)
            except ValueError as e:
                return JSONResponse(status_code=400, content={"error": str(e)})
            except OSError as e:
                return unsaved(e)

    @app.post("/api/judge")
    def judge(body: dict = Body(...)):
        return answer(body, lambda client: store.judge(
            field(body, "comparison", (str,)), field(body, "choice", (str,)), field(body, "shown_as_a", (int,)),
            field(body, "annotator", (str,), False) or annotator, field(body, "seconds", (int, float), False), client),
            lambda saved, client: state(store.hand_out(client), saved=saved))

    @app.post("/api/undo")
    def undo(body: dict = Body(...)):
        return answer(body, lambda client: store.undo(field(body, "comparison", (str,), False),
                                                      field(body, "annotator", (str,), False) or annotator, client),
                      lambda comparison, client: state(comparison, undone=comparison.id))

    return app


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound here so that a taken port is one clear line (and --port 0 works)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); pass another "
                          "--port (0 picks a free one)") from None
    sock.listen(128)
    return sock


def serve(store: LabelStore, host: str, port: int, annotator: str | None) -> None:
    try:
        import uvicorn
    except ImportError:
        raise ConfigError(LABEL_INSTALL) from None
    names = {"127.0.0.1": ["127.0.0.1", "localhost"], "localhost": ["127.0.0.1", "localhost"]}
    app = create_app(store, annotator, names.get(host))
    sock = listen(host, port)
    bound = sock.getsockname()[1]
    url = f"http://{f'[{host}]' if ':' in host else host}:{bound}/"
    p = store.progress()
    if host not in LOOPBACK:
        log.warning("serving on %s: the page has no login, so anyone who can reach it can label", host)
    print(f"labelling {store.path}: {p['labelled']} of {p['total']} comparisons labelled; judgements go to "
          f"{store.labels_path}\nopen {url}  (Ctrl+C to stop)", flush=True)
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn stops gracefully, then re-raises the signal
        pass
    p = store.progress()
    print(f"stopped: {p['labelled']} of {p['total']} comparisons labelled, saved in {store.labels_path}")


def format_export(counts: dict, labels: str) -> str:
    return (f"wrote {counts['pairs']} pair{'' if counts['pairs'] == 1 else 's'} to {counts['out']} from {labels}\n"
            f"  {counts['total']} comparisons: {counts['preferred']} with a preferred completion (the pairs), "
            f"{counts['ties']} tied, {counts['skips']} skipped, {counts['unlabelled']} unlabelled "
            "(ties, skips and unlabelled comparisons give no pair)")


USAGE = """usage: preftune label FILE [--host 127.0.0.1] [--port 8765] [--annotator NAME] [--seed N] [--config FILE]
       preftune label FILE --export PAIRS

Serve a local page to label preference pairs by hand: the prompt, two of its completions side by
side (A | B, in a random order per comparison), keys A / B / T (tie) / S (skip) / U (undo).
FILE is a candidates file (`preftune sample`'s JSON Lines: {"id", "prompt", "system",
"completions": [{"text", "score"}, ...]}) or a plain pairs file ({"prompt", "chosen", "rejected"}).
Every judgement is saved at once to FILE.labels.jsonl; restarting resumes where it stopped.

  --host H          address to serve on (default 127.0.0.1: this machine only; the page has no login)
  --port N          port (default 8765; 0 picks a free one)
  --annotator NAME  the name recorded with each judgement (else typed on the page)
  --seed N          seed of the A/B order (default 0)
  --export PAIRS    do not serve: write the judgements as pairs training reads ({"prompt", "chosen",
                    "rejected", "system"}) to PAIRS, report ties, skips and unlabelled comparisons
  --config FILE     these options from a YAML file (keys dataset (FILE), host, port, annotator, seed,
                    export); the command line's win
"""

FLAGS = {"host": "127.0.0.1", "port": "8765", "annotator": None, "export": None, "seed": "0"}


def _int(flag: str, value: str, low: int, high: int, what: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = None
    if n is None or not low <= n <= high:
        raise ConfigError(f"--{flag} must be {what}, got '{value}'")
    return n


def main(args: list[str]) -> int:
    # FILE arrives as the positional (or --dataset); --config FILE holds these options only (a run's config
    # has nothing label reads), so any other key, there or as --key, is a mistake
    options = {**FLAGS, "dataset": None}
    line = parse_command_line(args, positional="dataset", flags=dict.fromkeys(options))
    flags = load_options("label", line, options)
    if not flags["dataset"]:
        raise ConfigError("preftune label: no FILE given; pass the candidates file `preftune sample` wrote "
                          "(or a pairs file)")
    path = os.path.expanduser(flags["dataset"])  # read from the command line, not through the config: ~ expanded here
    port = _int("port", flags["port"], 0, 65535, "a port number 0-65535 (0: any free port)")
    seed = _int("seed", flags["seed"], 0, 2**63, "a non-negative integer")
    if flags["export"]:
        store = LabelStore(path, seed)
        print(format_export(export_pairs(store, os.path.expanduser(flags["export"])), str(store.labels_path)))
        return 0
    store = LabelStore(path, seed, writable=True)
    try:
        serve(store, flags["host"], port, flags["annotator"])
    finally:
        store.close()
    return 0

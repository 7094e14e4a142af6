"""`preftune label`: a local web page where people label preference pairs by hand.

    preftune label candidates.jsonl --annotator ana          # serves http://127.0.0.1:8765/
    preftune label candidates.jsonl --export pairs.jsonl     # the judgements as training pairs

FILE is what `preftune sample` writes (one prompt and its completions per line) or a plain pairs
file. The page shows a prompt (its images above it) and two of its completions side by side, in a
random order per comparison; keys A / B / T (tie) / S (skip) / U (undo). Every judgement is appended
and fsynced to FILE.labels.jsonl before the page hears back (preftune/labels.py keeps that file; this
module is only the thin HTTP layer over it), so a restarted server resumes where it stopped. Serving
needs FastAPI and uvicorn (`pip install 'preftune[label]'`); --export does not.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import logging
import os
import re
import socket
import threading
from importlib import resources

from preftune.config import load_options, parse_command_line
from preftune.errors import ConfigError
from preftune.labels import AlreadyJudged, Comparison, ImageRefused, LabelStore, NotJudged, export_pairs, shown

log = logging.getLogger("preftune")

LABEL_INSTALL = ("preftune label needs FastAPI and uvicorn to serve its page, which are not installed: "
                 "pip install 'preftune[label]' (or: pip install fastapi uvicorn)")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_BODY = 64 * 1024  # bytes; a judgement is a few hundred: more is not the page talking


def host_name(header: str) -> str:
    """The name of a Host header: 'localhost:8765' -> 'localhost', '[::1]:8765' -> '::1'."""
    if header.startswith("["):
        return header[1:header.index("]")] if "]" in header else ""
    return header.rsplit(":", 1)[0].rstrip(".").lower()


def own_names(host: str) -> list[str]:
    """The host names the server answers to when bound to `host` (an IP address is always answered:
    DNS rebinding needs a domain name the attacker controls). On a loopback address only localhost;
    elsewhere also this machine's own names, by which other machines reach it."""
    names = ["localhost"]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        names += [host.lower()] if host else []
    if host not in LOOPBACK:
        names += [socket.gethostname().lower(), socket.getfqdn().lower()]
    return names


class Guard:
    """ASGI middleware around the whole app, so it covers every reply: refuses a Host header that is
    neither an IP address nor one of `allowed_hosts` (a web page elsewhere that points its own domain at
    this address, DNS rebinding, could otherwise read and label), refuses a body over MAX_BODY with 413
    before the app sees it, and marks every response nosniff (a completion is never run as a script)."""

    def __init__(self, app, allowed_hosts: list[str] | None):
        self.app, self.allowed = app, allowed_hosts

    def host_allowed(self, header: str) -> bool:
        name = host_name(header)
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return name in self.allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def nosniff(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-content-type-options", b"nosniff")]
            await send(message)

        async def refuse(status: int, error: str):
            body = json.dumps({"error": error}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]  # a body left unread: the connection is not reused
            await nosniff({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        headers = dict(scope["headers"])  # names in lower case
        host = headers.get(b"host", b"").decode("latin-1")
        if self.allowed is not None and not self.host_allowed(host):
            return await refuse(400, f"Host {shown(host)} is not this server's name; open the address "
                                     "`preftune label` printed")
        too_big = f"request body over {MAX_BODY} bytes; the page sends a few hundred"
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > MAX_BODY:
            return await refuse(413, too_big)
        chunks, size, more = [], 0, True
        while more:  # the whole body, counted (a chunked one has no content-length)
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > MAX_BODY:
                return await refuse(413, too_big)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # later: the app waits for a disconnect
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, nosniff)


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


def view(c: Comparison | None, store: LabelStore, position: dict[str, int]) -> dict | None:
    """What the page shows of a comparison. Scores are left out: they would bias the judgement. Each image
    is a URL of this server (/image/<record position>/<n>: no path from the data reaches the URL), or why
    it cannot be shown."""
    if c is None:
        return None
    r = c.record
    images = [{"url": f"/image/{position[r.id]}/{n}", "name": os.path.basename(v) or v,
               "error": store.images.problem(v)} for n, v in enumerate(r.images or [])]
    return {"id": c.id, "record": r.id, "prompt": r.prompt, "system": r.system, "images": images,
            "a": {"index": c.shown_as_a, "text": r.completions[c.shown_as_a]},
            "b": {"index": c.shown_as_b, "text": r.completions[c.shown_as_b]}}


def warn_unshown_images(store: LabelStore) -> None:
    """One warning at start for the images the page cannot show (each says why on the page too)."""
    problems = [(r.where, n, p) for r in store.records for n, v in enumerate(r.images or [])
                if (p := store.images.problem(v))]
    if problems:
        where, n, problem = problems[0]
        log.warning("%d image(s) of %s cannot be shown on the page (the first: %s image %d: %s)", len(problems),
                    store.path, where, n, problem)


def create_app(store: LabelStore, annotator: str | None = None, allowed_hosts: list[str] | None = None,
               lock: threading.Lock | None = None):
    """The FastAPI app over `store`: the page, three JSON endpoints, each one call into the store, and the
    prompts' images (/image/<record>/<n>, from the folders store.images serves only).
    allowed_hosts: the host names served besides IP addresses (own_names; None: any, for tests); a web
    page elsewhere that points its own domain at this address (DNS rebinding) is refused (Guard).
    lock: the one the handlers hold around the store (given by a caller that reads the store meanwhile)."""
    try:
        from fastapi import Body, FastAPI
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import HTMLResponse, JSONResponse, Response
    except ImportError:
        raise ConfigError(LABEL_INSTALL) from None

    page, policy = page_and_policy()
    position = {r.id: i for i, r in enumerate(store.records)}
    warn_unshown_images(store)
    lock = lock or threading.Lock()  # FastAPI runs plain handlers on a thread pool; the store is not thread-safe
    app = FastAPI(title="preftune label", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, allowed_hosts=allowed_hosts)

    @app.exception_handler(RequestValidationError)
    def malformed(request, e: RequestValidationError) -> JSONResponse:
        """FastAPI's own reply repeats the whole body; this one says what is wrong in a line."""
        first = e.errors()[0] if e.errors() else {}
        return JSONResponse(status_code=400, content={"error": f"the body must be one JSON object "
                                                               f"({first.get('msg', 'malformed')})"})

    def state(comparison: Comparison | None, **extra) -> dict:
        return {"file": store.path.name, "labels": str(store.labels_path), "annotator": annotator,
                "progress": store.progress(), "comparison": view(comparison, store, position), **extra}

    def field(body: dict, name: str, kinds: tuple[type, ...], required: bool = True):
        value = body.get(name)
        if value is None and not required:
            return None
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise ValueError(f"'{name}' is {shown(value)}; expected {' or '.join(k.__name__ for k in kinds)}")
        if isinstance(value, str):
            try:
                value.encode("utf-8")  # "\\ud800" is valid JSON, but no text to save or send back
            except UnicodeEncodeError:
                raise ValueError(f"'{name}' holds a lone surrogate ({shown(value)}), which is not text") from None
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

    @app.get("/image/{record}/{n}")
    def image(record: str, n: str) -> Response:
        """Image n of the record at that position: read, checked and typed by store.images (only from the
        folders it serves; 403, 404 or 415 with the reason otherwise). No lock: the records never change."""
        try:  # positions only: "-1" or "²" is no image, not the last one or a 500
            value = store.records[int(record)].images[int(n)] if record.isdecimal() and n.isdecimal() else None
        except (IndexError, TypeError):  # TypeError: a record without images
            value = None
        if value is None:
            return JSONResponse(status_code=404, content={"error": f"no image {shown(n, 20)} of record {shown(record, 20)}"})
        try:
            data, kind = store.images.read(value)
        except ImageRefused as e:
            return JSONResponse(status_code=e.status, content={"error": str(e)})
        return Response(data, media_type=kind, headers={"Cache-Control": "no-store"})

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
    app = create_app(store, annotator, own_names(host))
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
  --media_dir DIR   the folder relative image paths are read from, and served from besides FILE's folder
                    (default: FILE's folder only; an image elsewhere is not shown)
  --export PAIRS    do not serve: write the judgements as pairs training reads ({"prompt", "chosen",
                    "rejected", "system"}) to PAIRS, report ties, skips and unlabelled comparisons
  --config FILE     these options from a YAML file (keys dataset (FILE), host, port, annotator, seed,
                    media_dir, export); the command line's win
"""

FLAGS = {"host": "127.0.0.1", "port": "8765", "annotator": None, "export": None, "seed": "0", "media_dir": None}


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
    if flags["export"] is not None and not flags["export"].strip():  # an unset shell variable: never serve instead
        raise ConfigError("--export is empty; give the file to write the pairs to, e.g. --export pairs.jsonl")
    if flags["media_dir"] and not os.path.isdir(os.path.expanduser(flags["media_dir"])):
        raise ConfigError(f"--media_dir {flags['media_dir']}: no such folder; give the folder holding the images")
    if flags["export"] is not None:
        store = LabelStore(path, seed, media_dir=flags["media_dir"])
        print(format_export(export_pairs(store, os.path.expanduser(flags["export"])), str(store.labels_path)))
        return 0
    store = LabelStore(path, seed, writable=True, media_dir=flags["media_dir"])
    try:
        serve(store, flags["host"], port, flags["annotator"])
    finally:
        store.close()
    return 0

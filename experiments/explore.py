"""
A sense explorer in the browser: look inside a Backpack, ask it things and steer it, offline.

    python experiments/explore.py --out_dir=out-shakespeare-char             # serves http://127.0.0.1:8000
    python experiments/explore.py --init_from=backpack-small --port=8080
    python experiments/explore.py --out_dir=out-shakespeare-char --html=explorer.html \
        --words=king,love --texts="ROMEO: I love thee|To be, or not to be"   # a static snapshot, no server
    python experiments/explore.py --out_dir=out-shakespeare-char --screenshot=assets/explorer.png

Views (experiments/explore.html, plain HTML/CSS/JS that loads nothing from the network):
- Word: per sense, the tokens the LM head reads most and least from the word's sense vector, and the
  words whose same sense is nearest by cosine (sense_vector.py's helpers).
- Sentence: the text's tokens as chips; clicking one shows alpha at that position for each sense (an
  SVG grid) and the attribution of the predicted next token to (earlier token, sense) pairs, whose
  contributions sum to the logit (contextualization.py's helpers).
- Steer: scale chosen senses of chosen words, or reweight a topic's senses at strength 0-3
  (steering.py's hooks), and generate with and without the change, same seed, side by side.

The server is the standard library's: one page and a JSON API (GET /api/info, GET /api/word?w=...,
POST /api/sentence {text}, POST /api/position {text, position}, POST /api/generate {prompt, ...} which
streams newline-delimited JSON). Model work runs one request at a time (a lock), so two users never
interleave a sense hook. Every answer is JSON: 4xx for bad input, 500 (and one line on stderr) for a bug.
Any web page the user opens can send requests to a local server, so it answers only requests that name
it (the Host header: no DNS rebinding) and come from its own page (Origin, Sec-Fetch-Site); a topic is a
shipped list's name or the request's own words, never a path; bodies, texts and lists are bounded; and a
client that stops reading is dropped after --timeout seconds, which frees the lock. --html writes the same
page with the answers for --words and --texts embedded: one file that opens from disk.
"""

import contextlib
import ipaddress
import json
import os
import re
import socket
import sys
import threading
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

import tools  # first of the repo's modules: it puts the repo root on sys.path
from common import UserError, first_line
from configurator import run_cli
from contextualization import attribution_rows
from generate import generate
from sense_vector import nearest_tokens
from steering import STRENGTHS, anneal_scale, scale_hook, topic_hook, topic_multipliers, topic_scores, topic_target
from topic_control import shipped_topics, topic_words

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "explore.html")

# What one request may ask for, checked before anything is tokenised or computed.
MAX_BODY = 1 << 17  # bytes of a POST body (413 past it): room for a MAX_TEXT text, JSON-escaped
MAX_TEXT = 10_000  # characters of a text or prompt: past any block of tokens the models here read
MAX_WORD = 100  # characters of a word (the word view, a scale's word, a topic word)
MAX_SCALES = 32  # sense edits in one generate request
MAX_TOPIC_WORDS = 100  # words in a request's own topic (topic_words)
MAX_SEED = 2**32 - 1
MAX_TEMPERATURE = 10.0
TOPIC_CACHE = 8  # topics whose scores stay in memory, the least recently used dropped first
LOOPBACK = ("localhost", "127.0.0.1", "::1")


@dataclass
class ExploreConfig:
    init_from: str = "resume"  # 'resume' reads out_dir/ckpt.pt; or backpack-small, a local Hugging Face dir
    out_dir: str = "out"  # the checkpoint (init_from=resume)
    serve: bool = True  # start the local server (ignored with --html or --screenshot)
    host: str = "127.0.0.1"  # address to listen on; 0.0.0.0 exposes the explorer to your network
    port: int = 8000  # port to listen on; 0 picks a free one
    html: str = ""  # write a self-contained static snapshot of --words and --texts to this file instead
    screenshot: str = ""  # write a PNG of the page in headless Chromium (needs playwright and chromium)
    words: str = ""  # the snapshot's words, comma-separated (default: a few of the vocabulary)
    texts: str = ""  # the snapshot's texts, separated by '|'
    top: int = 8  # tokens shown per sense in the word view
    nearest: int = 6  # nearest words shown per sense
    attribution_rows: int = 12  # rows of the attribution table
    max_new_tokens: int = 200  # the most tokens a generate request may ask for
    device: str = "cpu"  # cpu, cuda, cuda:N, mps or auto
    seed: int = 1337  # the default seed of the steer view
    timeout: float = 30.0  # seconds a client may stall sending or reading before the server drops it


def shown(value) -> str:
    """A request's value in an error message, cut short: an error never echoes a huge input back."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def integer(body: dict, name: str, default: int, lo: int, hi: int) -> int:
    """body[name] (default when absent): an integer from lo to hi, else a UserError naming the field.
    JSON's true and false are no integers here, though Python's bools are."""
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise UserError(f"{name} must be an integer from {lo} to {hi}, got {shown(value)}")
    return value


def number(body: dict, name: str, default: float | None, lo: float, hi: float) -> float:
    """body[name] (default when absent): a number from lo to hi, else a UserError naming the field.
    Python's JSON parser reads NaN and Infinity; neither is between lo and hi."""
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise UserError(f"{name} must be a number from {lo:g} to {hi:g}, got {shown(value)}")
    return float(value)


class Explorer:
    """What the API answers, computed with the model's own helpers. Every method takes plain JSON
    values and returns a JSON-able dict; bad input raises UserError (a 400 for the server)."""

    def __init__(self, model, tokenizer, cfg: ExploreConfig):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.limit = tools.vocab_limit(model, tokenizer)
        self.device = model.lm_head.weight.device
        self.lock = threading.Lock()  # one request at a time touches the model (and its sense hook)
        # topic -> (V, k) scores (minutes for a 50k vocabulary), at most TOPIC_CACHE of them: a request's
        # own words make new topics, and memory must not grow with every request
        self.topic_cache: OrderedDict[str | tuple, torch.Tensor] = OrderedDict()
        self.source = tools.describe_source(cfg.init_from, cfg.out_dir)

    def info(self) -> dict:
        c = self.model.config
        return {"source": self.source, "model": "Backpack", "n_senses": c.n_senses, "vocab_size": self.limit,
                "block_size": c.block_size, "tokenizer": self.tokenizer.spec.get("kind"), "topics": shipped_topics(),
                "strengths": len(STRENGTHS)}

    def _ids(self, text: str, what: str) -> list[int]:
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"the {what} is empty; type some text")
        if len(text) > MAX_TEXT:
            raise UserError(f"the {what} has {len(text)} characters; the explorer reads at most {MAX_TEXT}, shorten it")
        return tools.text_ids(self.tokenizer, text)

    def _word(self, word, what: str, strip: bool = True) -> str:
        """A word from a request; strip=False keeps a word of spaces (a character model's ' ')."""
        if isinstance(word, str) and len(word) > MAX_WORD:
            raise UserError(f"{what} has {len(word)} characters; the explorer reads words of at most {MAX_WORD}")
        if not isinstance(word, str) or not (word.strip() if strip else word):
            raise UserError(f"{what} is empty; type a word")
        return word.strip() if strip else word

    @torch.no_grad()
    def word(self, word: str) -> dict:
        word = self._word(word, "the word")
        ids = tools.word_ids(self.tokenizer, word)
        senses = self.model.sense_vectors(torch.tensor(ids, device=self.device)).mean(0)  # (k, d)
        logits = self.model.lm_head(senses)[:, :self.limit]  # (k, V): what each sense says about the next token
        top, bottom = logits.topk(self.cfg.top, dim=-1), (-logits).topk(self.cfg.top, dim=-1)
        near_ids, near_cos = nearest_tokens(self.model, senses[None], self.limit, self.cfg.nearest, [ids], 4096)
        names = lambda row: tools.token_strings(self.tokenizer, row)  # noqa: E731
        rows = []
        for l in range(senses.size(0)):
            rows.append({"sense": l,
                         "top": [[t, v] for t, v in zip(names(top.indices[l].tolist()), top.values[l].tolist())],
                         "bottom": [[t, -v] for t, v in zip(names(bottom.indices[l].tolist()), bottom.values[l].tolist())],
                         "nearest": [[t, c] for t, c in zip(names(near_ids[0, l].tolist()), near_cos[0, l].tolist())
                                     if c > float("-inf")]})
        return {"word": word, "pieces": names(ids), "senses": rows}

    def _cut(self, text: str) -> tuple[list[int], bool]:
        ids = self._ids(text, "text")
        block = self.model.config.block_size
        return ids[:block], len(ids) > block

    @torch.no_grad()
    def sentence(self, text: str) -> dict:
        ids, truncated = self._cut(text)
        logits = self.model(torch.tensor([ids], device=self.device))[0][0, :, :self.limit]  # (T, V)
        return {"tokens": tools.token_strings(self.tokenizer, ids), "truncated": truncated,
                "predicted": tools.token_strings(self.tokenizer, logits.argmax(-1).tolist())}

    @torch.no_grad()
    def position(self, text: str, position) -> dict:
        ids, truncated = self._cut(text)
        position = integer({"position": position}, "position", None, 0, len(ids) - 1)
        idx = torch.tensor([ids[:position + 1]], device=self.device)  # later tokens change nothing here
        logits = self.model(idx)[0][0, -1]  # (V,)
        token = int(logits[:self.limit].argmax())
        alpha = self.model.contextualization(idx)[0, :, -1].float().cpu()  # (k, pos+1)
        contributions = self.model.logit_contributions(idx, token)[0].float().cpu()  # (pos+1, k)
        sense_logits = torch.einsum("tld,d->tl", self.model.senses(idx)[0], self.model.lm_head.weight[token])
        keys = tools.token_strings(self.tokenizer, ids[:position + 1])
        rows = attribution_rows(contributions, alpha, sense_logits.float().cpu(), keys, self.cfg.attribution_rows)
        return {"position": position, "keys": keys, "alpha": alpha.tolist(), "token": tools.token_strings(
                self.tokenizer, [token])[0], "logit": float(logits[token]), "total": float(contributions.sum()),
                "n_pairs": contributions.numel(), "rows": rows, "truncated": truncated}

    # ---- steering

    def _hooks(self, body: dict) -> list:
        scales, k = body.get("scales", []), self.model.config.n_senses
        if not isinstance(scales, list) or len(scales) > MAX_SCALES:
            raise UserError(f"scales must be a list of at most {MAX_SCALES} {{word, senses, factor}}, "
                            f"got {shown(scales)}")
        hooks = []
        for edit in scales:
            if not isinstance(edit, dict):
                raise UserError(f"each scale needs a word, a list of senses and a numeric factor, got {shown(edit)}")
            word, senses = self._word(edit.get("word"), "a scale's word", strip=False), edit.get("senses")
            if (not isinstance(senses, list) or not 0 < len(senses) <= k
                    or any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < k for s in senses)):
                raise UserError(f"senses must be a non-empty list of integers from 0 to {k - 1}, got {shown(senses)}")
            factor = number(edit, "factor", None, 0, 10)
            hooks.append(scale_hook(tools.word_ids(self.tokenizer, word), senses, factor))
        strength = integer(body, "strength", 0, 0, len(STRENGTHS) - 1)
        topic, words = self._topic(body)
        if words and strength > 0:  # strength 0 multiplies every sense by 1: no change, no scoring pass
            if topic not in self.topic_cache:
                pieces = [ids for w in words if (ids := self._topic_word_ids(w))]
                target = topic_target(pieces, self.model.config.vocab_size)
                self.topic_cache[topic] = topic_scores(self.model, target, self.limit, self._eot(), cache_for=self.cfg)
                while len(self.topic_cache) > TOPIC_CACHE:
                    self.topic_cache.popitem(last=False)  # the least recently used
            self.topic_cache.move_to_end(topic)
            multipliers = topic_multipliers(self.topic_cache[topic], strength, self.limit)
            hooks.append(topic_hook(multipliers, self.model.lm_head.weight, anneal_scale(strength)))
        return hooks

    def _topic(self, body: dict) -> tuple[str | tuple, list[str]]:
        """The topic to steer toward, as (its cache key, its words): the name of a shipped list (the
        .txt files of experiments/topic_classes/), or the request's own topic_words; ("", []) for none.
        A request never names a file: its value is checked against the shipped names before any read."""
        name, words = body.get("topic") or "", body.get("topic_words") or []
        if name and words:
            raise UserError("give a topic or topic_words, not both")
        if name:
            shipped = shipped_topics()
            if not isinstance(name, str) or name not in shipped:
                raise UserError(f"topic must be one of {', '.join(shipped)}, got {shown(name)}; or pass topic_words")
            return name, topic_words(name)[0]
        if not words:
            return "", []
        if (not isinstance(words, list) or len(words) > MAX_TOPIC_WORDS
                or any(not isinstance(w, str) or not w.strip() or len(w) > MAX_WORD for w in words)):
            raise UserError(f"topic_words must be a list of at most {MAX_TOPIC_WORDS} words of 1 to {MAX_WORD} "
                            f"characters, got {shown(words)}")
        words = [w.strip() for w in words]
        if not any(self._topic_word_ids(w) for w in words):
            raise UserError(f"no word of topic_words {shown(words)} is in this model's vocabulary; use other words")
        return tuple(words), words

    def _topic_word_ids(self, word: str) -> list[int]:
        try:
            return tools.word_ids(self.tokenizer, word)
        except UserError:
            return []  # a topic word this vocabulary cannot spell is left out, as in topic_control.py

    def _eot(self) -> list[int]:
        eot = self.tokenizer.eot_id
        return [eot] if eot is not None and eot < self.limit else []

    def generate(self, body: dict, emit):
        """Generate from the prompt unchanged, then steered, with the same seed; emit(dict) streams a
        line per token ({side, text}: the text so far) and a last {done}."""
        prompt = self._ids(body.get("prompt", ""), "prompt")
        n = integer(body, "max_new_tokens", min(60, self.cfg.max_new_tokens), 1, self.cfg.max_new_tokens)
        seed = integer(body, "seed", self.cfg.seed, 0, MAX_SEED)  # torch.manual_seed overflows past 64 bits
        temperature = number(body, "temperature", 0.8, 0, MAX_TEMPERATURE)
        hooks = self._hooks(body)
        prompt = prompt[-self.model.config.block_size:]

        def composed(idx, senses):
            for hook in hooks:
                senses = hook(idx, senses)
            return senses

        for side, hook in (("base", None), ("steered", composed if hooks else None)):
            new: list[int] = []

            def on_token(tokens, side=side, new=new):
                new.append(int(tokens[0]))
                emit({"side": side, "text": self.tokenizer.decode(prompt + new)})

            torch.manual_seed(seed)
            with self.model.hooked(hook):
                generate(self.model, torch.tensor([prompt], device=self.device), n, temperature=float(temperature),
                                    vocab_limit=self.limit, on_token=on_token)
        emit({"done": True, "note": "done" if hooks else "done (no change chosen: both sides are the same)"})


# -----------------------------------------------------------------------------
# the server


class Refused(Exception):
    """A request answered with an error status (its message is the answer's error); `unread` bytes
    of its body are still on the way."""

    def __init__(self, status: int, message: str, unread: int = 0):
        super().__init__(message)
        self.status, self.unread = status, unread


def report(what: str, e: BaseException):
    """A bug's one line on stderr: the terminal keeps the address, not tracebacks."""
    print(f"error: {what}: {type(e).__name__}: {first_line(e)}", file=sys.stderr)


def internal(e: BaseException) -> str:
    return f"internal error ({type(e).__name__}: {first_line(e)})"


def host_port(value: str | None) -> tuple[str, int] | None:
    """A Host header's (or an Origin's host) name and port: lowercased, an IPv6 address without its
    brackets, 80 when no port is named; None for anything but a plain host[:port]."""
    m = re.fullmatch(r"(\[[0-9a-f:.]+\]|[a-z0-9.-]+)(?::([0-9]{1,5}))?", (value or "").strip().lower())
    return (m.group(1).strip("[]"), int(m.group(2) or 80)) if m else None


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def host_allowed(value: str | None, bind: str, port: int) -> bool:
    """Whether a Host header names this server, listening on bind:port. DNS rebinding points an
    attacker's domain at 127.0.0.1: its page then reaches this port with its own scripts, but every
    request they make names that domain as Host. What passes: the bound address; for a loopback bind,
    localhost, 127.0.0.1 and [::1]; for 0.0.0.0, any IP address (a rebinding needs a name) and this
    machine's name."""
    parsed = host_port(value)
    if parsed is None or parsed[1] != port:
        return False
    name, bind = parsed[0], bind.lower()
    if bind in ("", "0.0.0.0", "::"):
        return is_ip(name) or name in (*LOOPBACK, socket.gethostname().lower())
    if bind in LOOPBACK or (is_ip(bind) and ipaddress.ip_address(bind).is_loopback):
        return name in (bind, *LOOPBACK)
    return name in (bind, socket.gethostname().lower())


def make_handler(explorer: Explorer, bind: str):
    page = open(PAGE, encoding="utf-8").read().replace("<!--SNAPSHOT-->", "")
    api = "the API is GET /api/info, GET /api/word?w=..., POST /api/sentence, /api/position and /api/generate"

    class Handler(BaseHTTPRequestHandler):
        # A client that stops sending, or stops reading a stream until the socket's buffers fill,
        # raises TimeoutError in its thread after this long: it cannot hold the model lock forever.
        timeout = explorer.cfg.timeout

        def log_message(self, fmt, *args):  # keep the terminal for the address and errors
            pass

        def _send(self, status: int, obj=None, body: bytes | None = None, kind="application/json"):
            body = body if body is not None else json.dumps(obj).encode()
            self.answered = True
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def send_error(self, code, message=None, explain=None):
            """The standard library's own refusals (a bad request line, a 414 URL, a 431 header, a 501
            method) in the JSON of every other answer, instead of its HTML page."""
            self.close_connection = True  # the rest of what was sent is unread
            self._send(code, {"error": f"{message or self.responses.get(code, ('error',))[0]}; {api}"})

        def do_GET(self):
            self._handle(self._get)

        def do_POST(self):
            self._handle(self._post)

        def _handle(self, route):
            """Answer one request in JSON whatever happens: 4xx for a bad one, 500 (and one line on
            stderr) for a bug; a client that went away or stalled gets nothing."""
            self.answered = False  # whether a status line went out
            try:
                self._check_caller()
                route(urllib.parse.urlsplit(self.path))
            except UserError as e:
                self._send(400, {"error": str(e)})
            except Refused as e:
                self._send(e.status, {"error": str(e)})
                if 0 < e.unread <= 8 * MAX_BODY:  # so that a client still sending reads this, not a reset
                    with contextlib.suppress(OSError):
                        self.rfile.read(e.unread)
            except (ConnectionError, TimeoutError):
                pass  # the client went away, or stalled for `timeout` seconds
            except Exception as e:
                report(f"{self.command} {self.path[:80]}", e)
                if not self.answered:
                    self._send(500, {"error": internal(e)})

        def _check_caller(self):
            """Only requests that name this server (Host) and come from its own page (Origin,
            Sec-Fetch-Site): any web page the user opens can send requests to a local port."""
            port, host = self.server.server_address[1], self.headers.get("Host")
            if not host_allowed(host, bind, port):
                raise Refused(403, f"the Host header {shown(host)} does not name this server (port {port}); "
                                   "open the address the explorer printed")
            origin = self.headers.get("Origin")
            if origin is not None and not (origin.startswith("http://") and host_allowed(origin[7:], bind, port)):
                raise Refused(403, f"a request from the page {shown(origin)} is refused; only the explorer's own "
                                   "page may ask")
            if self.path.startswith("/api/") and self.headers.get("Sec-Fetch-Site") in ("cross-site", "same-site"):
                raise Refused(403, "a request from another site is refused; only the explorer's own page may ask")

        def _get(self, url):
            if url.path in ("/", "/index.html"):
                self._send(200, body=page.encode(), kind="text/html; charset=utf-8")
            elif url.path == "/api/info":
                self._answer(explorer.info)
            elif url.path == "/api/word":
                self._answer(explorer.word, urllib.parse.parse_qs(url.query).get("w", [""])[0])
            else:
                raise Refused(404, f"no such page {shown(url.path)}; {api}")

        def _post(self, url):
            body = self._body()
            if url.path == "/api/sentence":
                self._answer(explorer.sentence, body.get("text", ""))
            elif url.path == "/api/position":
                self._answer(explorer.position, body.get("text", ""), body.get("position"))
            elif url.path == "/api/generate":
                self._stream(body)
            else:
                raise Refused(404, f"no such endpoint {shown(url.path)}; {api}")

        def _body(self) -> dict:
            """The POST's JSON object, read only once its length is known and at most MAX_BODY."""
            lengths = self.headers.get_all("Content-Length") or []
            if len(lengths) != 1 or not re.fullmatch(r"[0-9]{1,18}", lengths[0].strip()):
                # none (a chunked body), a negative one (read until the client closes), or several
                raise Refused(400, f"a POST needs one Content-Length header, its body's size in bytes; "
                                   f"got {shown(lengths)}")
            length = int(lengths[0])
            if length > MAX_BODY:
                raise Refused(413, f"the request body has {length} bytes; the explorer reads at most {MAX_BODY}",
                              unread=length)
            raw = self.rfile.read(length)
            if len(raw) < length:
                raise ConnectionError("the client closed the connection before its whole body came")
            try:
                body = json.loads(raw or b"{}")
            except (ValueError, RecursionError) as e:  # RecursionError: [[[[...]]]] nested past Python's stack
                raise Refused(400, f"the request body is not a JSON object ({first_line(e)})") from None
            if not isinstance(body, dict):
                raise Refused(400, "the request body is not a JSON object; send {\"field\": value, ...}")
            return body

        def _answer(self, fn, *args):
            with explorer.lock:
                answer = fn(*args)
            self._send(200, answer)

        def _stream(self, body: dict):
            """/api/generate: one JSON line per token. The 200 goes out with the first line, once the
            request proved valid; an error after that is the stream's last line."""
            def emit(obj):
                if not self.answered:
                    self.answered = True
                    self.send_response(200)
                    self.send_header("Content-Type", "application/x-ndjson")
                    self.end_headers()
                self.wfile.write(json.dumps(obj).encode() + b"\n")
                self.wfile.flush()

            with explorer.lock:  # left however generate ends: a stalled client's TimeoutError included
                try:
                    explorer.generate(body, emit)
                except Exception as e:
                    if not self.answered or isinstance(e, (ConnectionError, TimeoutError)):
                        raise  # _handle answers with a status, or drops a client that went away
                    if not isinstance(e, UserError):
                        report(f"POST {self.path[:80]}", e)
                    emit({"error": str(e) if isinstance(e, UserError) else internal(e)})
    return Handler


class Server(ThreadingHTTPServer):
    """The standard library's threaded server; an error no handler caught is one line on stderr."""

    def handle_error(self, request, client_address):
        e = sys.exc_info()[1]
        if not isinstance(e, (ConnectionError, TimeoutError)):  # a client that went away needs no line
            report(f"a request from {client_address[0]}", e)


def serve(explorer: Explorer, host: str, port: int) -> Server:
    """A started server (in a daemon thread); server.server_address has the real port."""
    try:
        server = Server((host, port), make_handler(explorer, host))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}); pass another --port, or --port=0") from None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# -----------------------------------------------------------------------------
# the static snapshot and the screenshot


def default_words(explorer: Explorer) -> list[str]:
    """A few words this vocabulary can spell."""
    for candidates in (["king", "love", "the"], ["a", "e", "t"]):
        ok = [w for w in candidates if explorer._topic_word_ids(w)]
        if ok:
            return ok
    return []


def js_json(obj) -> str:
    """JSON.stringify's spelling of obj: the page looks its answers up by it."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def snapshot(explorer: Explorer, words: list[str], texts: list[str]) -> str:
    """The page with every answer it can ask for about these words and texts embedded."""
    answers = {"/api/info": explorer.info()}
    for w in words:
        answers["/api/word?w=" + urllib.parse.quote(w, safe="!*'()")] = explorer.word(w)  # = encodeURIComponent
    for text in texts:
        answers["/api/sentence " + js_json({"text": text})] = s = explorer.sentence(text)
        for pos in range(len(s["tokens"])):
            answers["/api/position " + js_json({"text": text, "position": pos})] = explorer.position(text, pos)
    data = json.dumps({"answers": answers, "words": words, "texts": texts}, ensure_ascii=False)
    data = data.replace("</", "<\\/")  # never close the script tag early
    page = open(PAGE, encoding="utf-8").read()
    return page.replace("<!--SNAPSHOT-->", f"<script>window.SNAPSHOT = {data};</script>")


def screenshot(url: str, path: str):
    """Open the page in headless Chromium, show a word and a clicked sentence position, save a PNG."""
    from browser import launch_chromium  # the same launcher the browser tests use
    with launch_chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        page.click("nav button[data-view=sentence]")
        page.fill("#sentence-input", "ROMEO: I love thee")
        page.click("#sentence-go")
        page.locator(".chip").nth(8).click()
        page.wait_for_selector("#attribution-table")
        page.screenshot(path=path, full_page=True)


@torch.no_grad()
def main(cfg: ExploreConfig):
    if cfg.top < 1 or cfg.nearest < 1 or cfg.attribution_rows < 1 or cfg.max_new_tokens < 1:
        raise UserError("--top, --nearest, --attribution_rows and --max_new_tokens must be >= 1")
    if not 0 <= cfg.port < 65536:
        raise UserError(f"--port={cfg.port} is not a port; use 1-65535, or 0 for a free one")
    if not cfg.timeout > 0 or not 0 <= cfg.seed <= MAX_SEED:
        raise UserError(f"--timeout must be > 0 seconds and --seed an integer from 0 to {MAX_SEED}")
    model, tokenizer = tools.load_backpack(cfg.init_from, cfg.out_dir, cfg.device, "explore.py")
    explorer = Explorer(model, tokenizer, cfg)
    if cfg.html:
        words = tools.read_list(cfg.words, "words") if cfg.words else default_words(explorer)
        texts = [t for t in cfg.texts.split("|") if t.strip()]
        with open(cfg.html, "w", encoding="utf-8") as f:
            f.write(snapshot(explorer, words, texts))
        print(f"wrote {cfg.html}: {len(words)} words, {len(texts)} texts; open it in a browser, no server needed")
        return cfg.html
    server = serve(explorer, cfg.host, cfg.port)
    url = f"http://{server.server_address[0]}:{server.server_address[1]}/"
    if cfg.screenshot:
        screenshot(url, cfg.screenshot)
        server.shutdown()
        print(f"wrote {cfg.screenshot}")
        return cfg.screenshot
    print(f"serving {explorer.source} at {url} (Ctrl-C stops)")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()


if __name__ == "__main__":
    run_cli(main, ExploreConfig)

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
interleave a sense hook. Bad requests get a JSON error with a 4xx status. --html writes the same page
with the answers for --words and --texts embedded: one file that opens from disk.
"""

import json
import os
import threading
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

import tools
from common import UserError, first_line
from configurator import run_cli
from contextualization import attribution_rows
from sense_vector import nearest_tokens
from steering import STRENGTHS, anneal_scale, scale_hook, topic_hook, topic_multipliers, topic_scores, topic_target
from topic_control import TOPIC_DIR, topic_words

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "explore.html")


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


class Explorer:
    """What the API answers, computed with the model's own helpers. Every method takes plain JSON
    values and returns a JSON-able dict; bad input raises UserError (a 400 for the server)."""

    def __init__(self, model, tokenizer, cfg: ExploreConfig):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.limit = tools.vocab_limit(model, tokenizer)
        self.device = model.lm_head.weight.device
        self.lock = threading.Lock()  # one request at a time touches the model (and its sense hook)
        self.topic_cache: dict[str, torch.Tensor] = {}  # topic -> (V, k) scores: minutes for a 50k vocab
        self.source = tools.describe_source(cfg.init_from, cfg.out_dir)

    def info(self) -> dict:
        c = self.model.config
        topics = sorted(f[:-4] for f in os.listdir(TOPIC_DIR) if f.endswith(".txt"))
        return {"source": self.source, "model": "Backpack", "n_senses": c.n_senses, "vocab_size": self.limit,
                "block_size": c.block_size, "tokenizer": self.tokenizer.spec.get("kind"), "topics": topics,
                "strengths": len(STRENGTHS)}

    def _ids(self, text: str, what: str) -> list[int]:
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"the {what} is empty; type some text")
        return tools.text_ids(self.tokenizer, text)

    @torch.no_grad()
    def word(self, word: str) -> dict:
        if not isinstance(word, str) or not word.strip():
            raise UserError("the word is empty; type a word")
        ids = tools.word_ids(self.tokenizer, word.strip())
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
        if not isinstance(position, int) or not 0 <= position < len(ids):
            raise UserError(f"position must be an integer from 0 to {len(ids) - 1}, got {position!r}")
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

    def _hooks(self, scales, topic, strength) -> list:
        if not isinstance(scales, list):
            raise UserError("scales must be a list of {word, senses, factor}")
        k = self.model.config.n_senses
        hooks = []
        for edit in scales:
            try:
                word, senses, factor = edit["word"], edit["senses"], float(edit["factor"])
            except (TypeError, KeyError, ValueError):
                raise UserError("each scale needs a word, a list of senses and a numeric factor") from None
            if not isinstance(senses, list) or not senses or any(not isinstance(s, int) or not 0 <= s < k for s in senses):
                raise UserError(f"senses must be a non-empty list of integers from 0 to {k - 1}, got {senses!r}")
            if not 0 <= factor <= 10:
                raise UserError(f"a sense factor must be between 0 and 10, got {factor}")
            hooks.append(scale_hook(tools.word_ids(self.tokenizer, word), senses, factor))
        if not isinstance(strength, int) or not 0 <= strength < len(STRENGTHS):
            raise UserError(f"strength must be an integer from 0 to {len(STRENGTHS) - 1}, got {strength!r}")
        if topic:
            if topic not in self.topic_cache:
                words, _ = topic_words(topic)
                pieces = [ids for w in words if (ids := self._topic_word_ids(w))]
                target = topic_target(pieces, self.model.config.vocab_size)
                self.topic_cache[topic] = topic_scores(self.model, target, self.limit, skip_ids=self._eot())
            multipliers = topic_multipliers(self.topic_cache[topic], strength, self.limit)
            hooks.append(topic_hook(multipliers, self.model.lm_head.weight, anneal_scale(strength)))
        return hooks

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
        n = body.get("max_new_tokens", 60)
        if not isinstance(n, int) or not 1 <= n <= self.cfg.max_new_tokens:
            raise UserError(f"max_new_tokens must be an integer from 1 to {self.cfg.max_new_tokens}, got {n!r}")
        seed, temperature = body.get("seed", self.cfg.seed), body.get("temperature", 0.8)
        if not isinstance(seed, int) or not isinstance(temperature, (int, float)) or temperature < 0:
            raise UserError("seed must be an integer and temperature a number >= 0")
        hooks = self._hooks(body.get("scales", []), body.get("topic", ""), body.get("strength", 0))
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
                self.model.generate(torch.tensor([prompt], device=self.device), n, temperature=float(temperature),
                                    vocab_limit=self.limit, on_token=on_token)
        emit({"done": True, "note": "done" if hooks else "done (no change chosen: both sides are the same)"})


# -----------------------------------------------------------------------------
# the server


def make_handler(explorer: Explorer):
    page = open(PAGE, encoding="utf-8").read().replace("<!--SNAPSHOT-->", "")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *args):  # keep the terminal for the address and errors
            pass

        def _send(self, status: int, obj=None, body: bytes | None = None, kind="application/json"):
            body = body if body is not None else json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _answer(self, fn, *args):
            try:
                with explorer.lock:
                    answer = fn(*args)
            except UserError as e:
                return self._send(400, {"error": str(e)})
            except Exception as e:  # a bug: say so in JSON, never a traceback page
                print(f"error: {self.path}: {type(e).__name__}: {first_line(e)}")
                return self._send(500, {"error": f"internal error ({type(e).__name__}: {first_line(e)})"})
            self._send(200, answer)

        def do_GET(self):
            url = urllib.parse.urlparse(self.path)
            query = urllib.parse.parse_qs(url.query)
            if url.path in ("/", "/index.html"):
                self._send(200, body=page.encode(), kind="text/html; charset=utf-8")
            elif url.path == "/api/info":
                self._answer(explorer.info)
            elif url.path == "/api/word":
                self._answer(explorer.word, query.get("w", [""])[0])
            else:
                self._send(404, {"error": f"no such page {url.path}; the API is /api/info, /api/word, "
                                          "/api/sentence, /api/position and /api/generate"})

        def do_POST(self):
            try:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(body, dict):
                    raise ValueError("not an object")
            except ValueError as e:
                return self._send(400, {"error": f"the request body is not a JSON object ({first_line(e)})"})
            path = urllib.parse.urlparse(self.path).path
            if path == "/api/sentence":
                self._answer(explorer.sentence, body.get("text", ""))
            elif path == "/api/position":
                self._answer(explorer.position, body.get("text", ""), body.get("position"))
            elif path == "/api/generate":
                self._stream(body)
            else:
                self._send(404, {"error": f"no such endpoint {path}"})

        def _stream(self, body: dict):
            with explorer.lock:
                started = False

                def emit(obj):
                    nonlocal started
                    if not started:  # headers only once the request proved valid
                        self.send_response(200)
                        self.send_header("Content-Type", "application/x-ndjson")
                        self.end_headers()
                        started = True
                    self.wfile.write(json.dumps(obj).encode() + b"\n")
                    self.wfile.flush()
                try:
                    explorer.generate(body, emit)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the page went away mid-generation
                except UserError as e:
                    if started:
                        emit({"error": str(e)})
                    else:
                        self._send(400, {"error": str(e)})
    return Handler


def serve(explorer: Explorer, host: str, port: int) -> ThreadingHTTPServer:
    """A started server (in a daemon thread); server.server_address has the real port."""
    try:
        server = ThreadingHTTPServer((host, port), make_handler(explorer))
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

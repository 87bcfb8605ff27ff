"""The sense explorer (experiments/explore.py): its JSON API through urllib against a live server, the
requests a hostile page could send it through http.client and raw sockets, the static snapshot, and the
page itself in a real headless Chromium driven by Playwright."""

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import torch

from checkpoint import checkpoint_dict, save_checkpoint
from conftest import REPO, SHAKESPEARE_HEAD
from generate import generate
from model import build_model

sys.path.insert(0, os.path.join(REPO, "experiments"))
import browser  # noqa: E402
import explore  # noqa: E402
import steering  # noqa: E402
import tools  # noqa: E402
from topic_control import topic_words  # noqa: E402

TEXT = "ROMEO: I love thee"


def tiny_checkpoint(folder, model_type="backpack") -> str:
    with open(SHAKESPEARE_HEAD) as f:
        chars = sorted(set(f.read()[:20_000]))
    torch.manual_seed(0)
    kw = dict(n_senses=4) if model_type == "backpack" else {}
    model = build_model(model_type, n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=len(chars), **kw)
    with torch.no_grad():  # trained-looking weights, so that steering visibly changes the samples
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    os.makedirs(folder, exist_ok=True)
    save_checkpoint(checkpoint_dict(model, {"kind": "char", "itos": chars}), os.path.join(folder, "ckpt.pt"))
    return str(folder)


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("explore") / "out")


@pytest.fixture(scope="module")
def explorer(ckpt_dir):
    cfg = explore.ExploreConfig(out_dir=ckpt_dir, port=0, top=5, nearest=4)
    model, tokenizer = tools.load_backpack("resume", ckpt_dir, "cpu", "explore.py")
    return explore.Explorer(model, tokenizer, cfg)


@pytest.fixture(scope="module")
def url(explorer):
    server = explore.serve(explorer, "127.0.0.1", 0)
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 never goes through a proxy


def get(url: str, timeout: float = 60):
    try:
        with LOCAL.open(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def post(url: str, body, timeout: float = 60) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    return get(req, timeout)


def ids_of(explorer, text):
    return torch.tensor([tools.text_ids(explorer.tokenizer, text)])


# -----------------------------------------------------------------------------
# the API


def test_page_and_info(url, explorer):
    status, page = get(url + "/")
    assert status == 200 and b"Backpack sense explorer" in page
    assert not re.search(rb"(src|href)=\"?https?://", page)  # nothing from the network
    status, body = get(url + "/api/info")
    info = json.loads(body)
    assert status == 200 and info["n_senses"] == 4 and info["block_size"] == 64 and "sports" in info["topics"]


def test_word_matches_the_helpers(url, explorer):
    status, body = get(url + "/api/word?w=" + urllib.request.quote("king"))
    assert status == 200
    answer = json.loads(body)
    model = explorer.model
    senses = model.sense_vectors(ids_of(explorer, "king")[0]).mean(0)  # (k, d): the mean of the pieces
    logits = model.lm_head(senses)
    assert [r["sense"] for r in answer["senses"]] == [0, 1, 2, 3]
    for l, row in enumerate(answer["senses"]):
        assert [v for _, v in row["top"]] == pytest.approx(logits[l].topk(5).values.tolist(), abs=1e-5)
        assert [v for _, v in row["bottom"]] == pytest.approx((-logits[l]).topk(5).values.neg().tolist(), abs=1e-5)
        assert len(row["nearest"]) == 4
        near_tok = row["nearest"][0][0]
        cos = torch.cosine_similarity(senses[l], model.sense_vectors(ids_of(explorer, near_tok)[0])[0, l], dim=0)
        assert row["nearest"][0][1] == pytest.approx(cos.item(), abs=1e-5)
    assert answer["pieces"] == list("king")


def test_sentence_and_position_match_the_helpers(url, explorer):
    status, body = post(url + "/api/sentence", {"text": TEXT})
    sentence = json.loads(body)
    assert status == 200 and sentence["tokens"] == list(TEXT) and not sentence["truncated"]
    pos = 9
    status, body = post(url + "/api/position", {"text": TEXT, "position": pos})
    answer = json.loads(body)
    assert status == 200
    idx = ids_of(explorer, TEXT)
    alpha = explorer.model.contextualization(idx)[0, :, pos, :pos + 1]  # (k, pos+1)
    assert torch.allclose(torch.tensor(answer["alpha"]), alpha, atol=1e-6)
    logits = explorer.model(idx)[0][0, pos]
    token = int(logits.argmax())
    assert answer["token"] == explorer.tokenizer.decode([token]) == sentence["predicted"][pos]
    assert answer["logit"] == pytest.approx(logits[token].item(), abs=1e-5)
    assert answer["total"] == pytest.approx(answer["logit"], abs=1e-4)  # the contributions sum to the logit
    contributions = explorer.model.logit_contributions(idx[:, :pos + 1], token)[0]
    top = max(answer["rows"], key=lambda r: abs(r["contribution"]))
    assert top["contribution"] == pytest.approx(contributions[top["position"], top["sense"]].item(), abs=1e-5)
    assert abs(top["contribution"]) == pytest.approx(contributions.abs().max().item(), abs=1e-5)


def read_stream(url, body) -> tuple[dict, dict]:
    status, raw = post(url + "/api/generate", body)
    assert status == 200, raw
    lines = [json.loads(line) for line in raw.decode().splitlines()]
    assert lines[-1]["done"]
    final = {}
    for line in lines[:-1]:
        final[line["side"]] = line["text"]
    return final, lines[-1]


def steered_toward(explorer, words: list[str], strength: int, seed: int, n: int) -> tuple[str, torch.Tensor, object]:
    """What steering toward these words generates from TEXT, built from steering.py's helpers alone:
    (the text, the topic's tokens as a mask over the vocabulary, the hook)."""
    model, limit = explorer.model, explorer.limit
    target = steering.topic_target([tools.word_ids(explorer.tokenizer, w) for w in words], model.config.vocab_size)
    scores = steering.topic_scores(model, target, limit)
    hook = steering.topic_hook(steering.topic_multipliers(scores, strength, limit), model.lm_head.weight,
                               steering.anneal_scale(strength))
    torch.manual_seed(seed)
    with model.hooked(hook):
        out = generate(model, ids_of(explorer, TEXT), n, temperature=0.8, vocab_limit=limit)
    return explorer.tokenizer.decode(out[0].tolist()), target[:limit] > 0, hook


def assert_steered(explorer, sides: dict, words: list[str], strength=3, seed=7, n=20):
    """The steered side is the topic hook's sample, and it leaves the base side where the hook moved
    probability onto the topic's tokens: an identity hook fails both."""
    base, steered = sides["base"], sides["steered"]
    reference, topic, hook = steered_toward(explorer, words, strength, seed, n)
    assert steered == reference and steered != base
    fork = next(i for i, (a, b) in enumerate(zip(base, steered)) if a != b)
    idx = ids_of(explorer, steered[:fork])  # the text both sides share
    mass = explorer.model(idx)[0][0, -1, :explorer.limit].softmax(-1)[topic].sum()
    with explorer.model.hooked(hook):
        steered_mass = explorer.model(idx)[0][0, -1, :explorer.limit].softmax(-1)[topic].sum()
    assert steered_mass > mass


def test_generate_streams_both_sides(url, explorer):
    body = {"prompt": TEXT, "max_new_tokens": 20, "seed": 7, "temperature": 0.8,
            "scales": [{"word": c, "senses": [0, 1, 2, 3], "factor": 4.0} for c in " eo"]}
    final, _ = read_stream(url, body)
    torch.manual_seed(7)
    ref = generate(explorer.model, ids_of(explorer, TEXT), 20, temperature=0.8)
    assert final["base"] == explorer.tokenizer.decode(ref[0].tolist())  # the same numbers as generate
    assert final["steered"] != final["base"] and final["steered"].startswith(TEXT)
    same, end = read_stream(url, dict(body, scales=[]))
    assert same["base"] == same["steered"] == final["base"] and "no change" in end["note"]
    topic, _ = read_stream(url, dict(body, scales=[], topic="sports", strength=3))
    assert topic["base"] == final["base"]
    assert_steered(explorer, topic, topic_words("sports")[0])
    assert explorer.model.sense_hook is None  # restored after every request


def test_topic_words_of_the_request_and_a_bounded_cache(url, explorer):
    body = {"prompt": TEXT, "max_new_tokens": 20, "seed": 7, "temperature": 0.8, "strength": 3}
    sides, _ = read_stream(url, dict(body, topic_words=["king", "crown"]))
    assert_steered(explorer, sides, ["king", "crown"])
    explorer.topic_cache.clear()
    letters = "abcdefghijklmnop"[:explore.TOPIC_CACHE + 2]
    for c in letters:  # each new word list is a new topic: the oldest leave the cache
        read_stream(url, dict(body, max_new_tokens=1, topic_words=[c]))
    assert list(explorer.topic_cache) == [(c,) for c in letters[2:]]


NAN = b'{"prompt": "ROMEO", "temperature": NaN}'


def short_id(value):
    """A test id that fits a line: long strings (a 100k URL) are cut."""
    return f"{value[:24]!r}...{len(value)}" if isinstance(value, (str, bytes)) and len(value) > 40 else None


@pytest.mark.parametrize("path,body,message", [
    ("/api/word?w=k%C3%B6nig", None, "not in this model's"),
    ("/api/word?w=", None, "empty"),
    ("/api/word?w=" + "k" * (explore.MAX_WORD + 1), None, "the word has 101 characters"),
    ("/api/sentence", {"text": "   "}, "empty"),
    ("/api/sentence", {"text": "ROMEO: \u263a"}, "not in this model's"),
    ("/api/sentence", {"text": "a" * (explore.MAX_TEXT + 1)}, "the text has 10001 characters"),
    ("/api/sentence", b"{not json", "not a JSON object"),
    ("/api/sentence", b"[" * 100_000, "not a JSON object"),  # nested past Python's stack
    ("/api/position", {"text": TEXT, "position": 99}, "position must be"),
    ("/api/position", {"text": TEXT, "position": True}, "position must be"),
    ("/api/generate", {"prompt": TEXT, "strength": 7, "topic": "sports"}, "strength must be"),
    ("/api/generate", {"prompt": TEXT, "scales": [{"word": "e", "senses": [9], "factor": 2}]}, "senses must be"),
    ("/api/generate", {"prompt": TEXT, "scales": [{"word": "e", "senses": [0] * 5, "factor": 2}]}, "senses must be"),
    ("/api/generate", {"prompt": TEXT, "scales": [{"word": "e" * 101, "senses": [0], "factor": 2}]}, "word has 101"),
    ("/api/generate", {"prompt": TEXT, "scales": [{"word": "e", "senses": [0], "factor": 2}] * 33}, "scales must be"),
    ("/api/generate", NAN.replace(b"temperature", b"scales").replace(b"NaN", b'[{"word": "e", "senses": [0], '
                                                                          b'"factor": NaN}]'), "factor must be"),
    ("/api/generate", {"prompt": TEXT, "max_new_tokens": 10_000}, "max_new_tokens must be"),
    ("/api/generate", {"prompt": ""}, "empty"),
    ("/api/generate", {"prompt": "a" * (explore.MAX_TEXT + 1)}, "the prompt has 10001 characters"),
    ("/api/generate", {"prompt": TEXT, "seed": 2**70}, "seed must be"),
    ("/api/generate", {"prompt": TEXT, "seed": -1}, "seed must be"),
    ("/api/generate", {"prompt": TEXT, "seed": True}, "seed must be"),
    ("/api/generate", {"prompt": TEXT, "seed": 7.5}, "seed must be"),
    ("/api/generate", NAN, "temperature must be"),
    ("/api/generate", NAN.replace(b"NaN", b"Infinity"), "temperature must be"),
    ("/api/generate", NAN.replace(b"NaN", b"-Infinity"), "temperature must be"),
    ("/api/generate", NAN.replace(b"NaN", b'"hot"'), "temperature must be"),
    ("/api/generate", {"prompt": TEXT, "strength": 1, "topic": os.path.join(REPO, "experiments", "topic_classes",
                                                                            "sports.txt")}, "topic must be one of"),
    ("/api/generate", {"prompt": TEXT, "strength": 1, "topic": "../topic_classes/sports"}, "topic must be one of"),
    ("/api/generate", {"prompt": TEXT, "strength": 1, "topic": ["sports"]}, "topic must be one of"),
    ("/api/generate", {"prompt": TEXT, "strength": 1, "topic": "sports", "topic_words": ["king"]}, "not both"),
    ("/api/generate", {"prompt": TEXT, "strength": 1, "topic_words": "king"}, "topic_words must be"),
    ("/api/generate", {"prompt": TEXT, "strength": 1, "topic_words": ["k" * 101]}, "topic_words must be"),
    ("/api/generate", {"prompt": TEXT, "strength": 1, "topic_words": ["king"] * 101}, "topic_words must be"),
    ("/api/generate", {"prompt": TEXT, "strength": 1, "topic_words": ["\u263a"]}, "no word of topic_words"),
], ids=short_id)
def test_bad_requests_get_a_json_error(url, path, body, message):
    status, raw = get(url + path) if body is None else post(url + path, body)
    error = json.loads(raw)["error"]
    assert status == 400 and message in error and "\n" not in error and len(error) < 500


def test_a_bug_is_a_json_500_and_one_line_on_stderr(url, explorer, monkeypatch, capfd):
    def bug(*args):
        raise RuntimeError("a bug\nits second line")

    def bug_mid_stream(body, emit):
        emit({"side": "base", "text": "RO"})
        raise RuntimeError("a bug mid-stream")

    capfd.readouterr()
    monkeypatch.setattr(explorer, "sentence", bug)
    status, raw = post(url + "/api/sentence", {"text": TEXT})
    assert status == 500 and json.loads(raw)["error"] == "internal error (RuntimeError: a bug)"
    monkeypatch.setattr(explorer, "generate", bug)
    status, raw = post(url + "/api/generate", {"prompt": TEXT})
    assert status == 500 and json.loads(raw)["error"] == "internal error (RuntimeError: a bug)"
    monkeypatch.setattr(explorer, "generate", bug_mid_stream)
    status, raw = post(url + "/api/generate", {"prompt": TEXT})  # the 200 went out with the first line
    lines = [json.loads(line) for line in raw.decode().splitlines()]
    assert status == 200 and lines == [{"side": "base", "text": "RO"},
                                       {"error": "internal error (RuntimeError: a bug mid-stream)"}]
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("error: POST /api/") and "RuntimeError" in line for line in err)
    assert not explorer.lock.locked()


def test_unknown_path_is_404(url):
    status, raw = get(url + "/nope")
    assert status == 404 and "error" in json.loads(raw)


def test_long_text_is_cut_to_the_block(url):
    status, body = post(url + "/api/sentence", {"text": TEXT * 4})
    answer = json.loads(body)
    assert status == 200 and answer["truncated"] and len(answer["tokens"]) == 64


# -----------------------------------------------------------------------------
# requests no browser page of the explorer sends: any web page the user opens can send them


def raw(url: str, method: str, path: str, headers: dict, body: bytes = b"", timeout: float = 60):
    """One request through http.client with exactly these headers (no Host or Content-Length unless
    given): (status, JSON answer). A server that never answers fails it by timeout."""
    conn = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=timeout)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders(body or None)
        r = conn.getresponse()
        assert r.getheader("Content-Type") == "application/json"
        return r.status, json.loads(r.read())
    finally:
        conn.close()


BIG = json.dumps({"text": "a" * explore.MAX_BODY}).encode()


@pytest.mark.parametrize("method,path,headers,body,status,message", [
    ("POST", "/api/sentence", {"Content-Length": "-1"}, b'{"text": "ab"}', 400, "Content-Length"),
    ("POST", "/api/sentence", {"Content-Length": None}, b"", 400, "Content-Length"),
    ("POST", "/api/sentence", {"Content-Length": "+18"}, b'{"text": "ROMEO"}', 400, "Content-Length"),
    ("POST", "/api/sentence", {}, BIG, 413, f"at most {explore.MAX_BODY}"),
    ("POST", "/api/sentence", {"Content-Length": str(10**12)}, b"", 413, "at most"),  # and never sent
    ("PUT", "/api/sentence", {}, b'{"text": "ROMEO"}', 501, "Unsupported method ('PUT')"),
    ("DELETE", "/", {}, b"", 501, "Unsupported method ('DELETE')"),
    ("GET", "/api/word?w=" + "k" * 100_000, {}, b"", 414, "URI Too Long"),
    ("GET", "/", {"Host": "rebound.example:{port}"}, b"", 403, "Host header 'rebound.example:"),
    ("GET", "/api/info", {"Host": "127.0.0.1:{other}"}, b"", 403, "Host header"),
    ("GET", "/api/info", {"Host": "127.0.0.1"}, b"", 403, "Host header"),
    ("GET", "/api/info", {"Host": None}, b"", 403, "Host header None"),
    ("POST", "/api/sentence", {"Origin": "http://rebound.example:{port}"}, b'{"text": "ROMEO"}', 403, "refused"),
    ("POST", "/api/sentence", {"Origin": "null"}, b'{"text": "ROMEO"}', 403, "refused"),
    ("GET", "/api/word?w=king", {"Sec-Fetch-Site": "cross-site"}, b"", 403, "another site"),
], ids=short_id)
def test_hostile_requests_get_a_json_refusal(url, method, path, headers, body, status, message):
    port = int(url.rsplit(":", 1)[1])
    sent = {"Host": "127.0.0.1:{port}", "Content-Type": "application/json"}
    if method != "GET":
        sent["Content-Length"] = str(len(body))
    sent.update(headers)
    sent = {k: v.format(port=port, other=port + 1) for k, v in sent.items() if v is not None}
    got, answer = raw(url, method, path, sent, body)
    assert got == status and message in answer["error"]


@pytest.mark.parametrize("host,origin", [("localhost:{port}", "http://localhost:{port}"), ("[::1]:{port}", None),
                                         ("127.0.0.1:{port}", "http://127.0.0.1:{port}")])
def test_the_served_host_and_its_loopback_names_pass(url, host, origin):
    port = int(url.rsplit(":", 1)[1])
    headers = {"Host": host.format(port=port), "Content-Type": "application/json", "Content-Length": "17",
               "Sec-Fetch-Site": "same-origin"}
    if origin:
        headers["Origin"] = origin.format(port=port)
    status, answer = raw(url, "POST", "/api/sentence", headers, b'{"text": "ROMEO"}')
    assert status == 200 and answer["tokens"] == list("ROMEO")


def test_host_check_by_bind_address():
    allowed = explore.host_allowed
    assert allowed("localhost:8000", "127.0.0.1", 8000) and allowed("[::1]:8000", "localhost", 8000)
    assert not allowed("rebound.example:8000", "127.0.0.1", 8000) and not allowed("localhost:8001", "127.0.0.1", 8000)
    assert not allowed("user@127.0.0.1:8000", "127.0.0.1", 8000) and not allowed("", "127.0.0.1", 8000)
    assert allowed("192.168.1.5:80", "0.0.0.0", 80) and allowed("192.168.1.5", "0.0.0.0", 80)  # 80: no port named
    assert not allowed("rebound.example:80", "0.0.0.0", 80)
    assert allowed("10.0.0.2:8000", "10.0.0.2", 8000) and not allowed("localhost:8000", "10.0.0.2", 8000)


@pytest.fixture(scope="module")
def stall_url(ckpt_dir):
    """A server that drops a client stalled for a second, and streams up to 4000 tokens a side: with
    the whole text so far on every line, megabytes, more than a socket's buffers hold."""
    cfg = explore.ExploreConfig(out_dir=ckpt_dir, port=0, max_new_tokens=4000, timeout=1.0)
    model, tokenizer = tools.load_backpack("resume", ckpt_dir, "cpu", "explore.py")
    server = explore.serve(explore.Explorer(model, tokenizer, cfg), "127.0.0.1", 0)
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def stalled_client(url: str, request: bytes) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the server's writes block soon
    s.connect(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    s.settimeout(300)
    s.sendall(request)
    return s


def read_to_end(s: socket.socket) -> bytes:
    chunks = []
    while chunk := s.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_client_that_stops_reading_lets_go_of_the_model(stall_url):
    body = json.dumps({"prompt": TEXT, "max_new_tokens": 4000}).encode()
    host = stall_url.removeprefix("http://")
    s = stalled_client(stall_url, f"POST /api/generate HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                                  f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    try:
        assert s.recv(8, socket.MSG_PEEK) == b"HTTP/1.0"  # streaming: the lock is taken
        status, raw_answer = post(stall_url + "/api/sentence", {"text": TEXT}, timeout=300)  # waits for the lock
        assert status == 200 and json.loads(raw_answer)["tokens"] == list(TEXT)
        stream = read_to_end(s)
        assert stream.startswith(b"HTTP/1.0 200") and b'"done"' not in stream  # dropped mid-stream
    finally:
        s.close()


def test_a_client_that_stops_sending_is_dropped(stall_url):
    host = stall_url.removeprefix("http://")
    s = stalled_client(stall_url, f"POST /api/sentence HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                                  "Content-Length: 100\r\n\r\n{\"text\": ".encode())
    try:
        assert read_to_end(s) == b""  # closed after the server's 1 s, not kept waiting for 90 more bytes
    finally:
        s.close()


# -----------------------------------------------------------------------------
# the static snapshot and the command line


def test_static_snapshot(ckpt_dir, tmp_path):
    path = tmp_path / "snap.html"
    out = subprocess.run([sys.executable, "experiments/explore.py", f"--out_dir={ckpt_dir}", f"--html={path}",
                          "--words=king,love", f"--texts={TEXT}|To be"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    html = path.read_text()
    assert not re.search(r"https?://", html)  # one file, nothing external
    data = json.loads(re.search(r"window\.SNAPSHOT = (.*?);</script>", html, re.S).group(1).replace("<\\/", "</"))
    assert data["words"] == ["king", "love"] and data["texts"] == [TEXT, "To be"]
    assert "/api/word?w=king" in data["answers"] and '/api/position {"text":"To be","position":4}' in data["answers"]


def test_gpt_checkpoint_gets_the_sense_tools_error(tmp_path):
    gpt = tiny_checkpoint(tmp_path / "gpt", model_type="gpt")
    out = subprocess.run([sys.executable, "experiments/explore.py", f"--out_dir={gpt}", "--html=x.html"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "no sense vectors; explore.py needs a Backpack" in out.stderr and "Traceback" not in out.stderr


# -----------------------------------------------------------------------------
# the page in a real browser


@pytest.fixture(scope="module")
def chromium():
    reason = browser.missing()
    if reason:
        pytest.skip(f"browser tests need Playwright and Chromium: {reason}")
    with browser.launch_chromium() as b:
        yield b


@pytest.fixture
def page(chromium):
    """A fresh page that records every request it makes and every console error."""
    context = chromium.new_context()
    p = context.new_page()
    p.requests, p.errors = [], []
    p.on("request", lambda r: p.requests.append(r.url))
    p.on("console", lambda m: p.errors.append(m.text) if m.type == "error" else None)
    p.on("pageerror", lambda e: p.errors.append(str(e)))
    yield p
    context.close()


def assert_stayed_local(page):
    assert page.requests and all(u.startswith(("http://127.0.0.1:", "file://")) for u in page.requests), page.requests
    assert page.errors == []


def test_browser_word_view(page, url):
    page.goto(url + "/")
    page.fill("#word-input", "king")
    page.click("#word-go")
    page.wait_for_selector("#word-table")
    assert page.locator("#word-table tr.sense-row").count() == 4  # k sense rows
    assert_stayed_local(page)


def test_browser_sentence_view(page, url):
    page.goto(url + "/")
    page.click("nav button[data-view=sentence]")
    page.fill("#sentence-input", TEXT)
    page.click("#sentence-go")
    page.wait_for_selector(".chip")
    assert page.locator(".chip").count() == len(TEXT)
    page.locator(".chip").nth(9).click()
    page.wait_for_selector("#attribution-table")
    assert page.locator("#heatmap-svg rect.cell").count() == 4 * 10  # k senses x 10 earlier tokens
    page.locator("#sense-boxes input").nth(0).uncheck()
    assert page.locator("#heatmap-svg rect.cell").count() == 3 * 10
    total, logit = re.findall(r"sum to (-?[\d.]+), the logit is (-?[\d.]+)", page.inner_text("#attribution-sum"))[0]
    assert float(total) == pytest.approx(float(logit), abs=2e-3)
    assert_stayed_local(page)


def test_browser_heatmap_follows_the_token_clicked_last(page, url):
    page.goto(url + "/")
    page.click("nav button[data-view=sentence]")
    page.fill("#sentence-input", TEXT)
    page.click("#sentence-go")
    page.wait_for_selector(".chip")
    page.locator(".chip").nth(9).click()
    page.wait_for_selector("#heatmap-svg")
    page.locator(".chip").nth(3).click()
    page.wait_for_function("document.getElementById('attribution').textContent.includes('after position 3')")
    page.locator("#sense-boxes input").nth(0).uncheck()  # redraws the heatmap
    assert "alpha[sense, 3," in page.inner_text("#heatmap")
    assert page.locator("#heatmap-svg rect.cell").count() == 3 * 4  # 3 senses x the 4 tokens up to position 3
    assert_stayed_local(page)


LONG = "First Citizen: Before we proceed any further, hear me speak. All"  # 64 characters, 64 chips


def overflow(page) -> int:
    """How far the page scrolls sideways, in CSS pixels: 0 when it fits the window."""
    return page.evaluate("document.scrollingElement.scrollWidth - document.scrollingElement.clientWidth")


@pytest.mark.parametrize("width", [1280, 375])  # a laptop, a phone
def test_browser_nothing_overflows_sideways(page, url, width):
    page.set_viewport_size({"width": width, "height": 800})
    page.goto(url + "/")
    page.click("nav button[data-view=sentence]")
    page.fill("#sentence-input", LONG)
    page.click("#sentence-go")
    page.wait_for_selector(".chip")
    assert page.locator(".chip").count() == len(LONG) and overflow(page) == 0  # the chips wrap
    page.locator(".chip").nth(len(LONG) - 1).click()
    page.wait_for_selector("#attribution-table")
    assert overflow(page) == 0  # the 64-column heatmap scrolls inside its own box
    page.click("nav button[data-view=word]")
    page.fill("#word-input", "king")
    page.click("#word-go")
    page.wait_for_selector("#word-table")
    assert overflow(page) == 0
    page.click("nav button[data-view=steer]")
    page.wait_for_selector("#scale-senses input")
    assert overflow(page) == 0
    assert_stayed_local(page)


def open_steer_with_every_sense_of_e(page, url):
    """The Steer view with TEXT as its prompt, 20 tokens, and every sense of 'e' ticked in the scale row."""
    page.goto(url + "/")
    page.click("nav button[data-view=steer]")
    page.fill("#steer-prompt", TEXT)
    page.fill("#steer-tokens", "20")
    page.fill("#scale-word", "e")
    page.wait_for_selector("#scale-senses input")  # the sense boxes appear once /api/info answered
    for box in page.locator("#scale-senses input").all():
        box.check()


def test_browser_steer_applies_the_slider_without_add(page, url):
    open_steer_with_every_sense_of_e(page, url)
    page.locator("#scale-factor").fill("4")  # moved, and Add not pressed
    page.click("#steer-go")
    page.wait_for_function("document.getElementById('steer-status').textContent.startsWith('done')")
    edit = {"word": "e", "senses": [0, 1, 2, 3], "factor": 4}
    body = {"prompt": TEXT, "max_new_tokens": 20, "seed": 1337, "temperature": 0.8, "scales": [edit]}
    sides, _ = read_stream(url, body)
    assert page.text_content("#out-steered") == sides["steered"] != sides["base"] == page.text_content("#out-base")
    assert "Generate applies e: senses 0,1,2,3 \u00d7 4.0" in page.inner_text("#scale-note")  # and says so
    # Add keeps the edit and clears the row, so it applies once; a topic can be the user's own words
    page.click("#scale-add")
    assert page.input_value("#scale-word") == "" and page.locator("#edit-list li").count() == 1
    page.fill("#topic-words", "king, crown")
    page.locator("#strength").fill("3")
    page.click("#steer-go")
    page.wait_for_function("document.getElementById('steer-status').textContent.startsWith('done')")
    sides, _ = read_stream(url, dict(body, topic_words=["king", "crown"], strength=3))
    assert page.text_content("#out-steered") == sides["steered"]
    assert_stayed_local(page)


def test_browser_steer_view(page, url):
    open_steer_with_every_sense_of_e(page, url)
    page.locator("#scale-factor").fill("4")  # move the slider
    page.click("#scale-add")
    assert page.locator("#edit-list li").count() == 1
    page.click("#steer-go")
    page.wait_for_function("document.getElementById('steer-status').textContent.startsWith('done')")
    base, steered = page.inner_text("#out-base"), page.inner_text("#out-steered")
    assert base.startswith(TEXT) and steered.startswith(TEXT) and base != steered
    assert_stayed_local(page)


def test_browser_static_snapshot_from_file(page, ckpt_dir, tmp_path, explorer):
    path = tmp_path / "snap.html"
    path.write_text(explore.snapshot(explorer, ["king"], [TEXT]))
    page.goto(path.as_uri())
    page.wait_for_selector("#word-table")  # the snapshot opens on its first word
    assert page.locator("#word-table tr.sense-row").count() == 4
    page.click("nav button[data-view=sentence]")
    page.wait_for_selector(".chip")
    page.locator(".chip").nth(3).click()
    page.wait_for_selector("#attribution-table")
    assert_stayed_local(page)

"""The sense explorer (experiments/explore.py): its JSON API through urllib against a live server, the
static snapshot, and the page itself in a real headless Chromium driven by Playwright."""

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import torch

from common import checkpoint_dict, save_checkpoint
from conftest import REPO, SHAKESPEARE_HEAD
from model import build_model

sys.path.insert(0, os.path.join(REPO, "experiments"))
import browser  # noqa: E402
import explore  # noqa: E402
import tools  # noqa: E402

TEXT = "ROMEO: I love thee"


def tiny_checkpoint(folder, model_type="backpack") -> str:
    with open(SHAKESPEARE_HEAD) as f:
        chars = sorted(set(f.read()[:20_000]))
    torch.manual_seed(0)
    kw = dict(n_senses=4) if model_type == "backpack" else {}
    model = build_model(model_type, n_layer=2, n_head=2, n_embd=32, block_size=24, vocab_size=len(chars), **kw)
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


def get(url: str):
    try:
        with LOCAL.open(url, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def post(url: str, body) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    return get(req)


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
    assert status == 200 and info["n_senses"] == 4 and info["block_size"] == 24 and "sports" in info["topics"]


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


def test_generate_streams_both_sides(url, explorer):
    body = {"prompt": TEXT, "max_new_tokens": 20, "seed": 7, "temperature": 0.8,
            "scales": [{"word": c, "senses": [0, 1, 2, 3], "factor": 4.0} for c in " eo"]}
    final, _ = read_stream(url, body)
    torch.manual_seed(7)
    ref = explorer.model.generate(ids_of(explorer, TEXT), 20, temperature=0.8)
    assert final["base"] == explorer.tokenizer.decode(ref[0].tolist())  # the same numbers as generate
    assert final["steered"] != final["base"] and final["steered"].startswith(TEXT)
    same, end = read_stream(url, dict(body, scales=[]))
    assert same["base"] == same["steered"] == final["base"] and "no change" in end["note"]
    topic, _ = read_stream(url, dict(body, scales=[], topic="sports", strength=3))
    assert topic["base"] == final["base"]
    assert explorer.model.sense_hook is None  # restored after every request


@pytest.mark.parametrize("path,body,message", [
    ("/api/word?w=k%C3%B6nig", None, "not in this model's"),
    ("/api/word?w=", None, "empty"),
    ("/api/sentence", {"text": "   "}, "empty"),
    ("/api/sentence", {"text": "ROMEO: \u263a"}, "not in this model's"),
    ("/api/position", {"text": TEXT, "position": 99}, "position must be"),
    ("/api/generate", {"prompt": TEXT, "strength": 7, "topic": "sports"}, "strength must be"),
    ("/api/generate", {"prompt": TEXT, "scales": [{"word": "e", "senses": [9], "factor": 2}]}, "senses must be"),
    ("/api/generate", {"prompt": TEXT, "max_new_tokens": 10_000}, "max_new_tokens must be"),
    ("/api/generate", {"prompt": ""}, "empty"),
    ("/api/sentence", b"{not json", "not a JSON object"),
])
def test_bad_requests_get_a_json_error(url, path, body, message):
    status, raw = get(url + path) if body is None else post(url + path, body)
    assert 400 <= status < 500
    assert message in json.loads(raw)["error"]


def test_unknown_path_is_404(url):
    status, raw = get(url + "/nope")
    assert status == 404 and "error" in json.loads(raw)


def test_long_text_is_cut_to_the_block(url):
    status, body = post(url + "/api/sentence", {"text": TEXT * 3})
    answer = json.loads(body)
    assert status == 200 and answer["truncated"] and len(answer["tokens"]) == 24


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


def test_browser_steer_view(page, url):
    page.goto(url + "/")
    page.click("nav button[data-view=steer]")
    page.fill("#steer-prompt", TEXT)
    page.fill("#steer-tokens", "20")
    page.fill("#scale-word", "e")
    page.wait_for_selector("#scale-senses input")  # the sense boxes appear once /api/info answered
    for box in page.locator("#scale-senses input").all():
        box.check()
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

"""Feature cards: the streaming pass, the lens, steering, the page and its edge cases
(postdiff.outputs.features, postdiff.outputs.featurepage), and the page in a real headless Chromium."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest
import torch
from torch import nn
from transformers import Gemma3ForCausalLM
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from postdiff.method.surrogate import TopKSurrogate
from postdiff.models.generation import generate
from postdiff.models.hook import LayerEdit
from postdiff.models.loading import gemma3_text_config
from postdiff.outputs import featurepage as P
from postdiff.outputs import features as F
from postdiff.workflow.runtime import Job


def hand_surrogate(d: int = 6, n_features: int = 10, k: int = 3, silent: int = 7) -> TopKSurrogate:
    g = torch.Generator().manual_seed(0)
    module = TopKSurrogate(d, n_features, k)
    with torch.no_grad():
        module.W_enc.copy_(torch.randn(n_features, d, generator=g))
        module.W_dec.copy_(torch.randn(n_features, d, generator=g))
        module.b_enc[silent] = -1e4  # never in the TopK with z > 0
    return module


def test_streaming_pass_matches_brute_force(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(F, "ENCODE_BATCH", 7)  # several batches per chunk, ragged ends
    module = hand_surrogate()
    h = torch.randn(61, 6, generator=torch.Generator().manual_seed(1))
    chunks = [h[:20], h[20:23], h[23:]]
    cards, n_top = [0, 3, 7, 9], 4
    run = F.stream(module, chunks, cards, n_top)

    z = module.encode(h)
    assert run.n_rows == 61
    assert torch.equal(run.count, (z > 0).sum(0))
    # float64 sums of fp32 codes encoded in batches of 7 against all 61 rows at once: a code may
    # move by an ulp (4.8e-7 at size 6). Measured on totals of size <= 75: 1.6e-6 under default
    # (a third of float64's default 1e-7 + 1e-7 relative), 1.25e-6 under avx2 and avx512.
    torch.testing.assert_close(run.total, z.double().sum(0))
    for col, j in enumerate(cards):
        want = z[:, j].topk(n_top)
        fired = want.values > 0
        got = run.top_vals[:, col] > 0
        assert torch.equal(got, fired)
        # The same codes, batched as above: at most one ulp apart (measured 4.8e-7 at size 5.9),
        # within fp32's default 1.3e-6 relative + 1e-5.
        torch.testing.assert_close(run.top_vals[:, col][got], want.values[fired])
        assert run.top_rows[:, col][got].tolist() == want.indices[fired].tolist()
    assert run.count[7] == 0 and not (run.top_vals[:, 2] > 0).any()


def test_a_silent_feature_has_frequency_zero_and_no_contexts() -> None:
    module = hand_surrogate()
    h = torch.randn(12, 6, generator=torch.Generator().manual_seed(2))
    run = F.stream(module, [h], [7], 3)
    (row,) = F.activity_rows(0, [7], "selector", run)
    assert row["n_active"] == 0 and row["frequency"] == 0.0 and row["mean_active"] is None
    assert F.context_rows(0, [7], "selector", run, F.ShardIndex([], []), texts=None) == []


def test_contexts_map_rows_to_prompt_tokens() -> None:
    tok = SimpleNamespace(decode=lambda ids: "".join(f"<{i}>" for i in ids))
    texts = F.Texts({"a": "What?"}, {"a": [5, 6, 7]}, {"a": [10, 11, 12]}, tok)
    # Prefix of m = 3 tokens, answer of 3: answer positions 2, 3, 4 (SPEC §3).
    ctx = texts.context("a", 3)
    assert ctx["tokens"] == ["<7>", "<10>", "<11>"] and ctx["highlight"] == 1 and ctx["next_token"] == "<11>"
    assert texts.context("a", 2)["highlight"] == 0 and texts.context("a", 2)["next_token"] == "<10>"


def test_norm_scale_reads_gemmas_one_plus_gamma_and_llamas_weight() -> None:
    gamma = torch.linspace(-0.5, 0.5, 8)
    gemma, llama = Gemma3RMSNorm(8), LlamaRMSNorm(8)
    with torch.no_grad():
        gemma.weight.copy_(gamma)
        llama.weight.copy_(gamma + 2)
    # Read off the forward pass (divide by sqrt(1 + eps), multiply back): a few fp32 roundings,
    # inside fp32's default tolerance; measured exact under default, avx2 and avx512.
    torch.testing.assert_close(F.norm_scale(gemma, 8), 1 + gamma)
    torch.testing.assert_close(F.norm_scale(llama, 8), gamma + 2)
    with pytest.raises(ValueError, match="not an elementwise RMS norm"):
        F.norm_scale(nn.LayerNorm(8), 8)


def test_lens_on_a_hand_made_unembedding() -> None:
    unembed = torch.eye(4)  # token t reads coordinate t
    lens = F.Lens(unembed, torch.tensor([1.0, 2.0, 1.0, 0.5]))
    (top,) = lens.top(torch.tensor([[1.0, 1.0, -3.0, 4.0]]), 2)
    assert top["promoted"] == [(3, 2.0), (1, 2.0)] or top["promoted"] == [(1, 2.0), (3, 2.0)]
    assert top["suppressed"][0] == (2, -3.0)


def test_lens_of_a_gemma_model_applies_its_final_norm_scale() -> None:
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(gemma3_text_config(32, 16, 1, num_heads=2, num_kv_heads=1, sliding_window=8)).eval()
    gamma = torch.linspace(-0.9, 0.9, 16)
    with torch.no_grad():
        model.model.norm.weight.copy_(gamma)
    lens = F.Lens.of(model, 30)  # an embedding wider than the tokenizer: ids 30, 31 are no tokens
    v = torch.randn(1, 16)
    want = (v * (1 + gamma)) @ model.get_output_embeddings().weight[:30].T
    (top,) = lens.top(v, 3)
    assert [t for t, _ in top["promoted"]] == want[0].topk(3).indices.tolist()
    # The lens's scale is read off the norm's forward pass (a few fp32 roundings, as above);
    # measured exact under default, avx2 and avx512.
    torch.testing.assert_close(torch.tensor([x for _, x in top["promoted"]]), want[0].topk(3).values)


def test_steering_rows_match_plain_generation_and_a_constant_edit() -> None:
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(gemma3_text_config(64, 32, 2, num_heads=2, num_kv_heads=1, sliding_window=8)).eval()
    tok = SimpleNamespace(pad_token_id=0, eos_token_id=1)
    prefixes = [[5, 6, 7, 8], [9, 10, 11], [5, 6, 7, 8]]
    v = torch.randn(32) * 5
    factory = F.steering_factory(torch.stack([torch.zeros(32), torch.zeros(32), v]), [None, None, 1])
    got = generate(model, tok, prefixes, 6, 8, edit_factory=factory, min_new_tokens=6)
    plain = generate(model, tok, prefixes[:2], 6, 8, min_new_tokens=6)
    edited = generate(model, tok, prefixes[2:], 6, 8, edits={1: LayerEdit(1.0, lambda h: v.expand_as(h))}, min_new_tokens=6)
    assert got[:2] == plain and got[2:] == edited and got[2] != got[0]


def test_cards_are_every_masked_feature_and_the_top_scores() -> None:
    scores = pl.DataFrame({"layer": [0, 0, 1, 1], "feature": [0, 1, 0, 1], "cap_score": [3.0, 1.0, 2.0, float("nan")],
                           "verb_score": [0.0, 5.0, 1.0, 5.0], "activation_mass": [1.0, 0.5, 1.0, 2.0]})
    masks = {"CapMask": {1: [1]}, "VMask": {}, "sweep": {1: [1], 0: [0]}}
    cards = F.card_features(masks, scores, top_n=1)
    assert cards.to_dicts() == [
        {"layer": 0, "feature": 0, "reasons": ["sweep", "top cap_score"]},
        {"layer": 1, "feature": 1, "reasons": ["CapMask", "sweep", "top verb_score"]},  # the tie's larger mass
    ]
    frame = F.masks_frame(masks)
    assert frame.filter(pl.col("mask") == "VMask")["layer"].to_list() == [[]]


BYTE_TOKENS = ["Ġthe", "<0x0A>", "</td><script>alert(1)</script>", "\n", " ", "", "&amp;", "\x00"]


def test_visible_token_shows_whitespace_and_control_characters() -> None:
    assert [P.visible_token(t) for t in ["Ġthe", " a\n", "\t", "", "\x00", None]] == ["Ġthe", "␣a↵", "⇥", "∅", "\\x00", "∅"]


def hand_seed(label: str = "surrogate seed 0") -> P.SeedData:
    """A seed's data by hand: a firing card with byte-level tokens everywhere, a silent card, an empty mask."""
    cards = pl.DataFrame({"layer": [1, 1], "feature": [4, 9], "reasons": [["CapMask (locked)"], ["top verb_score"]],
                          "cap_score": [2.5, 0.1], "verb_score": [0.2, 3.0], "coef_qa": [0.3, None], "decoder_norm": [1.0, 2.0]})
    masks = F.masks_frame({"CapMask (locked)": {1: [4]}, "VMask": {}})
    activity = pl.DataFrame([
        {"layer": 1, "feature": j, "split": s, "n_positions": 50, "n_active": n, "frequency": n / 50, "mean_active": m}
        for j, n, m in ((4, 5, 1.5), (9, 0, None)) for s in P.SPLITS], schema=F.ACTIVITY_SCHEMA)
    contexts = pl.DataFrame([
        {"layer": 1, "feature": 4, "split": s, "rank": r, "id": f"p{r}", "position": 3, "activation": 2.0 - r,
         "prompt": "Say <b>hi</b> & bye", "tokens": BYTE_TOKENS, "highlight": 2, "next_token": "<0x0A>"}
        for s in P.SPLITS for r in range(2)], schema=F.CONTEXT_SCHEMA)
    lens = pl.DataFrame([
        {"layer": 1, "feature": j, "direction": d, "rank": r, "token_id": r, "token": t, "logit": 1.0 - r}
        for j in (4, 9) for d in ("promoted", "suppressed") for r, t in enumerate(BYTE_TOKENS)],
        schema={"layer": pl.Int64, "feature": pl.Int64, **F.LENS_SCHEMA})
    layer_lens = pl.DataFrame([
        {"layer": 1, "vector": v, "norm": 3.0, "direction": d, "rank": r, "token_id": r, "token": t, "logit": 0.5}
        for v in ("delta_mean", "b_dec") for d in ("promoted", "suppressed") for r, t in enumerate(BYTE_TOKENS[:3])],
        schema={"layer": pl.Int64, "vector": pl.String, "norm": pl.Float64, **F.LENS_SCHEMA})
    steering = pl.DataFrame([
        {"layer": layer, "feature": j, "id": "p0", "prompt": "Say hi", "alpha": a, "z": z, "text": t, "n_tokens": 2, "eos": True}
        for layer, j, a, z, t in ((None, None, None, None, "pt own <i>"), (1, 4, 0.5, 1.5, "steered </pre>"))],
        schema=F.STEERING_SCHEMA)
    frames = dict(cards=cards, masks=masks, activity=activity, contexts=contexts, lens=lens, layer_lens=layer_lens, steering=steering)
    return P.SeedData(label, frames)


def test_page_renders_edge_cases_escaped() -> None:
    html = P.render([hand_seed("seed 0"), hand_seed("seed 1")], steer=True)
    assert html.count('class="card"') == 4 and "seed 1" in html
    assert "<script>alert" not in html and "&lt;/td&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;0x0A&gt;" in html and "Ġthe" in html and "↵" in html and "␣" in html and "\\x00" in html
    assert "Say &lt;b&gt;hi&lt;/b&gt; &amp; bye" in html and "steered &lt;/pre&gt;" in html and "pt own &lt;i&gt;" in html
    assert "empty mask" in html
    assert "never fires" in html and "No contexts: the feature never fires on selector" in html
    assert "Not steered: the feature never fires on selector" in html
    assert "Steering is off" in P.render([hand_seed()], steer=False)
    # Only the page's own script; no link to anything outside the file.
    assert html.count("<script>") == 1 and not re.search(r"(src|href)=", html)


def test_page_stage_reads_one_file_set_per_seed(tmp_path: Path) -> None:
    data = hand_seed().frames
    inputs = {}
    for name, df in data.items():
        df.write_parquet(tmp_path / f"{name}.parquet")
        inputs[name] = [str(tmp_path / f"{name}.parquet")] * 2
    job = Job(input=inputs, output={"html": str(tmp_path / "features.html")},
              params={"labels": ["seed 0", "seed 1"], "steer": True})
    P.feature_page(job)
    assert (tmp_path / "features.html").read_text().count('class="card"') == 4
    job.params["labels"] = ["seed 0"]
    with pytest.raises(ValueError, match="1 labels"):
        P.feature_page(job)
    # Export links, one mapping per seed, as workflow/rules/features.smk passes them.
    links = [{"saelens": {1: f"seed{s}/export/saelens/L1/sae_weights.safetensors"},
              "sparsify": {1: f"seed{s}/export/sparsify"}} for s in (0, 1)]
    job.params.update(labels=["seed 0", "seed 1"], exports=links)
    P.feature_page(job)
    html = (tmp_path / "features.html").read_text()
    assert html.count('href="seed1/export/sparsify"') == 2  # both of seed 1's cards
    with pytest.raises(ValueError, match="export links for 1 seeds"):
        P.feature_page(Job(input=inputs, output=job.output, params={**job.params, "exports": links[:1]}))


def test_each_card_links_to_its_exported_files_and_feature_index() -> None:
    exports = {"saelens": {1: "seed0/export/saelens/L1/sae_weights.safetensors"},
               "sparsify": {2: "seed0/export/sparsify"}}
    seed = P.SeedData("seed 0", hand_seed().frames, exports)
    html = P.render([seed], steer=True)
    # Both hand cards are layer 1's: each links to layer 1's SAELens file, none to layer 2's sparsify one.
    assert html.count('<a href="seed0/export/saelens/L1/sae_weights.safetensors">') == 2
    assert "Exported as feature 4 of" in html and "Exported as feature 9 of" in html
    assert "export/sparsify" not in html
    assert re.findall(r'href="([^"]+)"', html) == [exports["saelens"][1]] * 2  # nothing outside the run
    with pytest.raises(ValueError, match="unknown export layouts"):
        P.read_seed("x", {}, {"dictionary_learning": {}})


# ---------------------------------------------------------------- a real browser


def chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


class DevTools:
    """Headless Chromium driven over the DevTools protocol (no driver, no browser download)."""

    def __init__(self, binary: str, profile: Path) -> None:
        import websocket

        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0",
             f"--user-data-dir={profile}", "--window-size=1200,1600", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        port = self._port()
        deadline = time.time() + 30
        while True:
            pages = [t for t in json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list")) if t["type"] == "page"]
            if pages or time.time() > deadline:
                break
            time.sleep(0.2)
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], suppress_origin=True, timeout=30)
        self.next_id, self.events = 0, []

    def _port(self) -> int:
        for line in self.proc.stderr:
            found = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            if found:
                return int(found[1])
        raise RuntimeError("chromium did not open a DevTools port")

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, method: str) -> None:
        while not any(e.get("method") == method for e in self.events):
            self.events.append(json.loads(self.ws.recv()))

    def errors(self) -> list:
        return [e for e in self.events if e.get("method") == "Runtime.exceptionThrown"
                or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] == "error")
                or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]

    def close(self) -> None:
        self.ws.close()
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def browser(tmp_path: Path):
    binary = chromium()
    try:
        import websocket  # noqa: F401
    except ImportError:
        websocket = None
    missing = "chromium (apt-get install chromium)" if binary is None else None if websocket else "websocket-client (the test extra)"
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{missing} is not installed; .ci/run installs both")
        pytest.skip(f"{missing} is not installed")
    tools = DevTools(binary, tmp_path / "profile")
    yield tools
    tools.close()


def check_in_browser(tools: DevTools, page: Path, shot: Path) -> int:
    """Load ``page``; fail on any console error; return the number of cards shown; keep a screenshot."""
    for domain in ("Runtime", "Log", "Page"):
        tools.call(f"{domain}.enable")
    tools.call("Page.navigate", url=page.resolve().as_uri())
    tools.wait_for("Page.loadEventFired")
    shown = tools.call("Runtime.evaluate", expression="document.querySelectorAll('.card').length", returnByValue=True)
    status = tools.call("Runtime.evaluate", expression="document.getElementById('shown').textContent", returnByValue=True)
    shot.write_bytes(base64.b64decode(tools.call("Page.captureScreenshot", format="png")["data"]))
    assert tools.errors() == [], tools.errors()
    assert status["result"]["value"].endswith("cards shown")
    return int(shown["result"]["value"])


def test_page_in_headless_chromium(browser: DevTools, tmp_path: Path) -> None:
    page = tmp_path / "features.html"
    page.write_text(P.render([hand_seed()], steer=True))
    assert check_in_browser(browser, page, tmp_path / "features.png") == 2
    assert (tmp_path / "features.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_the_tiny_runs_page_in_headless_chromium(browser: DevTools, tiny_run: Path, tmp_path: Path) -> None:
    page = tiny_run / "results/tiny/features.html"
    n_cards = pl.read_parquet(tiny_run / "results/tiny/seed0/features/cards.parquet").height
    assert check_in_browser(browser, page, tmp_path / "tiny_features.png") == n_cards > 0

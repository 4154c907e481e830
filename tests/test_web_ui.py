"""The web UI: file serving that refuses every way out of its folders (plain aiohttp), and the
whole UI in headless Chromium (Debian's ``chromium`` driven by Playwright) against a real platform
with a tiny llama: start a run from the form, watch the loss chart grow live, reload and see the
same curve, stop, publish a checkpoint, chat with the published model while tokens stream.
Screenshots of every view go to ``$FORGELLM_ARTIFACTS`` (default ``tests/artifacts/``)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from forgellm.gateway.errors import request_context
from forgellm.gateway.static import add_web_routes
from tests.helpers.procs import http, poll, running_platform

CHROMIUM = os.environ.get("FORGELLM_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("FORGELLM_ARTIFACTS") or Path(__file__).parent / "artifacts")

# --- serving files (no browser) -----------------------------------------------------------------


@pytest.fixture
async def files_client(tmp_path):
    published = tmp_path / "models" / "published" / "run_0000040_x"
    published.mkdir(parents=True)
    (published / "README.md").write_text("---\nbase_model: tiny\n---\n# card\n")
    (published / "training_dashboard.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    (published / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "secret.md").write_text("outside the published folder")
    (published / "leak.md").symlink_to(tmp_path / "secret.md")
    (tmp_path / "models" / "published" / ".tmp_building").mkdir()
    (tmp_path / "models" / "published" / ".tmp_building" / "README.md").write_text("half-built")
    app = web.Application(middlewares=[request_context])
    add_web_routes(app, tmp_path)
    client = TestClient(TestServer(app))
    await client.start_server()
    yield client
    await client.close()


async def test_ui_files_are_served_with_cache_headers(files_client):
    index = await files_client.get("/")
    assert index.status == 200 and "text/html" in index.headers["Content-Type"]
    assert "default-src 'self'" in index.headers["Content-Security-Policy"]
    assert index.headers["Cache-Control"] == "no-cache"
    assert '<script type="module" src="/static/app.js">' in await index.text()
    app_js = await files_client.get("/static/app.js")
    assert app_js.status == 200 and "javascript" in app_js.headers["Content-Type"]
    etag = app_js.headers["ETag"]
    again = await files_client.get("/static/app.js", headers={"If-None-Match": etag})
    assert again.status == 304
    vendor = await files_client.get("/static/vendor/socket.io.min.js")
    assert vendor.status == 200 and "max-age=86400" in vendor.headers["Cache-Control"]
    assert (await files_client.get("/static/vendor/LICENSE.uplot.txt")).status == 200
    card = await files_client.get("/api/published/run_0000040_x/README.md")
    assert card.status == 200 and card.headers["Content-Type"].startswith("text/markdown")
    assert "base_model: tiny" in await card.text()
    png = await files_client.get("/api/published/run_0000040_x/training_dashboard.png")
    assert png.status == 200 and png.headers["Content-Type"] == "image/png"


@pytest.mark.parametrize("path", [
    "/static/../../etc/passwd",
    "/static/../static.py",
    "/static/%2e%2e/%2e%2e/etc/passwd",
    "/static/..%2f..%2fetc%2fpasswd",
    "/static/vendor/..%2F..%2Fstatic.py",
    "/static/%2Fetc%2Fpasswd",
    "/static/..\\..\\etc\\passwd",
    "/static/.hidden.js",
    "/static/vendor/%00.js",
    "/api/published/../../../etc/passwd",
    "/api/published/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/api/published/run_0000040_x/../../../secret.md",
    "/api/published/run_0000040_x/leak.md",  # a symlink out of models/published
    "/api/published/.tmp_building/README.md",  # a half-built (hidden) folder
    "/api/published/run_0000040_x/model.safetensors",  # only .png and .md
    "/api/published//etc/passwd.md",
])
async def test_paths_outside_the_folders_are_refused(files_client, path):
    response = await files_client.get(URL(path, encoded=True), allow_redirects=False)
    body = await response.text()
    assert response.status in (403, 404), (path, response.status, body)
    assert "root:" not in body and "outside the published folder" not in body and "half-built" not in body
    assert '"success":false' in body


async def test_missing_files_are_404(files_client):
    assert (await files_client.get("/static/nope.js")).status == 404
    assert (await files_client.get("/api/published/run_0000040_x/nope.png")).status == 404


# --- the UI in Chromium --------------------------------------------------------------------------

playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")
needs_chromium = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM}: apt-get install chromium (scripts/bootstrap)")

RUN_FIELDS = {"max_iterations": "100000", "batch_size": "4", "max_seq_length": "64", "learning_rate": "0.002",
              "warmup_steps": "5", "steps_per_report": "10", "save_every": "200", "steps_per_eval": "200"}


@pytest.fixture(scope="module")
def ui_platform():
    from tests.helpers.tiny_lm import write_corpus, write_tiny_model

    with tempfile.TemporaryDirectory(prefix="fl-") as name:
        home = Path(name)
        write_tiny_model(home / "models" / "base" / "tiny")
        write_corpus(home / "dataset" / "grammar")
        with running_platform(home) as running:
            yield running


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield chromium
        chromium.close()


class Console:
    """Every console error, failed resource load and uncaught exception of a page."""

    def __init__(self, page) -> None:
        self.errors: list[str] = []
        self.allowed: list[str] = []
        page.on("console", lambda m: m.type in ("error", "warning") and self.errors.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))

    def unexpected(self) -> list[str]:
        return [e for e in self.errors if not any(re.search(a, e) for a in self.allowed)]


def shot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(path), full_page=True)
    return path


def points(page) -> int:
    return int(page.get_attribute("#chart-loss", "data-points") or 0)


def wait_points(page, more_than: int, timeout: float = 30) -> int:
    page.wait_for_function("n => Number(document.querySelector('#chart-loss').dataset.points || 0) > n",
                           arg=more_than, timeout=timeout * 1000)
    return points(page)


def wait_idle(platform, timeout: float = 60) -> None:
    """Until the trainer says no run is training."""
    poll(lambda: http("GET", platform.web + "/api/training/status")[1], lambda s: not s.get("is_training"),
         timeout, "the run to end", 0.2)


def stop_run(platform) -> None:
    http("POST", platform.web + "/api/training/stop")
    wait_idle(platform)


def open_train_form(platform, browser):
    """A page on the Train view with its pickers filled from the server (nothing chosen yet)."""
    page = browser.new_page(viewport={"width": 1366, "height": 900})
    console = Console(page)
    page.goto(platform.web + "/#train")
    page.wait_for_selector("#f-model_name option[value='tiny']", state="attached")
    page.wait_for_selector("#f-dataset option[value='grammar']", state="attached")
    return page, console


@needs_chromium
def test_train_watch_reload_stop_publish_chat(ui_platform, browser):
    page, console = open_train_form(ui_platform, browser)
    # The form carries the server's defaults.
    assert page.input_value("#f-lr_schedule") == "cosine" and page.input_value("#f-lora_rank") == "8"
    page.select_option("#f-model_name", "tiny")
    page.select_option("#f-dataset", "grammar")
    for name, value in RUN_FIELDS.items():
        page.fill(f"#f-{name}", value)
    page.wait_for_timeout(300)  # the lr preview redraws within 200 ms
    shot(page, "train")
    page.click("#train-start")

    # Live: the Monitor view, its chart growing from Socket.IO updates (no reload).
    page.wait_for_selector("#view-monitor:not([hidden])")
    first = wait_points(page, 2)
    grown = wait_points(page, first + 3)
    assert grown > first
    page.wait_for_function("() => document.querySelector('#mon-phase').textContent === 'training'")
    assert page.is_enabled("#mon-stop")

    # Reload mid-run: the whole curve again, then still live.
    before = wait_points(page, grown)
    page.reload()
    after = wait_points(page, before - 1)
    assert after >= before
    wait_points(page, after)
    shot(page, "monitor")
    page.set_viewport_size({"width": 420, "height": 900})
    page.wait_for_timeout(400)
    shot(page, "monitor-narrow")
    page.set_viewport_size({"width": 1366, "height": 900})

    # Stop: the run ends with a final checkpoint, shown in the table.
    page.click("#mon-stop")
    page.wait_for_function("() => document.querySelector('#mon-phase').textContent === 'stopped'", timeout=60_000)
    page.wait_for_selector("[data-testid=checkpoints] tr.best button")
    assert page.is_disabled("#mon-stop")

    # Publish the best checkpoint.
    page.click("[data-testid=checkpoints] tr.best button")
    page.wait_for_selector("[data-testid=published]", timeout=120_000)
    published = page.text_content("[data-testid=published] code")
    assert published.startswith("published/tiny_")
    page.click("[data-testid=published] button:has-text('Model card')")
    page.wait_for_selector("#viewer-body pre")
    assert "base_model" in page.text_content("#viewer-body pre")
    page.click("#viewer-close")

    # Chat with it: load, then watch tokens arrive one stream chunk after another.
    page.click("[data-testid=published] button:has-text('Chat with it')")
    page.wait_for_function("name => document.querySelector('#chat-server').textContent.includes('Loaded: ' + name)",
                           arg=published, timeout=60_000)
    page.fill("#chat-max_tokens", "120")
    page.fill("#chat-temperature", "1.0")
    page.evaluate("""() => {
        window.__lengths = [];
        new MutationObserver(() => {
            const bubbles = document.querySelectorAll('[data-testid=assistant] .text');
            if (bubbles.length) window.__lengths.push([bubbles.length, bubbles[bubbles.length - 1].textContent.length]);
        }).observe(document.querySelector('#chat-panes'), {subtree: true, childList: true, characterData: true});
    }""")
    # A briefly trained tiny model may end its answer at once (EOS first): ask again, up to 4 times.
    for attempt in range(1, 5):
        page.fill("#chat-input", "The heron crosses")
        page.press("#chat-input", "Enter")
        page.wait_for_selector(f"[data-testid=assistant] >> nth={attempt - 1}", state="attached")
        page.wait_for_function("n => document.querySelectorAll('[data-testid=assistant][data-done=true]').length >= n",
                               arg=attempt, timeout=60_000)
        answer = page.locator("[data-testid=assistant]").nth(attempt - 1)
        stats = answer.locator(".stats-line").text_content()
        assert re.search(r"\d+ tokens · [\d.]+ tok/s · first token [\d.]+ s", stats), stats
        lengths = {length for n, length in page.evaluate("window.__lengths") if n == attempt}
        if int(stats.split(" ")[0]) >= 3:
            break
    assert len(lengths - {0}) >= 2, (lengths, stats)  # the text grew in several steps: it streamed
    assert answer.locator(".text").text_content().strip()
    shot(page, "chat")
    assert not console.unexpected(), console.errors
    page.close()


@needs_chromium
def test_train_form_checks_the_world_size_and_the_monitor_shows_the_ranks(ui_platform, browser):
    page, console = open_train_form(ui_platform, browser)
    page.select_option("#f-model_name", "tiny")
    page.select_option("#f-dataset", "grammar")
    for name, value in {**RUN_FIELDS, "batch_size": "3"}.items():
        page.fill(f"#f-{name}", value)
    assert page.text_content("#world-size") == "One process."
    page.fill("#f-distributed-processes", "2")  # as you type: 3 rows do not split over 2 ranks
    page.wait_for_function("() => document.querySelector('#err-distributed-processes').textContent"
                           ".includes('does not divide by the world size 2')")
    assert page.get_attribute("#f-batch_size", "aria-invalid") == "true"
    page.click("#train-start")  # refused here, before any request
    assert page.is_visible("#view-train") and not http("GET", ui_platform.web + "/api/training/status")[1][
        "is_training"]
    page.fill("#f-batch_size", "4")
    page.wait_for_function("() => document.querySelector('#err-distributed-processes').textContent === ''")
    assert "World size 2: each rank trains on 2 of the 4 rows" in page.text_content("#world-size")
    assert page.get_attribute("#f-batch_size", "aria-invalid") is None
    shot(page, "train-distributed")
    page.click("#train-start")
    page.wait_for_selector("#view-monitor:not([hidden])")
    page.wait_for_function("() => document.querySelector('#st-ranks').textContent === '2 on 127.0.0.1'",
                           timeout=60_000)
    page.wait_for_selector("#st-hostmem-box:not([hidden])", timeout=60_000)
    assert page.text_content("#st-hostmem").startswith("127.0.0.1 ")
    shot(page, "monitor-distributed")
    stop_run(ui_platform)
    assert not console.unexpected(), console.errors
    page.close()


@needs_chromium
def test_views_errors_and_compare(ui_platform, browser):
    # A second, short run so that two runs can be compared.
    status, body, _ = http("POST", ui_platform.web + "/api/training/start", {
        "model_name": "tiny", "dataset": "grammar", "batch_size": 4, "max_seq_length": 64, "max_iterations": 30,
        "learning_rate": 0.001, "steps_per_report": 5, "save_every": 15, "steps_per_eval": 15})
    if status == 409:  # the first test's run is still stopping: wait until the trainer says it ended
        wait_idle(ui_platform)
        status, body, _ = http("POST", ui_platform.web + "/api/training/start", {
            "model_name": "tiny", "dataset": "grammar", "batch_size": 4, "max_seq_length": 64,
            "max_iterations": 30, "learning_rate": 0.001, "steps_per_report": 5, "save_every": 15,
            "steps_per_eval": 15})
    assert status == 200, body
    wait_idle(ui_platform)

    page = browser.new_page(viewport={"width": 1366, "height": 900})
    console = Console(page)

    # Train: a value the server refuses shows inline, with the error and its suggestion.
    page.goto(ui_platform.web + "/#train")
    page.wait_for_selector("#f-dataset option[value='grammar']", state="attached")
    page.select_option("#f-dataset", "grammar")
    page.fill("#f-batch_size", "0")
    console.allowed.append(r"status of 400")  # Chromium logs the refused request itself
    page.click("#train-start")
    page.wait_for_selector("#err-batch_size:not(:empty)")
    assert page.get_attribute("#f-batch_size", "aria-invalid") == "true"
    box = page.text_content("#train-error .error-box")
    assert "batch_size" in box and "Suggestion" in box and "INVALID_REQUEST" in box
    shot(page, "train-error")

    # Runs: both runs with a best validation loss; compare their curves.
    page.goto(ui_platform.web + "/#runs")
    page.wait_for_selector("[data-testid=runs] tbody tr:nth-child(2)")
    rows = page.locator("[data-testid=runs] tbody tr")
    assert rows.count() >= 2
    assert re.search(r"\d\.\d{4} @ \d+", rows.nth(0).text_content())
    page.check("[data-testid=runs] tbody tr:nth-child(1) .run-pick")
    page.check("[data-testid=runs] tbody tr:nth-child(2) .run-pick")
    page.click("#runs-compare")
    page.wait_for_function("() => Number(document.querySelector('#chart-compare').dataset.points || 0) > 2")
    assert "Dashboard" in page.text_content("[data-testid=runs]")  # the published run links its PNG
    shot(page, "runs")
    page.click("[data-testid=runs] button:has-text('Dashboard')")
    page.wait_for_function("() => document.querySelector('#viewer-body img')?.naturalWidth > 100")
    shot(page, "dashboard-png")
    page.click("#viewer-close")

    # Models: every list, the published model among them, the server's state.
    page.goto(ui_platform.web + "/#models")
    page.wait_for_selector("[data-testid^=models-published] tbody tr")
    page.wait_for_function("() => /loaded|loading/.test(document.querySelector('#server-status').textContent)")
    shot(page, "models")

    # Datasets: sizes and token estimates, and into a folder.
    page.goto(ui_platform.web + "/#datasets")
    page.wait_for_selector("[data-testid=datasets] button:has-text('grammar/')")
    assert "4,458" in page.text_content("[data-testid=datasets]") or "tokens" in page.text_content("#ds-table")
    shot(page, "datasets")
    page.click("[data-testid=datasets] button:has-text('grammar/')")
    page.wait_for_selector("[data-testid=datasets] td:has-text('doc000.txt')")

    # Monitor of a finished run, and chat side by side.
    # Side by side on one base: the base alone vs the same base + a run's adapter, answered at once
    # by the one loaded model (per-request adapters), no model load in between.
    page.goto(ui_platform.web + "/#chat")
    page.check("#chat-sbs")
    page.wait_for_selector("#chat-b:not([hidden])")
    page.wait_for_selector("#chat-adapter-b option:nth-child(2)", state="attached")
    page.select_option("#chat-model", "tiny")
    page.select_option("#chat-adapter", "")
    page.select_option("#chat-model-b", "tiny")
    run_folder = page.eval_on_selector("#chat-adapter-b option:nth-child(2)", "o => o.value")
    page.select_option("#chat-adapter-b", run_folder)
    requests: list[tuple[str, str]] = []
    page.on("request", lambda r: requests.append((r.url, r.post_data or "")) if r.method == "POST" else None)
    before = len(page.locator("[data-testid=assistant]").all())
    page.fill("#chat-input", "The heron crosses")
    page.press("#chat-input", "Enter")
    page.wait_for_function("n => document.querySelectorAll('[data-testid=assistant][data-done=true]').length >= n",
                           arg=before + 2, timeout=60_000)
    generates = [json.loads(body) for url, body in requests if url.endswith("/api/model/generate")]
    assert sorted(g.get("adapter") for g in generates) == sorted(["none", run_folder]), generates
    loads = [body for url, body in requests if url.endswith("/api/model/load")]
    assert all(json.loads(body).get("adapter_path") is None for body in loads), loads  # the base, at most once
    titles = page.locator(".pane-title").all_text_contents()
    assert sum("(per request)" in t for t in titles) == 2, titles
    stats = page.locator("[data-testid=assistant] .stats-line").all_text_contents()[-2:]
    assert any("adapter none" in s for s in stats) and any(f"adapter {run_folder}" in s for s in stats), stats
    shot(page, "chat-side-by-side")
    assert not console.unexpected(), console.errors
    page.close()


@needs_chromium
def test_gateway_restart_mid_run_reconnects_with_the_whole_curve(ui_platform, browser):
    status, body, _ = http("POST", ui_platform.web + "/api/training/start", {
        "model_name": "tiny", "dataset": "grammar", "batch_size": 4, "max_seq_length": 64, "max_iterations": 100000,
        "learning_rate": 0.002, "steps_per_report": 10, "save_every": 500, "steps_per_eval": 500})
    assert status == 200, body
    page = browser.new_page(viewport={"width": 1366, "height": 900})
    console = Console(page)
    # While the gateway is down the browser logs its refused connections; nothing else is allowed.
    console.allowed += [r"ERR_CONNECTION_REFUSED", r"WebSocket connection to .* failed", r"ERR_EMPTY_RESPONSE",
                        r"status of 50[34]"]
    try:
        page.goto(ui_platform.web + "/#monitor")
        before = wait_points(page, 3)
        os.kill(ui_platform.pid_of("gateway"), signal.SIGKILL)
        page.wait_for_function("() => document.querySelector('#live').textContent !== 'live'", timeout=10_000)
        page.wait_for_function("() => document.querySelector('#live').textContent === 'live'", timeout=30_000)
        after = wait_points(page, before + 3)  # the curve is whole and live again, without a reload
        assert after > before
        # No hole where the gateway was down: one point per report since iteration 10.
        page.wait_for_timeout(300)
        drawn = page.evaluate("() => ({...document.querySelector('#chart-loss').dataset})")
        assert int(drawn["points"]) == int(drawn["last"]) // 10, drawn
    finally:
        stop_run(ui_platform)
    page.wait_for_function("() => document.querySelector('#mon-phase').textContent === 'stopped'", timeout=30_000)
    assert not console.unexpected(), console.errors
    page.close()

@needs_chromium
def test_checkpoints_table_follows_checkpoint_events(ui_platform, browser):
    """``training.checkpoint`` reaches the page as ``training_checkpoint`` and the table grows from
    it alone: GET /api/checkpoints is held unanswered meanwhile (no polling, no re-read needed)."""
    page = browser.new_page(viewport={"width": 1366, "height": 900})
    console = Console(page)
    frames: list[str] = []
    page.on("websocket", lambda ws: ws.on("framereceived", lambda payload: frames.append(str(payload))))
    page.goto(ui_platform.web + "/#monitor")
    page.wait_for_function("() => document.querySelector('#live').textContent === 'live'")
    status, body, _ = http("POST", ui_platform.web + "/api/training/start", {
        "model_name": "tiny", "dataset": "grammar", "batch_size": 4, "max_seq_length": 64, "max_iterations": 100000,
        "learning_rate": 0.002, "steps_per_report": 10, "save_every": 20, "steps_per_eval": 20,
        "early_stopping_patience": 0})
    assert status == 200, body
    held, holding = [], [True]
    try:
        page.wait_for_function("id => document.querySelector('#mon-run').textContent.includes(id)"
                               " && document.querySelector('#mon-phase').textContent === 'training'",
                               arg=body["training_id"], timeout=30_000)
        page.route("**/api/checkpoints*", lambda route: held.append(route) if holding else route.continue_())
        before = page.locator("[data-testid=checkpoints] tbody tr").count()
        page.wait_for_function("n => document.querySelectorAll('[data-testid=checkpoints] tbody tr').length >= n",
                               arg=before + 2, timeout=60_000)
        assert any("training_checkpoint" in f for f in frames), frames[-5:]
        table = page.locator("[data-testid=checkpoints]")
        iterations = [int(i) for i in table.locator("tbody tr").evaluate_all("rs => rs.map(r => r.dataset.iteration)")]
        assert iterations == sorted(iterations) and all(i % 20 == 0 for i in iterations), iterations
        assert table.locator("tr.best").count() == 1
        ranks = table.locator("tbody tr td:nth-child(3)").all_text_contents()
        assert sorted(int(r) for r in ranks) == list(range(1, len(ranks) + 1)), ranks
        shot(page, "monitor-checkpoints-live")
        # Let the held re-read through: it fills in the sizes of those checkpoints.
        holding.clear()
        for route in held:
            route.continue_()
        page.wait_for_function("its => its.every(i => document.querySelector(`[data-testid=checkpoints] "
                               "tr[data-iteration='${i}'] td:nth-child(5)`)?.textContent !== '—')", arg=iterations)
    finally:
        stop_run(ui_platform)
    page.wait_for_function("() => document.querySelector('#mon-phase').textContent === 'stopped'", timeout=30_000)
    assert not console.unexpected(), console.errors
    page.close()


API_TOKEN = "ui-test-token-7f3a"


@pytest.fixture
def token_platform():
    """A platform that requires an API token, offline for the Hub, with a GGUF to import and a
    published model to quantize and export."""
    from forgellm.services.publishing.derive import export_gguf
    from tests.helpers.tiny_lm import write_tiny_model

    with tempfile.TemporaryDirectory(prefix="fl-") as name:
        home = Path(name)
        write_tiny_model(home / "models" / "published" / "tiny-pub")
        export_gguf(write_tiny_model(home / "scratch" / "tiny-src", seed=1), home / "incoming" / "tiny.gguf")
        with running_platform(home, FORGELLM_SECURITY_API_TOKEN=API_TOKEN, HF_HUB_OFFLINE="1",
                              HF_HUB_CACHE=str(home / "hf-cache")) as running:
            yield running


def job_result(page, result: str, timeout: float = 120) -> str:
    """Wait for the job shown in ``#result`` to end; its state ("done"/"failed") and text."""
    page.wait_for_selector(f"{result} [data-state=done], {result} [data-state=failed]", timeout=timeout * 1000)
    box = page.locator(f"{result} > *").first
    return box.get_attribute("data-state"), box.text_content()


@needs_chromium
def test_token_mode_and_model_actions(token_platform, browser):
    web = token_platform.web
    page = browser.new_page(viewport={"width": 1366, "height": 900})
    console = Console(page)
    console.allowed.append(r"status of 401")  # before the token is given, Chromium logs the refused calls
    page.goto(web + "/#models")

    # No token yet: the page asks for one (focused) before it starts any view or the Socket.IO
    # connection, so exactly one request was refused.
    page.wait_for_selector("#token-form:not([hidden])")
    assert page.evaluate("document.activeElement.id") == "token-input"
    assert page.text_content("#live") == "needs token" and page.is_hidden("#view-models")
    assert len([e for e in console.errors if "401" in e]) == 1, console.errors
    shot(page, "token-prompt")

    # A wrong token (keyboard only): refused again, and the page says so.
    page.keyboard.type("not-the-token")
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.querySelector('#token-why').textContent.includes('refused')")
    assert page.evaluate("sessionStorage.getItem('forgellm-api-token')") == "not-the-token"

    # The right one: every view works, REST with the header and Socket.IO with auth.
    page.fill("#token-input", API_TOKEN)
    page.press("#token-input", "Enter")
    page.wait_for_selector("[data-testid^=models-published] tbody tr")
    page.wait_for_function("() => document.querySelector('#live').textContent === 'live'")
    assert page.is_hidden("#token-form") and page.is_visible("#token-forget")
    assert not page.text_content("#models-error").strip()
    assert not console.unexpected(), console.errors
    console.errors.clear()
    console.allowed = [r"status of 40[03]", r"status of 503"]  # the refusals this test asks for
    page.evaluate("""() => {
        window.__running = [];
        new MutationObserver(() => document.querySelectorAll('.job[data-state=running] progress').forEach((p) => {
            const what = p.getAttribute('aria-label');
            if (!window.__running.includes(what)) window.__running.push(what);
        })).observe(document.querySelector('#view-models'), {subtree: true, childList: true});
    }""")

    # Import the GGUF, by keyboard: fill, Tab, type, Enter. The base list refreshes by itself.
    page.focus("#gguf-path")
    page.keyboard.type("incoming/tiny.gguf")
    page.keyboard.press("Tab")
    page.keyboard.type("tiny-imported")
    page.keyboard.press("Enter")
    state, text = job_result(page, "#gguf-result")
    assert state == "done" and "tiny-imported" in text, text
    assert "Importing the GGUF" in page.evaluate("window.__running")
    page.wait_for_selector("[data-testid^=models-load-base] td:has-text('tiny-imported')")
    # Again: refused (no silent overwrite), the server's error and suggestion, the field marked.
    page.press("#gguf-name", "Enter")
    state, text = job_result(page, "#gguf-result")
    assert state == "failed" and "already exists" in text and "Suggestion: Choose another name" in text, text
    assert page.get_attribute("#gguf-name", "aria-invalid") == "true"
    assert page.evaluate("document.activeElement.id") == "gguf-name"

    # Pull from the Hub, offline: the 503 and its suggestion.
    page.fill("#pull-repo", "mlx-community/SmolLM2-135M")
    page.press("#pull-repo", "Enter")
    state, text = job_result(page, "#pull-result")
    assert state == "failed" and "OFFLINE" in text and "HTTP 503" in text and "Suggestion:" in text, text
    assert "fetch-demo" in text

    # Quantize the published model (the server's choices and defaults), then export it to GGUF.
    page.click("[data-testid^=models-published] button:has-text('Quantize / export')")
    assert page.evaluate("document.activeElement.id") == "derive-model"
    assert page.input_value("#derive-model") == "published/tiny-pub"
    assert page.input_value("#derive-bits") == "4" and page.input_value("#derive-group") == "64"
    assert page.locator("#derive-group option").all_text_contents() == ["32", "64", "128"]
    page.click("#derive-quantize")
    state, text = job_result(page, "#derive-result")
    assert state == "done" and "published/tiny-pub_q4g64" in text, text
    page.wait_for_selector("[data-testid^=models-published] td:has-text('tiny-pub_q4g64')")
    page.select_option("#derive-model", "published/tiny-pub")
    page.click("#derive-export")
    state, text = job_result(page, "#derive-result")
    assert state == "done" and "tiny-pub-f16.gguf" in text, text
    assert (token_platform.home / "models" / "published" / "tiny-pub" / "tiny-pub-f16.gguf").is_file()
    page.select_option("#derive-model", "published/tiny-pub")
    page.click("#derive-quantize")  # the same again: the server says it exists
    state, text = job_result(page, "#derive-result")
    assert state == "failed" and "Already quantized" in text, text
    running = set(page.evaluate("window.__running"))
    assert {"Quantizing published/tiny-pub", "Exporting published/tiny-pub to GGUF"} <= running, running

    # The demo model, where its wheel is already in the cache (no network in tests).
    from forgellm.services.modelio.demo import DEMO_NAME, WHEEL_FILENAME, cache_dir

    if (cache_dir() / WHEEL_FILENAME).is_file():
        page.click("#fetch-demo")
        state, text = job_result(page, "#demo-result", timeout=240)
        assert state == "done" and DEMO_NAME in text, text
        page.wait_for_selector(f"[data-testid^=models-load-base] td:has-text('{DEMO_NAME}')")
    shot(page, "models-actions")
    page.set_viewport_size({"width": 420, "height": 900})
    page.wait_for_timeout(200)
    shot(page, "models-narrow")
    assert not console.unexpected(), console.errors
    page.close()


def test_artifacts_folder_is_ignored_by_git():
    root = Path(__file__).parent.parent
    if shutil.which("git") and (root / ".git").exists():
        assert "tests/artifacts/" in (root / ".gitignore").read_text()

"""The playground page in a real browser (headless Chromium via Playwright) against the real server on a tiny model.

Needs Debian's chromium (``scripts/install_browser.sh``); Playwright drives that system browser, it downloads none.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest
from httpx_sse import connect_sse

from tests.server import ServerProcess
from tests.tiny import save_tiny_lm, tiny_lm

BROWSER_ARGS = ["--no-sandbox", "--disable-dev-shm-usage", "--disable-background-networking", "--disable-component-update", "--no-first-run"]
RUN = {"chains": 3, "steps": 4, "max_tokens": 6, "seed": 3, "alpha": 8.0, "keywords": ["sun", "moon"]}
PROMPT = "tell me about the sun"


def find_chromium() -> str | None:
    for candidate in (os.environ.get("CHROMIUM_PATH"), "/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@pytest.fixture(scope="module")
def browser():
    executable = find_chromium()
    if executable is None:
        pytest.skip("no Chromium found (install it with scripts/install_browser.sh)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=BROWSER_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    return save_tiny_lm(tiny_lm(), tmp_path_factory.mktemp("model") / "tiny-llama")


def start_server(model_folder: Path, tmp_path_factory, **settings) -> ServerProcess:
    proc = ServerProcess(str(model_folder), tmp_path_factory.mktemp("logs") / "server.log", **settings)
    proc.wait_ready()
    return proc


@pytest.fixture(scope="module")
def server(model_folder, tmp_path_factory):
    proc = start_server(model_folder, tmp_path_factory)
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def locked_server(model_folder, tmp_path_factory):
    proc = start_server(model_folder, tmp_path_factory, api_keys="secret")
    yield proc
    assert proc.stop() == 0


class PageLog:
    """Console errors, uncaught exceptions and every URL the page requested."""

    def __init__(self, page):
        self.errors: list[str] = []
        self.requests: list[str] = []
        page.on("console", lambda message: self.errors.append(f"console: {message.text}") if message.type == "error" else None)
        page.on("pageerror", lambda error: self.errors.append(f"pageerror: {error}"))
        page.on("request", lambda request: self.requests.append(request.url))


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.log = PageLog(page)
    yield page
    context.close()


def fill_form(page, chains: int, steps: int, max_tokens: int, seed: int, alpha: float, keywords: list[str]) -> None:
    page.fill("#prompt", PROMPT)
    page.fill("#chains", str(chains))
    page.fill("#steps", str(steps))
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#seed", str(seed))
    page.fill("#alpha", str(alpha))
    page.fill("#keywords", ", ".join(keywords))


def run_and_wait(page, timeout_ms: int = 60_000) -> str:
    page.click("#run")
    # A selector, not wait_for_function: the page's Content-Security-Policy forbids evaluating strings.
    finished = ", ".join(f"body[data-run-state={state}]" for state in ("done", "failed", "cancelled"))
    page.wait_for_selector(finished, state="attached", timeout=timeout_ms)
    return page.get_attribute("body", "data-run-state")


def align_request(run: dict) -> dict:
    body = {key: value for key, value in run.items() if key != "keywords"}
    return {"prompt": PROMPT, "method": "sea", "temperature": 1, "reward": {"keywords": run["keywords"]}, **body}


def test_page_and_assets_load_without_console_errors(page, server):
    for path in ("/", "/playground"):
        response = page.goto(server.url + path)
        assert response.status == 200 and "text/html" in response.headers["content-type"]
        assert "default-src 'none'" in response.headers["content-security-policy"]
        page.wait_for_selector("#server-status.pill-ok")
        assert page.title() == "sea-serve playground"
        assert "tiny-llama" in page.inner_text("#server-status")
        assert page.is_visible("#run") and page.is_visible("#prompt") and page.is_visible("#api-key")
        # Both charts start empty, with a placeholder.
        assert page.locator("#chart-energy polyline").count() == 0
    assert page.log.errors == []
    assert all(url.startswith((server.url, "data:")) for url in page.log.requests), page.log.requests
    schema = httpx.get(server.url + "/openapi.json").json()
    assert not {"/", "/playground"} & set(schema["paths"])
    assert httpx.head(server.url + "/").status_code == 200  # was 405
    script = httpx.get(server.url + "/static/playground.js")
    assert script.status_code == 200
    # Revalidated on each load like the page, so that an upgrade never runs old scripts with the new page.
    assert script.headers["cache-control"] == "no-cache" and script.headers["etag"]
    again = httpx.get(server.url + "/static/playground.js", headers={"If-None-Match": script.headers["etag"]})
    assert again.status_code == 304 and again.headers["cache-control"] == "no-cache"
    # the page is also /static/index.html: there too it may not be framed or run scripts from elsewhere (security review)
    copy = httpx.get(server.url + "/static/index.html")
    assert "frame-ancestors 'none'" in copy.headers["content-security-policy"] and copy.headers["x-content-type-options"] == "nosniff"
    assert script.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("path, rendered", [("/docs", ".opblock"), ("/redoc", "[data-section-id]")])
def test_interactive_docs_render_from_this_server_alone(page, locked_server, path, rendered):
    # Everything they run comes from the server (it often runs without internet access: so does this test, and the
    # page still has to render); no API key is needed to read them. ReDoc's footer logo alone is an external image.
    loads = []
    page.on("request", lambda request: loads.append((request.resource_type, request.url)))
    page.goto(locked_server.url + path)
    page.wait_for_selector(rendered, timeout=30_000)
    assert "/align" in page.inner_text("body")
    code = [url for kind, url in loads if kind in ("document", "script", "stylesheet", "fetch", "xhr", "font")]
    assert code and all(url.startswith((locked_server.url, "blob:")) for url in code), loads
    headers = httpx.get(locked_server.url + path).headers  # same origin as the playground: no framing, no sniffing
    assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"
    assert "frame-ancestors 'none'" in headers["content-security-policy"]


def test_run_draws_a_line_per_chain_and_shows_the_aligned_and_reference_texts(page, server):
    request = align_request(RUN)
    aligned = httpx.post(server.url + "/align", json=request, timeout=60).json()  # same seed, same output as the page's job
    steps_run = aligned["timings"]["steps"]
    assert steps_run >= 1

    page.goto(server.url + "/playground")
    fill_form(page, **RUN)
    assert run_and_wait(page) == "done", page.inner_text("#error")

    # One line per chain on each chart, one point per step including step 0 (the initial samples): steps + 1.
    for chart in ("#chart-energy", "#chart-reward"):
        lines = page.locator(f"{chart} polyline")
        assert lines.count() == RUN["chains"]
        for i in range(RUN["chains"]):
            points = lines.nth(i).get_attribute("points").split()
            assert len(points) == steps_run + 1 == int(lines.nth(i).get_attribute("data-points"))
            xs = [float(point.split(",")[0]) for point in points]
            assert xs == sorted(xs) and len(set(xs)) == len(xs)  # left to right, one point per step
        assert sorted(lines.nth(i).get_attribute("data-chain") for i in range(RUN["chains"])) == ["0", "1", "2"]

    # The page shows what the API returns for the same request.
    assert page.inner_text("#final-text") == aligned["text"] != ""
    assert page.locator(".chain").count() == RUN["chains"]
    assert page.get_attribute(".chain.chosen", "data-chain") == str(aligned["chosen"])

    # Each chain shows its returned iterate, with the tokens that differ from its initial sample marked.
    with httpx.Client(base_url=server.url, timeout=60) as client:
        job = client.post("/jobs", json=request).json()
        with connect_sse(client, "GET", f"/jobs/{job['id']}/events") as source:
            events = {e["step"]: e for e in (json.loads(s.data) for s in source.iter_sse() if s.event == "step")}
    assert max(events) == steps_run and sorted(events) == list(range(min(events), steps_run + 1))
    marked_total = 0
    for i, chain in enumerate(aligned["chains"]):
        card = page.locator(f".chain[data-chain='{i}']")
        assert card.locator(".text").inner_text() == chain["text"]
        at_best = events.get(chain["best_step"])  # no event at step 0 means no changes there
        expected = sum(at_best["chains"][i]["changed_positions"]) if at_best else 0
        assert card.locator("mark.tok.changed").count() == expected
        marked_total += expected
    assert marked_total > 0, "pick a run where the sampler changes some tokens, or the highlight goes untested"

    # The reference-model sample beside it, and its scores.
    sample = httpx.post(server.url + "/align", json={**request, "method": "sample"}, timeout=60).json()
    assert page.inner_text("#reference-text") == sample["text"]
    assert page.locator("#reference-scores dd").count() == 4
    assert page.locator("#timings dd").count() >= 5

    # The curl command is the same request to POST /align.
    curl = page.inner_text("#curl")
    assert curl.startswith(f"curl -sS '{server.url}/align'") and "Authorization" not in curl
    body = json.loads(curl.split("-d '", 1)[1].rsplit("'", 1)[0])
    assert body == request
    assert page.log.errors == []


def test_chat_mode_and_sample_method(page, server):
    page.goto(server.url + "/")
    page.click("#mode-chat")
    assert page.locator("#messages .message").count() == 2
    page.locator("#messages .message textarea").nth(1).fill("write about a dog")
    page.click("[data-method='sample']")
    assert page.is_hidden("#steps") and page.is_hidden("#chains")
    page.fill("#max-tokens", "5")
    page.fill("#seed", "7")
    assert run_and_wait(page) == "done", page.inner_text("#error")
    assert page.is_hidden("#charts") and page.locator("#chart-energy polyline").count() == 0  # no Langevin steps for a sample
    messages = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "write about a dog"}]
    expected = httpx.post(server.url + "/align", json={"messages": messages, "method": "sample", "max_tokens": 5, "seed": 7, "alpha": 6,
                                                        "reward": {"keywords": ["lighthouse", "violin"]}}, timeout=60).json()
    assert page.inner_text("#final-text") == expected["text"]
    assert page.log.errors == []


@pytest.mark.parametrize("method, width, label", [("cbs", {"beams": 3}, "Beams (W)"), ("args", {}, None)])
def test_the_decoding_baselines_run_from_the_page(page, server, method, width, label):
    page.goto(server.url + "/")
    fill_form(page, chains=3, steps=2, max_tokens=5, seed=2, alpha=4.0, keywords=["sun"])
    page.click(f"[data-method='{method}']")
    assert page.is_hidden("#steps")
    if label is None:
        assert page.is_hidden("#chains")  # ARGS decodes one response
    else:
        assert page.inner_text("#chains-label") == label
    assert run_and_wait(page) == "done", page.inner_text("#error")
    expected = httpx.post(server.url + "/align", json={"prompt": PROMPT, "method": method, "max_tokens": 5, "seed": 2, "alpha": 4.0,
                                                        "temperature": 1, "reward": {"keywords": ["sun"]}, **width}, timeout=60).json()
    assert page.inner_text("#final-text") == expected["text"]
    assert page.locator("#chain-list .chain").count() == len(expected["chains"])
    assert page.is_hidden("#charts")
    assert page.log.errors == []


def test_api_key_is_sent_from_the_page_and_kept_in_the_browser(page, locked_server):
    page.goto(locked_server.url + "/playground")
    fill_form(page, chains=2, steps=2, max_tokens=4, seed=1, alpha=1.0, keywords=[])
    assert page.input_value("#api-key") == ""
    assert run_and_wait(page) == "failed"
    assert page.is_visible("#error")
    assert "API key" in page.inner_text("#error") and "401" in page.inner_text("#error")
    assert page.is_hidden("#result")

    page.fill("#api-key", "secret")
    assert run_and_wait(page) == "done", page.inner_text("#error")
    assert page.is_hidden("#error")
    assert page.inner_text("#final-text") != ""
    assert page.locator("#chart-energy polyline").count() == 2
    assert "-H \"Authorization: Bearer $SEA_API_KEY\"" in page.inner_text("#curl")  # the key itself stays out of the command

    page.reload()
    assert page.input_value("#api-key") == "secret"  # kept for the tab (sessionStorage), never sent anywhere but the API
    assert page.evaluate("Object.keys(localStorage)") == []  # not on disk for every later visitor of the origin
    other = page.context.new_page()
    other.goto(page.url)
    assert other.input_value("#api-key") == ""  # another tab asks again
    other.close()


RUNNING = {"id": "job-x", "status": "running", "position": None, "created": 0, "error": None, "result": None}


def wait_state(page, state: str) -> None:
    page.wait_for_selector(f"body[data-run-state={state}]", state="attached")


def test_invalid_fields_are_reported_and_nothing_is_sent(page, server):
    page.goto(server.url + "/")
    posts = []
    page.on("request", lambda request: posts.append(request.url) if request.method == "POST" else None)
    page.click("#chains")
    page.keyboard.press("Control+A")
    page.keyboard.type("3e")  # the browser reports text it cannot parse as ""; it must not become the server's default
    page.click("#run")
    wait_state(page, "invalid")
    assert "Chains" in page.inner_text("#error") and "not a number" in page.inner_text("#error")
    assert page.evaluate("document.activeElement.id") == "chains"

    page.fill("#chains", "2")
    page.fill("#keywords", " , ")
    page.check("#keywords-only")
    page.click("#run")  # "keyword reward only" without keywords: an error, not the server's reward
    wait_state(page, "invalid")
    assert "Keyword reward only" in page.inner_text("#error")
    assert posts == []
    assert page.log.errors == []


def test_stop_while_the_reference_sample_runs_cancels_that_job(page, server):
    page.goto(server.url + "/")
    fill_form(page, chains=2, steps=2, max_tokens=4, seed=1, alpha=1.0, keywords=["sun"])
    streams = []

    def hold_the_reference_stream(route):
        streams.append(route)
        if len(streams) == 1:
            route.continue_()

    page.route("**/events", hold_the_reference_stream)
    deletes = []
    page.on("request", lambda request: deletes.append(request.url) if request.method == "DELETE" else None)
    events = []
    with page.expect_request(lambda request: request.url.endswith("/events") and (events.append(request.url) or len(events) == 2)):
        page.click("#run")
    assert page.is_visible("#result")  # the aligned result is in; the reference job's events are held
    page.click("#stop")
    wait_state(page, "cancelled")
    reference = events[1].rsplit("/", 2)[1]
    assert deletes == [f"{server.url}/jobs/{reference}"]
    assert "stopped" in page.inner_text("#reference-text") and page.is_visible("#result")


def test_an_event_stream_cut_off_mid_job_is_reopened(page, server):
    page.goto(server.url + "/")
    fill_form(page, **RUN)
    streams = []

    def cut_the_first(route):
        streams.append(route.request.url)
        if len(streams) > 1:
            route.continue_()
            return
        step = {"event": "step", "step": 0, "steps": RUN["steps"], "chains": [{"energy": 1, "reward": 0, "text": "x"}]}
        route.fulfill(status=200, headers={"content-type": "text/event-stream"}, body=f"event: step\r\ndata: {json.dumps(step)}\r\n\r\n")

    def still_running(route):  # GET /jobs/{id} says "running" until the page opens the stream again
        if route.request.method == "GET" and len(streams) < 2:
            route.fulfill(status=200, json=RUNNING)
        else:
            route.continue_()

    page.route("**/events", cut_the_first)
    page.route("**/jobs/job-*", still_running)
    assert run_and_wait(page) == "done", page.inner_text("#error")
    assert streams[1] == streams[0]  # the same job's events, replayed from the start
    assert page.locator("#chart-energy polyline").count() == RUN["chains"]
    assert page.log.errors == []


def test_a_baseline_shows_when_it_runs_and_a_full_queue_says_when_to_retry(page, server):
    page.goto(server.url + "/")
    fill_form(page, chains=2, steps=2, max_tokens=4, seed=1, alpha=1.0, keywords=["sun"])
    page.click("[data-method='bon']")
    held = []
    page.route("**/events", lambda route: held.append(route) if not held else route.continue_())
    page.route("**/jobs/job-*", lambda route: route.fulfill(status=200, json=RUNNING) if route.request.method == "GET" else route.continue_())
    page.click("#run")
    page.wait_for_selector("#run-status:has-text('Running job-')")  # no step events for Best-of-N: from GET /jobs/{id}
    page.unroute("**/jobs/job-*")
    held[0].continue_()
    wait_state(page, "done")

    page.route("**/jobs", lambda route: route.fulfill(status=429, headers={"Retry-After": "7"},
                                                      json={"error": {"message": "the queue is full; retry later"}}))
    assert run_and_wait(page) == "failed"
    assert "Retry in 7 s" in page.inner_text("#error")


def test_a_word_of_two_changed_tokens_is_one_mark(page, server):
    """" big" and "ger" both edited showed as two boxes, marking one word twice."""
    page.goto(server.url + "/")
    runs = page.evaluate("""async () => {
      const { segments } = await import("./static/format.js");
      return segments("a bigger cat sat", ["a", " big", "ger", " cat", " sat"], [false, true, true, false, true]);
    }""")
    assert runs == [{"text": "a", "changed": False}, {"text": " bigger", "changed": True}, {"text": " cat", "changed": False},
                    {"text": " sat", "changed": True}]


def test_chart_breaks_lines_at_gaps_and_shows_lone_points(page, server):
    page.goto(server.url + "/")
    drawn = page.evaluate("""async () => {
      const { drawChart } = await import("./static/chart.js");
      const node = document.getElementById("chart-energy");
      const read = () => ({
        lines: [...node.querySelectorAll("polyline")].map((line) => [line.dataset.chain, line.dataset.points]),
        dots: node.querySelectorAll("circle.dot").length,
        steps: [...node.querySelectorAll("text.tick[text-anchor=middle]")].map((tick) => tick.textContent), // the x axis
      });
      drawChart(node, [[1, null, 3, 4], [2, NaN]], { steps: 3 });
      const gaps = read();
      drawChart(node, [[1], [2]], { steps: 0 });
      return { gaps, steps0: read() };
    }""")
    # A gap starts a new line (never a segment across it); a line of one point gets a dot.
    assert drawn["gaps"]["lines"] == [["0", "1"], ["0", "2"], ["1", "1"]] and drawn["gaps"]["dots"] == 2
    assert drawn["gaps"]["steps"] == ["0", "1", "2", "3"]
    assert drawn["steps0"]["dots"] == 2 and drawn["steps0"]["steps"] == ["0"]  # no step 1 on a run of 0 steps

    # A finished run with nothing finite to plot says so instead of waiting for samples.
    with httpx.Client(base_url=server.url, timeout=60) as client:
        job = client.post("/jobs", json={"prompt": PROMPT, "chains": 2, "steps": 1, "max_tokens": 4}).json()
        with connect_sse(client, "GET", f"/jobs/{job['id']}/events") as source:
            result = next(s.data for s in source.iter_sse() if s.event == "result")
    ended = json.loads(result)
    for chain in ended["result"]["chains"]:
        chain["initial"].update(energy=None, reward=None)
    page.route("**/events", lambda route: route.fulfill(status=200, headers={"content-type": "text/event-stream"},
                                                        body=f"event: result\r\ndata: {json.dumps(ended)}\r\n\r\n"))
    fill_form(page, chains=2, steps=1, max_tokens=4, seed=0, alpha=1.0, keywords=["sun"])
    assert run_and_wait(page) == "done", page.inner_text("#error")
    assert page.text_content("#chart-energy text.empty") == "No finite values to plot."


def test_narrow_screens_and_keyboard_focus(browser, server):
    context = browser.new_context(viewport={"width": 360, "height": 740})
    page = context.new_page()
    page.goto(server.url + "/")
    fill_form(page, chains=2, steps=2, max_tokens=8, seed=0, alpha=1.0, keywords=["sun"])
    assert run_and_wait(page) == "done", page.inner_text("#error")
    # Nothing wider than the phone's screen, and the form scrolls away instead of covering the results.
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    assert page.evaluate("getComputedStyle(document.getElementById('run-form')).position") == "static"
    page.set_viewport_size({"width": 1280, "height": 900})
    assert page.evaluate("getComputedStyle(document.getElementById('run-form')).position") == "sticky"

    # The focus ring of a toggle button is drawn inside it (the toggle clips outside) in the accent colour.
    page.focus("#prompt")
    page.keyboard.press("Tab")
    focused = page.evaluate("(() => { const s = getComputedStyle(document.activeElement); return [document.activeElement.dataset.method, "
                            "s.outlineOffset, s.outlineColor, s.outlineStyle]; })()")
    assert focused == ["sea", "-2px", "rgb(15, 118, 110)", "solid"]
    context.close()


def test_run_progress_and_focus_for_assistive_technology(page, server):
    page.goto(server.url + "/")
    assert page.get_attribute("#run-status", "role") == "status" and page.get_attribute("#run-status", "aria-live") == "polite"
    assert page.get_attribute("[data-method='sea']", "aria-pressed") == "true"
    assert page.get_attribute(".toggle.wide", "role") == "group"  # toggle buttons (aria-pressed), not radios
    fill_form(page, chains=2, steps=2, max_tokens=4, seed=0, alpha=1.0, keywords=["sun"])
    page.focus("#run")
    page.keyboard.press("Enter")
    page.wait_for_selector("#stop:focus")  # Run is disabled while the job runs; focus goes to Stop, not to the page
    wait_state(page, "done")
    page.wait_for_selector("#run:focus")

    page.click("#mode-chat")
    page.click("#add-message")
    assert page.locator("#messages .message").count() == 3
    page.locator("#messages .message button").nth(2).click()
    assert page.evaluate("document.activeElement === document.querySelectorAll('#messages textarea')[1]")
    page.locator("#messages .message button").nth(0).click()
    page.locator("#messages .message button").nth(0).click()
    assert page.evaluate("document.activeElement.id") == "add-message"
    assert page.log.errors == []


def test_stop_pressed_before_the_job_exists_cancels_it_once_it_does(page, server):
    """Stop aborted the POST in the browser while the server took it: the job ran on, unseen, and the page said
    "Stopped."."""
    page.goto(server.url + "/")
    fill_form(page, chains=2, steps=200, max_tokens=8, seed=1, alpha=1.0, keywords=["sun"])
    created = []

    def slow_answer(route):
        if route.request.method != "POST":
            route.continue_()
            return
        response = route.fetch()  # the server has the job now
        created.append(response.json()["id"])
        page.wait_for_timeout(800)  # Stop is pressed meanwhile
        route.fulfill(response=response)

    page.route("**/jobs", slow_answer)
    page.click("#run")
    page.wait_for_timeout(300)
    page.click("#stop")
    wait_state(page, "cancelled")
    assert page.inner_text("#run-status") == "Stopped."
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.get(f"/jobs/{created[0]}").json()["status"] == "cancelled"


def test_enter_pressed_twice_does_not_stop_the_run_it_started(page, server):
    """A run started with Enter moves the focus to Stop, where the second Enter cancelled the run."""
    page.goto(server.url + "/")
    fill_form(page, chains=2, steps=2, max_tokens=4, seed=1, alpha=1.0, keywords=["sun"])
    deletes = []
    page.on("request", lambda request: deletes.append(request.url) if request.method == "DELETE" else None)
    page.focus("#seed")
    page.keyboard.press("Enter")
    page.wait_for_timeout(150)
    page.keyboard.press("Enter")
    wait_state(page, "done")
    assert deletes == []


def test_a_lost_server_is_named_and_the_status_is_checked_again(page, server):
    """The page showed the browser's "Failed to fetch", and its pill still said "ready" 40 s after the server died."""
    page.goto(server.url + "/")
    page.wait_for_selector("#server-status.pill-ok")
    fill_form(page, chains=2, steps=2, max_tokens=4, seed=1, alpha=1.0, keywords=["sun"])
    page.route("**/events", lambda route: route.abort())  # the connection fails, as with a server gone
    page.route("**/ready", lambda route: route.abort())
    assert run_and_wait(page) == "failed"
    error = page.inner_text("#error")
    assert "cannot reach the server" in error and "may still be running" in error and "Failed to fetch" not in error
    page.wait_for_selector("#server-status.pill-bad")
    assert page.inner_text("#server-status") == "server unreachable"


def test_chart_axes_get_enough_ticks_to_read(page, server):
    """Rounding the tick step up left one labelled tick for energies from 6.1 to 13.96."""
    page.goto(server.url + "/")
    ticks = page.evaluate("""async () => {
      const { drawChart } = await import("./static/chart.js");
      const node = document.getElementById("chart-energy");
      drawChart(node, [[13.96, 9.2, 6.1]], { steps: 2 });
      return [...node.querySelectorAll("text.tick[text-anchor=end]")].map((tick) => tick.textContent);
    }""")
    assert len(ticks) >= 3, ticks


def test_a_blank_seed_shows_the_drawn_one_in_the_curl_command_and_the_reference_shares_it(page, server):
    page.goto(server.url + "/")
    fill_form(page, chains=2, steps=2, max_tokens=4, seed=0, alpha=1.0, keywords=["sun"])
    page.fill("#seed", "")
    posts = []
    page.on("request", lambda request: posts.append(json.loads(request.post_data)) if request.method == "POST" else None)
    assert run_and_wait(page) == "done", page.inner_text("#error")
    assert "seed" not in posts[0]  # the server drew it
    seed = posts[1]["seed"]  # the reference sample's request carries the run's seed
    assert isinstance(seed, int) and f'"seed":{seed}' in page.inner_text("#curl")


def test_stop_gives_up_on_a_post_that_never_answers_and_says_the_job_may_run(page, server):
    page.goto(server.url + "/")
    fill_form(page, chains=2, steps=2, max_tokens=4, seed=1, alpha=1.0, keywords=["sun"])
    page.route("**/jobs", lambda route: None if route.request.method == "POST" else route.continue_())  # held open
    page.click("#run")
    page.wait_for_timeout(200)
    page.click("#stop")
    wait_state(page, "cancelled")  # it stayed "Stopping…" until the browser gave up on the request
    assert "may still run" in page.inner_text("#run-status")


def test_stop_while_the_reference_sample_is_being_submitted_cancels_that_job(page, server):
    """The reference sample's POST was aborted in the browser: its job ran on, unseen."""
    page.goto(server.url + "/")
    fill_form(page, chains=2, steps=2, max_tokens=4, seed=1, alpha=1.0, keywords=["sun"])
    created = []

    def slow_reference(route):
        if route.request.method != "POST" or json.loads(route.request.post_data)["method"] != "sample":
            route.continue_()
            return
        response = route.fetch()
        created.append(response.json()["id"])
        page.wait_for_timeout(1000)
        route.fulfill(response=response)

    page.route("**/jobs", slow_reference)
    deletes = []
    page.on("request", lambda request: deletes.append(request.url) if request.method == "DELETE" else None)
    with page.expect_request(lambda request: request.method == "POST" and json.loads(request.post_data)["method"] == "sample"):
        page.click("#run")
    page.click("#stop")
    wait_state(page, "cancelled")
    assert deletes == [f"{server.url}/jobs/{created[0]}"]  # (the tiny model may have finished it first: no status check)

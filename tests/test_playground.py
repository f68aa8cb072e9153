"""The playground: its route in-process, then the page in real headless Chromium.

The browser tests drive Debian's ``chromium`` through ``chromedriver`` with
Selenium, against live ``gunicorn -k gevent`` servers on real llama.cpp.
Screenshots go to ``$WSGI_LLAMA_ARTIFACTS/playground`` (else a temporary
directory; its path is printed).
"""

from __future__ import annotations

import configparser
import contextlib
import fnmatch
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import REPO, LiveServer, free_port
from flask import Flask
from live_server import gunicorn_command

from wsgi_llama import ConfigError, create_app, create_blueprint
from wsgi_llama.playground import FILES

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
KEY = "right-key"

# Page


def test_page_is_html_with_a_strict_csp(client: Any) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    csp = response.headers["Content-Security-Policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'none'"
    for directive in ("script-src", "style-src", "connect-src"):
        assert directives[directive] == "'self'", directive
    assert directives["frame-ancestors"] == "'none'"
    assert "unsafe" not in csp
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    page = response.get_data(as_text=True)
    assert 'src="playground/app.js"' in page
    assert 'href="playground/style.css"' in page


@pytest.mark.parametrize(
    ("name", "mimetype"),
    [("app.js", "text/javascript"), ("style.css", "text/css")],
)
def test_assets_are_served_with_their_types(
    client: Any, name: str, mimetype: str
) -> None:
    response = client.get(f"/playground/{name}")
    assert response.status_code == 200
    assert response.mimetype == mimetype
    assert response.get_data() == (FILES / name).read_bytes()


def test_unknown_asset_is_an_openai_404(client: Any) -> None:
    for path in ("/playground/index.html", "/playground/..%2Fapi.py", "/playground/x"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.json["error"]["code"] == "not_found"


def test_nothing_inline_and_nothing_remote() -> None:
    """All of it passes the CSP: no inline code or style, no other origin."""
    page = (FILES / "index.html").read_text()
    assert "<script>" not in page and "<style" not in page
    assert not re.search(r"\s(style|on\w+)=", page)
    for name in ("index.html", "app.js", "style.css"):
        text = (FILES / name).read_text()
        assert "://" not in text, name
        assert "@import" not in text, name
    assert "EventSource" not in (FILES / "app.js").read_text()


def test_setup_cfg_ships_every_playground_file() -> None:
    """``pip install .`` (not editable) copies package data only if listed."""
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    patterns = [
        p.strip()
        for p in config["options.package_data"]["wsgi_llama"].split(",")
        if p.strip()
    ]
    files = sorted(p.relative_to(FILES.parent) for p in FILES.iterdir())
    assert {"playground/index.html", "playground/app.js"} <= {str(f) for f in files}
    for file in files:
        assert any(fnmatch.fnmatch(str(file), p) for p in patterns), file


# Switch, key and mounts


def test_off_switch_is_an_openai_404(make_app: Callable[..., Flask]) -> None:
    client = make_app(LLAMA_PLAYGROUND="0").test_client()
    for path in ("/", "/playground/app.js", "/playground/info.json"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.json["error"]["type"] == "not_found_error"
    assert client.get("/health").status_code == 200


def test_off_switch_from_the_environment(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLAMA_MODEL", str(tiny_model))
    monkeypatch.setenv("LLAMA_N_CTX", "256")
    monkeypatch.setenv("LLAMA_PLAYGROUND", "off")
    assert create_app().test_client().get("/").status_code == 404
    monkeypatch.setenv("LLAMA_PLAYGROUND", "1")
    assert create_app().test_client().get("/").status_code == 200


def test_bad_switch_names_the_key(tiny_model: Path) -> None:
    with pytest.raises(ConfigError, match=r"^LLAMA_PLAYGROUND: must be 1 or 0"):
        create_app({"LLAMA_MODEL": str(tiny_model), "LLAMA_PLAYGROUND": "maybe"})


def test_page_needs_no_key_but_the_api_does(make_app: Callable[..., Flask]) -> None:
    client = make_app(LLAMA_API_KEY=KEY).test_client()
    for path in ("/", "/playground/app.js", "/playground/style.css"):
        assert client.get(path).status_code == 200, path
    for path in ("/playground/info.json", "/v1/models"):
        assert client.get(path).status_code == 401, path
    auth = {"Authorization": f"Bearer {KEY}"}
    info = client.get("/playground/info.json", headers=auth).json
    assert info["models"]["tiny"]["chat_template"] is True


def test_under_a_blueprint_prefix(tiny_model: Path) -> None:
    app = Flask("host")
    app.config.update(LLAMA_MODEL=str(tiny_model), LLAMA_N_CTX=256)
    app.register_blueprint(create_blueprint(url_prefix="/llm"))
    client = app.test_client()
    page = client.get("/llm/")
    assert page.status_code == 200
    assert page.headers["Content-Security-Policy"]
    redirect = client.get("/llm")
    assert redirect.status_code == 308
    assert redirect.headers["Location"].endswith("/llm/")
    assert client.get("/llm/playground/app.js").status_code == 200
    assert client.get("/llm/playground/info.json").json["models"]
    assert client.get("/").status_code == 404  # the host app's own root


def test_behind_script_name(client: Any) -> None:
    page = client.get("/", environ_overrides={"SCRIPT_NAME": "/ai"})
    assert page.status_code == 200
    assert page.mimetype == "text/html"
    bare = client.get("/", environ_overrides={"SCRIPT_NAME": "/ai", "PATH_INFO": ""})
    assert bare.status_code == 308
    assert bare.headers["Location"].endswith("/ai/")  # else relative URLs miss /ai


def test_each_mount_has_its_own_playground(tiny_model: Path) -> None:
    app = Flask("host")
    app.config.update(LLAMA_MODEL=str(tiny_model), LLAMA_N_CTX=256)
    app.register_blueprint(
        create_blueprint({"LLAMA_MODEL_ALIAS": "a-model"}, name="a"), url_prefix="/a"
    )
    app.register_blueprint(
        create_blueprint({"LLAMA_PLAYGROUND": "0"}, name="b"), url_prefix="/b"
    )
    client = app.test_client()
    assert client.get("/a/").status_code == 200
    assert list(client.get("/a/playground/info.json").json["models"]) == ["a-model"]
    off = client.get("/b/")
    assert off.status_code == 404
    assert off.json["error"]["code"] == "not_found"
    assert client.get("/b/v1/models").status_code == 200  # only the page is off


@pytest.mark.gemma
def test_info_says_gemma_has_no_chat_template(gemma_model: Path) -> None:
    app = create_app({"LLAMA_MODEL": str(gemma_model), "LLAMA_N_CTX": 256})
    info = app.test_client().get("/playground/info.json").json
    assert [m["chat_template"] for m in info["models"].values()] == [False]


# In Chromium


def _unavailable(reason: str) -> None:
    if os.environ.get("WSGI_LLAMA_REQUIRE_SERVERS") == "1":
        pytest.fail(f"{reason} (WSGI_LLAMA_REQUIRE_SERVERS=1)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def chromium() -> None:
    """Debian's chromium and chromedriver, installed if missing."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        if shutil.which("apt-get") is None:
            _unavailable("chromium is not installed and there is no apt-get")
        lock = ["-o", "DPkg::Lock::Timeout=900"]
        command = ["apt-get", "install", "-y", *lock, "chromium", "chromium-driver"]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        result = subprocess.run(
            command, capture_output=True, text=True, env=env, check=False
        )
        if result.returncode != 0:  # perhaps stale package lists: refresh, retry
            subprocess.run(
                ["apt-get", "update", *lock], capture_output=True, env=env, check=False
            )
            result = subprocess.run(
                command, capture_output=True, text=True, env=env, check=False
            )
        if result.returncode != 0 or not CHROMEDRIVER.exists():
            _unavailable(
                f"cannot install chromium: {' '.join(command)} exited with "
                f"{result.returncode}: {result.stderr.strip()[-500:]}"
            )
    try:
        import selenium  # noqa: F401
    except ImportError:
        _unavailable("selenium is not installed (pip install -e '.[test]')")


@pytest.fixture(scope="module")
def browser(chromium: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    # The path given: Selenium Manager does not run (it would download drivers).
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = os.environ.get("WSGI_LLAMA_ARTIFACTS")
    folder = (
        Path(root) / "playground"
        if root
        else tmp_path_factory.mktemp("playground-artifacts")
    )
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nplayground screenshots: {folder}")
    return folder


# One llama.cpp thread: Chromium shares the cores, and llama.cpp's threads
# wait for each other when one of them is descheduled.
BROWSER_SERVER = {
    "LLAMA_N_THREADS": "1",
    "LLAMA_N_CTX": "16384",
    "LLAMA_PING_INTERVAL": "0.2",
    "LLAMA_MIN_PING_INTERVAL": "0.05",
}


@pytest.fixture(scope="module")
def live(start_server: Callable[..., LiveServer]) -> LiveServer:
    return start_server(**BROWSER_SERVER)


@pytest.fixture(scope="module")
def keyed(start_server: Callable[..., LiveServer]) -> LiveServer:
    return start_server(**BROWSER_SERVER, LLAMA_API_KEY=KEY)


class Page:
    """The playground open in Chromium, with what the tests read and do."""

    def __init__(self, driver: Any, url: str) -> None:
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver = driver
        self.wait = WebDriverWait(driver, 60, poll_frequency=0.05)
        driver.get(url)
        driver.execute_script("sessionStorage.clear()")
        driver.refresh()

    def models_loaded(self) -> list[str]:
        self.wait.until(
            lambda d: d.execute_script(
                "return [...document.querySelectorAll('#model option')]"
                ".some(o => o.value)"
            )
        )
        return self.driver.execute_script(
            "return [...document.querySelectorAll('#model option')].map(o => o.value)"
        )

    def fill(self, element_id: str, text: str) -> None:
        element = self.driver.find_element("id", element_id)
        element.clear()
        element.send_keys(text)

    def setting(self, element_id: str, value: str) -> None:
        """Set a field as a user would, and let its change handlers run."""
        self.driver.execute_script(
            "const e = document.getElementById(arguments[0]);"
            "e.value = arguments[1];"
            "e.dispatchEvent(new Event('input'));"
            "e.dispatchEvent(new Event('change'));",
            element_id,
            value,
        )

    def click(self, element_id: str) -> None:
        self.driver.find_element("id", element_id).click()

    def send(
        self,
        prompt: str,
        *,
        max_tokens: int,
        mode: str = "completion",
        temperature: float = 0.8,
    ) -> None:
        # By script: on a phone the settings are folded away.
        self.driver.execute_script(
            "const e = document.getElementById(arguments[0]);"
            "e.checked = true; e.dispatchEvent(new Event('change'));",
            f"mode-{mode}",
        )
        self.setting("max-tokens", str(max_tokens))
        self.setting("temperature", str(temperature))
        self.fill("prompt", prompt)
        self.click("send")

    def read(self) -> dict[str, Any]:
        return self.driver.execute_script(
            "const out = [...document.querySelectorAll('.message .output')].pop();"
            "return {"
            " text: out ? out.textContent : '',"
            " state: document.getElementById('status').dataset.state,"
            " status: document.getElementById('status').textContent,"
            " pings: Number(document.getElementById('heartbeats').dataset.count),"
            " error: [...document.querySelectorAll('.message.error')]"
            "   .map(e => e.lastChild.textContent).pop() || null,"
            "}"
        )

    def until_state(self, *states: str) -> dict[str, Any]:
        self.wait.until(lambda d: self.read()["state"] in states)
        return self.read()

    def watch_growth(self, distinct: int = 4) -> list[tuple[float, int, str]]:
        """Poll the output until it has grown *distinct* times while streaming."""
        samples: list[tuple[float, int, str]] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            seen = self.read()
            samples.append((time.monotonic(), len(seen["text"]), seen["state"]))
            if seen["state"] not in ("waiting", "streaming"):
                break
            lengths = {n for _, n, s in samples if s == "streaming" and n > 0}
            if len(lengths) >= distinct:
                break
            time.sleep(0.05)
        return samples

    def shot(self, folder: Path, name: str) -> Path:
        path = folder / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path


def _streaming_lengths(samples: list[tuple[float, int, str]]) -> list[int]:
    return sorted({n for _, n, s in samples if s == "streaming" and n > 0})


def test_completion_streams_in_and_finishes(
    browser: Any, live: LiveServer, artifacts: Path
) -> None:
    page = Page(browser, live.url + "/")
    assert page.models_loaded() == ["tiny"]
    assert browser.find_element("id", "mode-chat").is_selected()  # it has a template
    page.send("Once upon a time", max_tokens=24)
    done = page.until_state("done", "error", "stopped")
    assert done["state"] == "done", done
    assert len(done["text"]) >= 10
    assert done["status"].startswith("Done: ")
    page.shot(artifacts, "completion-done")


def test_text_streams_in_before_the_end_and_stop_frees_the_model(
    browser: Any, live: LiveServer, artifacts: Path
) -> None:
    page = Page(browser, live.url + "/")
    page.models_loaded()
    asked = 16000  # far more than this test waits for at any speed
    page.send("Tell a long story.", max_tokens=asked, mode="chat")
    samples = page.watch_growth()
    lengths = _streaming_lengths(samples)
    assert len(lengths) >= 4, samples[-10:]  # grew while the response was open
    stopping = page.read()
    page.click("stop")
    stopped = page.until_state("stopped", "done", "error")
    assert stopped["state"] == "stopped", stopped
    page.shot(artifacts, "stopped")

    # The tiny model writes one character per token: from the growth seen,
    # how long the server would still have needed had it not stopped.
    streaming = [(t, n) for t, n, s in samples if s == "streaming" and n > 0]
    (t0, n0), (t1, n1) = streaming[0], streaming[-1]
    rate = (n1 - n0) / max(t1 - t0, 1e-3)
    remaining = (asked - len(stopping["text"])) / rate
    started = time.monotonic()
    response = httpx.post(
        live.url + "/v1/completions",
        json={"prompt": "Hi", "max_tokens": 1},
        timeout=remaining,
    )
    waited = time.monotonic() - started
    print(
        f"\nstopped at {len(stopping['text'])} of {asked} tokens ({rate:.0f}/s); "
        f"the rest would take {remaining:.1f} s; the next request took {waited:.2f} s"
    )
    assert response.status_code == 200
    assert waited < remaining / 2


@contextlib.contextmanager
def model_held(server: LiveServer) -> Iterator[None]:
    """Keep *server*'s model generating a long stream until the block ends.

    A ``suffix`` keeps it off the batching engine: it holds the whole model,
    so the page's request queues behind it whatever LLAMA_PARALLEL is.
    """
    occupied = threading.Event()
    release = threading.Event()

    def hold() -> None:
        body = {"prompt": "Hold", "max_tokens": 16000, "stream": True, "suffix": ""}
        with (
            httpx.Client(timeout=120) as client,
            client.stream("POST", server.url + "/v1/completions", json=body) as r,
        ):
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    occupied.set()
                if release.is_set():
                    break  # closing the stream frees the model

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert occupied.wait(60), "the holding stream never started"
        yield
    finally:
        release.set()
        holder.join(60)


def test_heartbeats_show_while_queued(
    browser: Any, live: LiveServer, artifacts: Path
) -> None:
    page = Page(browser, live.url + "/")
    page.models_loaded()
    assert page.read()["pings"] == 0
    with model_held(live):
        page.send("Queued prompt", max_tokens=8)
        page.wait.until(lambda d: page.read()["pings"] >= 3)
        queued = page.read()
        assert queued["state"] == "waiting", queued
        assert queued["text"] == ""
        assert "pings" in browser.find_element("id", "heartbeats").text
        page.shot(artifacts, "heartbeats-while-queued")
    done = page.until_state("done", "error")
    assert done["state"] == "done", done
    assert done["text"]


def test_error_event_mid_stream_shows_its_message(
    browser: Any, start_server: Callable[..., LiveServer], artifacts: Path
) -> None:
    """A queue timeout comes after the 200, as a ``data: {"error": ...}`` event."""
    server = start_server(**BROWSER_SERVER, LLAMA_QUEUE_TIMEOUT="1")
    page = Page(browser, server.url + "/")
    page.models_loaded()
    with model_held(server):
        page.send("Too late", max_tokens=8)
        failed = page.until_state("error", "done")
    assert failed["error"] == "Waited 1 s in the queue for model 'tiny'; retry later."
    page.shot(artifacts, "error-mid-stream")
    server.stop()


def test_wrong_key_shows_the_apis_message(
    browser: Any, keyed: LiveServer, artifacts: Path
) -> None:
    api = httpx.get(
        keyed.url + "/v1/models", headers={"Authorization": "Bearer wrong"}
    ).json()["error"]["message"]
    missing = httpx.get(keyed.url + "/v1/models").json()["error"]["message"]

    page = Page(browser, keyed.url + "/")
    page.wait.until(lambda d: page.read()["state"] == "error")
    assert page.read()["status"] == missing  # the models could not be listed

    page.setting("api-key", "wrong")
    page.wait.until(lambda d: page.read()["status"] == api)
    page.send("Hello", max_tokens=4)
    failed = page.until_state("error", "done")
    assert failed["error"] == api
    page.shot(artifacts, "wrong-key")

    page.setting("api-key", KEY)
    assert page.models_loaded() == ["tiny"]
    stored = browser.execute_script(
        "return [Object.entries(sessionStorage), localStorage.length, document.cookie]"
    )
    assert stored == [[["wsgi-llama.api-key:/", KEY]], 0, ""]
    page.send("Hello", max_tokens=4)
    assert page.until_state("done", "error")["state"] == "done"


def test_sse_parser_reads_any_split(browser: Any, live: LiveServer) -> None:
    """The page's parser, fed a stream cut at every place, reads it the same."""
    Page(browser, live.url + "/")
    stream = (
        ": ping\r\n\r\n"
        'data: {"a":1}\r\n\r\n'
        "data: x\ndata:  y\n\n"
        "event: other\rdata:z\r\r"
        ": ping\n\n"
        "data\nid: 7\nretry: 10\n\n"
        "data: lost at the end"
    )
    expected = {
        "events": [
            ['{"a":1}', "message"],
            ["x\n y", "message"],
            ["z", "other"],
            ["", "message"],
        ],
        "comments": ["ping", "ping"],
    }
    results = browser.execute_script(
        "const text = arguments[0];"
        "const read = (pieces) => {"
        "  const seen = {events: [], comments: []};"
        "  const parser = new SSEParser("
        "    (data, type) => seen.events.push([data, type]),"
        "    (comment) => seen.comments.push(comment));"
        "  for (const piece of pieces) parser.feed(piece);"
        "  parser.end();"
        "  return seen;"
        "};"
        "const all = [read([text]), read([...text])];"
        "for (let i = 1; i < text.length; i++)"
        "  all.push(read([text.slice(0, i), text.slice(i)]));"
        "return all;",
        stream,
    )
    assert len(results) == len(stream) + 1
    for result in results:
        assert result == expected


def test_context_error_shows_the_apis_message(browser: Any, live: LiveServer) -> None:
    prompt = "word " * 4000  # 20,000 tokens for the byte-level tiny model
    api = httpx.post(
        live.url + "/v1/completions",
        json={"prompt": prompt, "max_tokens": 8, "stream": True},
    ).json()["error"]["message"]
    assert "context" in api
    page = Page(browser, live.url + "/")
    page.models_loaded()
    page.click("mode-completion")
    page.setting("max-tokens", "8")
    page.setting("prompt", prompt)
    page.click("send")
    failed = page.until_state("error", "done")
    assert failed["error"] == api


def test_under_a_prefix_behind_script_name(
    browser: Any,
    tiny_model: Path,
    tmp_path: Path,
    artifacts: Path,
) -> None:
    """A host app mounts the API at /llm; gunicorn serves it all under /site."""
    (tmp_path / "host_app.py").write_text(
        "import os\n"
        "from flask import Flask\n"
        "from wsgi_llama import create_blueprint\n"
        "app = Flask('host')\n"
        "app.config.update(LLAMA_MODEL=os.environ['HOST_MODEL'], LLAMA_N_CTX=1024,"
        " LLAMA_N_THREADS=1)\n"
        "app.register_blueprint(create_blueprint(), url_prefix='/llm')\n"
        "app.get('/')(lambda: 'the host app')\n"
    )
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "gunicorn.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            gunicorn_command(
                f"127.0.0.1:{port}", "--chdir", str(tmp_path), app="host_app:app"
            ),
            env={**os.environ, "HOST_MODEL": str(tiny_model), "SCRIPT_NAME": "/site"},
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                if httpx.get(base + "/site/llm/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        page = Page(browser, base + "/site/llm")  # no slash: redirected
        assert browser.current_url == base + "/site/llm/"
        assert page.models_loaded() == ["tiny"]
        background = browser.execute_script(
            "return getComputedStyle(document.body).backgroundColor"
        )
        assert background != "rgba(0, 0, 0, 0)"  # style.css was found
        page.send("Under a prefix", max_tokens=16)
        done = page.until_state("done", "error")
        assert done["state"] == "done", done
        page.shot(artifacts, "under-a-prefix")
    finally:
        process.terminate()
        process.wait(30)


@pytest.mark.parametrize("scheme", ["light", "dark"])
@pytest.mark.parametrize(
    ("device", "width", "height"), [("desktop", 1280, 900), ("phone", 390, 844)]
)
def test_screens_light_and_dark(
    browser: Any,
    live: LiveServer,
    artifacts: Path,
    scheme: str,
    device: str,
    width: int,
    height: int,
) -> None:
    browser.execute_cdp_cmd(
        "Emulation.setEmulatedMedia",
        {"features": [{"name": "prefers-color-scheme", "value": scheme}]},
    )
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {
            "width": width,
            "height": height,
            "deviceScaleFactor": 1,
            "mobile": device == "phone",
        },
    )
    try:
        page = Page(browser, live.url + "/")
        page.models_loaded()
        page.send("Name three rivers.", max_tokens=40, mode="chat")
        assert page.until_state("done", "error")["state"] == "done"
        page.send("And three mountains?", max_tokens=40, mode="chat")
        assert page.until_state("done", "error")["state"] == "done"
        path = page.shot(artifacts, f"{device}-{scheme}")
        layout = browser.execute_script(
            "const bg = getComputedStyle(document.body).backgroundColor"
            "  .match(/\\d+/g).map(Number);"
            "const box = id => document.getElementById(id).getBoundingClientRect();"
            "return {"
            " luminance: (bg[0] * 0.299 + bg[1] * 0.587 + bg[2] * 0.114) / 255,"
            " overflow: document.documentElement.scrollWidth - window.innerWidth,"
            " settings: box('settings').toJSON(), chat: box('conversation').toJSON(),"
            "}"
        )
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
    print(f"\n{path}: {layout}")
    assert (layout["luminance"] < 0.3) == (scheme == "dark")
    assert layout["overflow"] <= 0  # nothing wider than the screen
    if device == "phone":  # one column: settings above the chat
        assert layout["chat"]["top"] >= layout["settings"]["bottom"]
    else:
        assert layout["chat"]["left"] >= layout["settings"]["right"]


@pytest.mark.gemma
def test_gemma_streams_in_chromium_and_stops(
    browser: Any,
    start_server: Callable[..., LiveServer],
    gemma_model: Path,  # assembled here, so the server finds it at start-up
    artifacts: Path,
) -> None:
    # No model configured: the README's serve command, Gemma 3 270M.
    server = start_server(LLAMA_MODEL="", LLAMA_N_CTX="2048", LLAMA_N_THREADS="1")
    page = Page(browser, server.url + "/")
    page.models_loaded()
    # A base model: the page picks completion and says why.
    assert browser.find_element("id", "mode-completion").is_selected()
    assert "no chat template" in browser.find_element("id", "mode-hint").text
    # Greedy: the same long answer every time, never an early end.
    page.send("The three largest rivers in Europe are", max_tokens=400, temperature=0)
    lengths = _streaming_lengths(page.watch_growth(distinct=6))
    assert len(lengths) >= 6, lengths
    page.click("stop")
    assert page.until_state("stopped", "done", "error")["state"] == "stopped"
    page.shot(artifacts, "gemma-stopped")
    page.send("The capital of France is", max_tokens=8)
    done = page.until_state("done", "error")
    assert done["state"] == "done", done
    assert done["text"].strip()
    page.shot(artifacts, "gemma-done")
    server.stop()  # Gemma's memory back for the rest of the session

"""The web page (``GET /``) in a real browser: Debian's headless Chromium driven by selenium.

No browser traffic may leave the machine: the one test collected normally re-runs this file
inside a new network namespace with only loopback up (``unshare --net``), where the server,
a fake server for the translate and act panels, and Chromium (background networking off)
all run. The browser checks are collected only inside it (``EQUISERVE_WEB_NETNS=1``).

Set ``EQUISERVE_WEB_SCREENSHOT=docs/web.png`` to write the README's screenshot (the real
EfficientNet on the rocket example, rotated once); otherwise it goes to a temporary folder.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from apptools import ROOT, ServerProcess, free_port, start_server, wait_ready

INSIDE = os.environ.get("EQUISERVE_WEB_NETNS") == "1"
INNER_TESTS = 20  # browser checks below; the outer test makes sure all of them ran and passed

if not INSIDE:

    def test_web_router_serves_the_shipped_files_only() -> None:
        from fastapi import FastAPI
        from fastapi.testclient import TestClient

        from app.api.web import build_web_router

        app = FastAPI()
        app.include_router(build_web_router())
        client = TestClient(app)
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        for src in re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text):  # everything the page loads is here
            assert client.get(src).status_code == 200, src
        script = client.get("/static/app.js")
        assert script.headers["content-type"].startswith("text/javascript")  # module scripts need a JS type
        assert client.get("/static/app.js", headers={"If-None-Match": script.headers["etag"]}).status_code == 304
        for missing in ("/static/nope.js", "/static/../api/web.py", "/static/__init__.py", "/static/"):
            assert client.get(missing).status_code == 404, missing
        assert "/" not in {route.path for route in app.routes if getattr(route, "include_in_schema", False)}

    @pytest.mark.slow
    def test_web_page_in_a_browser_without_network() -> None:
        install = subprocess.run([str(ROOT / "scripts" / "install-browser")], capture_output=True, text=True)
        assert install.returncode == 0, f"scripts/install-browser failed:\n{install.stdout}\n{install.stderr}"
        for module in ("selenium", "gymnasium"):
            found = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True).returncode == 0
            assert found, f"the browser test needs `{module}` (pip install -e '.[test]')"
        assert shutil.which("unshare"), "the browser test needs `unshare` (util-linux)"
        # Root makes the namespace directly; anyone else maps themselves to root in a user namespace.
        unshare = ["unshare", "--net"] if os.geteuid() == 0 else ["unshare", "--net", "--map-root-user"]
        inner = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", str(Path(__file__))]
        env = {**os.environ, "EQUISERVE_WEB_NETNS": "1"}
        result = subprocess.run(
            [*unshare, "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *inner],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        output = result.stdout[-12000:] + result.stderr[-4000:]
        assert result.returncode == 0, f"browser checks failed:\n{output}"
        passed = re.search(r"(\d+) passed", result.stdout)
        assert passed and int(passed[1]) == INNER_TESTS and "skipped" not in result.stdout, output

else:
    import httpx
    import torch
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from generatetools import write_tiny_lm
    from imagetools import photo, png_bytes, write_tiny_clip, write_tiny_model
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from app.api.web import build_web_router
    from app.equivariance.groups import image_group

    EXAMPLES = ROOT / "app" / "web" / "static" / "examples"
    CHROMIUM_FLAGS = [
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-default-apps", "--disable-extensions", "--window-size=1280,1000",
    ]  # fmt: skip

    # -- servers -------------------------------------------------------------------------------

    @pytest.fixture(scope="module", autouse=True)
    def server_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ServerProcess]]:
        """``python -m app serve`` with tiny models (c4 with a trained λ-net, d4, a language
        model), the real ImageNet EfficientNet (its model.yaml; the weights come from pip), the
        shipped SCAN translator and the shipped agents of all three environments.
        Started first, so that it loads while the fake server's tests run."""
        models = tmp_path_factory.mktemp("web-models")
        write_tiny_model(models)
        write_tiny_model(models, "tiny-d4", group="d4")
        write_tiny_lm(models)
        write_tiny_clip(models)
        for name in ("imagenet-effnet-c4", "scan-gru-addjump-verb", "dqn-cartpole", "dqn-acrobot", "dqn-grid"):
            shutil.copytree(ROOT / "models" / name, models / name)
        port = free_port()
        process = start_server(models, port, "--runtime", "torch", "--max-batch-size", "2")
        try:
            yield f"http://127.0.0.1:{port}", process
        finally:
            process.terminate()
            process.wait(timeout=60)

    @pytest.fixture(scope="module")
    def server(server_process: tuple[str, ServerProcess]) -> str:
        base, process = server_process
        wait_ready(base, process, timeout=180)
        return base

    def api_classify(
        base: str, model: str, data: bytes, method: str, content_type: str = "image/png", labels: Sequence[str] = ()
    ) -> dict:
        files = {"image": ("photo", data, content_type)}
        form = {"method": method, "labels": list(labels)}
        response = httpx.post(f"{base}/v1/models/{model}/classify", files=files, data=form, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["results"][0]

    # A fake server for the translate and act panels, behind an API key: answers the page can be
    # checked against exactly (SCAN's own interpretation, an analytic CartPole controller whose
    # every observation the fake records). The shipped models drive the same panels below.
    FAKE_KEY = "sesame"
    SCAN_WORDS = {"walk": "I_WALK", "look": "I_LOOK", "run": "I_RUN", "jump": "I_JUMP"}
    SCAN_VOCABULARY = {*SCAN_WORDS, "turn", "left", "right", "opposite", "around", "twice", "thrice", "and", "after"}
    VERB_SWAP = {"jump": "run", "run": "jump", "I_JUMP": "I_RUN", "I_RUN": "I_JUMP"}
    FAKE_WEIGHTS = {"vanilla": [1.0, 0.0], "equitune": [0.5, 0.5], "equizero": [1.0, 0.0], "lambda": [0.625, 0.375]}

    def scan(command: str) -> list[str]:
        """SCAN's interpretation function (Lake & Baroni 2018), for the fake's answers."""
        words = command.split()
        for joiner, flip in (("and", False), ("after", True)):
            if joiner in words:
                i = words.index(joiner)
                first, second = scan(" ".join(words[:i])), scan(" ".join(words[i + 1 :]))
                return second + first if flip else first + second
        if words[-1] in ("twice", "thrice"):
            return scan(" ".join(words[:-1])) * (2 if words[-1] == "twice" else 3)
        verb = [] if words[0] == "turn" else [SCAN_WORDS[words[0]]]
        if len(words) == 1:
            return verb
        turn = ["I_TURN_LEFT" if words[-1] == "left" else "I_TURN_RIGHT"]
        if words[1] == "opposite":
            return turn * 2 + verb
        if words[1] == "around":
            return (turn + verb) * 4
        return turn + verb

    def swap(tokens: list[str]) -> list[str]:
        return [VERB_SWAP.get(t, t) for t in tokens]

    def cartpole_q(observation: list[float]) -> list[float]:
        """An equivariant controller: push towards where the pole leans and turns."""
        lean = observation[2] + 0.5 * observation[3]
        return [-lean, lean]

    class Refused(Exception):
        pass

    def fake_app() -> FastAPI:
        app = FastAPI()
        app.include_router(build_web_router())
        app.state.observations = []
        common = {"methods": list(FAKE_WEIGHTS), "default_method": "equizero", "num_labels": None,
                  "zero_shot": False, "lambda_trained": True, "device": "cpu", "dtype": "float32",
                  "runtime": "torch", "input_size": None}  # fmt: skip
        cards = [
            {"name": "scan-fake", "task": "translate", "backbone": "gru", "group": "verb",
             "transforms": ["identity", "swap:jump<->run"], "description": "fake SCAN model", **common},
            {"name": "cartpole-fake", "task": "act", "backbone": "mlp", "group": "z2", "env": "CartPole-v1",
             "transforms": ["identity", "negate"], "description": "fake DQN", **common},
        ]  # fmt: skip
        app.state.cards = cards  # what GET /v1/models lists: a test may swap it, the endpoints keep theirs
        timing = {"queue_ms": 0.5, "inference_ms": 1.5, "batch_size": 1}

        async def read(request: Request) -> tuple[dict, list[float]]:
            """The request's body and the copies' weights for its method, once its key is right."""
            if request.headers.get("authorization") != f"Bearer {FAKE_KEY}":
                raise Refused
            body = await request.json()
            return body, FAKE_WEIGHTS[body["method"]]

        @app.exception_handler(Refused)
        async def refused(request: Request, exc: Refused) -> JSONResponse:
            error = {"code": "unauthorized", "message": "missing or wrong API key: send 'Authorization: Bearer <key>'"}
            return JSONResponse({"error": {**error, "request_id": "fake"}}, status_code=401)

        @app.get("/v1/models")
        async def models() -> dict:
            return {"models": app.state.cards}

        def answer(model: str, group: str, body: dict, results: list[dict]) -> dict:
            return {"model": model, "method": body["method"], "group": group, "results": results, "timing": timing}

        def selected(body: dict) -> str | None:
            return "identity" if body["method"] == "equizero" else None

        @app.post("/v1/models/scan-fake/translate")
        async def translate(request: Request) -> Any:
            body, weights = await read(request)
            results = []
            for command in body["commands"]:
                unknown = [w for w in command.split() if w not in SCAN_VOCABULARY]
                if unknown:
                    message = f"unknown word {unknown[0]!r} in command {command!r}"
                    return JSONResponse({"error": {"code": "invalid_input", "message": message}}, status_code=422)
                copies = [scan(command), swap(scan(" ".join(swap(command.split()))))]  # g⁻¹·M(g·x)
                transforms = [{"name": n, "lambda": w, "actions": " ".join(c)}
                              for n, w, c in zip(cards[0]["transforms"], weights, copies, strict=True)]  # fmt: skip
                results.append({"actions": " ".join(copies[0]), "transforms": transforms,
                                "selected_transform": selected(body)})  # fmt: skip
            return answer("scan-fake", "verb", body, results)

        @app.post("/v1/models/cartpole-fake/act")
        async def act(request: Request) -> Any:
            body, weights = await read(request)
            results = []
            for observation in body["observations"]:
                app.state.observations.append(observation)
                copies = [cartpole_q(observation), cartpole_q([-v for v in observation])[::-1]]  # actions swapped back
                combined = [weights[0] * a + weights[1] * b for a, b in zip(*copies, strict=True)]
                transforms = [{"name": n, "lambda": w, "action": int(np.argmax(q))}
                              for n, w, q in zip(cards[1]["transforms"], weights, copies, strict=True)]  # fmt: skip
                results.append({"q_values": combined, "action": int(np.argmax(combined)), "transforms": transforms,
                                "selected_transform": selected(body)})  # fmt: skip
            return answer("cartpole-fake", "z2", body, results)

        return app

    @pytest.fixture(scope="module")
    def fake() -> Iterator[tuple[str, FastAPI]]:
        app = fake_app()
        port = free_port()
        uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=uv.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not uv.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert uv.started, "the fake server did not start"
        yield f"http://127.0.0.1:{port}", app
        uv.should_exit = True
        thread.join(timeout=10)

    # -- the browser ---------------------------------------------------------------------------

    @pytest.fixture(scope="module")
    def driver() -> Iterator[WebDriver]:
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium") or "chromium"
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        profile = tempfile.mkdtemp(prefix="chromium-profile-")
        options.add_argument(f"--user-data-dir={profile}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        browser = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver") or "chromedriver"))
        try:
            yield browser
        finally:
            browser.quit()
            shutil.rmtree(profile, ignore_errors=True)

    @pytest.fixture
    def console(driver: WebDriver) -> Iterator[list[str]]:
        """Fails the test on any console error or warning, except the HTTP statuses a test
        provokes on purpose (it appends e.g. "status of 422" to the yielded list)."""
        driver.get_log("browser")  # start from an empty log
        expected: list[str] = []
        yield expected
        entries = driver.get_log("browser")
        bad = [e for e in entries if e["level"] in ("SEVERE", "WARNING")
               and not (e["source"] == "network" and any(s in e["message"] for s in expected))]  # fmt: skip
        assert not bad, f"console errors: {bad}"

    def wait_for(driver: WebDriver, condition: Callable[[WebDriver], Any], timeout: float = 60) -> Any:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)

    def open_page(driver: WebDriver, base: str, model: str) -> None:
        driver.get("about:blank")  # a new document each time, not a hash change of the last one
        driver.get(f"{base}/#model={model}")
        wait_for(driver, lambda d: d.find_element(By.CSS_SELECTOR, "select[name=method]").is_enabled())
        assert Select(driver.find_element(By.CSS_SELECTOR, "select[name=model]")).first_selected_option.text == model

    def open_address(driver: WebDriver, address: str) -> str:
        """Load ``address`` as a new document; the model the page chose."""
        driver.get("about:blank")
        driver.get(address)
        return selected_model(driver)

    def selected_model(driver: WebDriver) -> str:
        wait_for(driver, lambda d: d.find_element(By.CSS_SELECTOR, "select[name=method]").is_enabled())
        return Select(driver.find_element(By.CSS_SELECTOR, "select[name=model]")).first_selected_option.text

    def error_shown(driver: WebDriver, panel: str) -> str | None:
        box = driver.find_element(By.CSS_SELECTOR, f'#{panel} [data-testid="error"]')
        return box.text if box.is_displayed() else None

    def choose_method(driver: WebDriver, name: str) -> None:
        Select(driver.find_element(By.CSS_SELECTOR, "select[name=method]")).select_by_value(name)

    def answer(driver: WebDriver, method: str, rotations: int = 0) -> dict[str, Any]:
        """Wait for the classify answer of ``method`` (after ``rotations`` turns); read the page."""

        def ready(d: WebDriver) -> bool:
            data = d.find_element(By.ID, "prediction").get_attribute("data-method")
            return data == method and d.find_element(By.ID, "prediction").get_attribute("data-rotations") == str(
                rotations
            )

        wait_for(driver, ready)
        prediction = driver.find_element(By.CSS_SELECTOR, '[data-testid="prediction"]')
        cards = driver.find_elements(By.CSS_SELECTOR, '[data-testid="copy"]')
        return {
            "label": prediction.text,
            "score": float(prediction.get_attribute("data-score")),
            "copies": [(c.get_attribute("data-transform"), float(c.get_attribute("data-lambda"))) for c in cards],
            "own": [c.find_element(By.CSS_SELECTOR, ".own").text.rsplit(" ", 1)[0] for c in cards],
            "selected": [c.get_attribute("data-transform") for c in cards if "selected" in c.get_attribute("class")],
        }

    def upload(driver: WebDriver, path: Path) -> None:
        driver.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(path))

    @pytest.fixture(scope="module")
    def cat_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
        path = tmp_path_factory.mktemp("photos") / "chelsea.png"  # PNG: browser and server decode it alike
        path.write_bytes(png_bytes(photo("chelsea")))
        return path

    def decode_data_url(url: str) -> np.ndarray:
        """A canvas' ``data:image/png;base64,...`` as float ``[H, W, 3]``."""
        with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as image:
            return np.asarray(image.convert("RGB"), dtype=np.float32)

    def assert_matches_api(page: dict[str, Any], api: dict[str, Any]) -> None:
        assert page["copies"] == [(t["name"], t["lambda"]) for t in api["transforms"]]
        assert abs(sum(w for _, w in page["copies"]) - 1) < 1e-6
        assert page["own"] == [t["top_label"] for t in api["transforms"]]
        assert page["label"] == api["predictions"][0]["label"]
        assert page["score"] == pytest.approx(api["predictions"][0]["score"], abs=1e-6)
        assert page["selected"] == ([api["selected_transform"]] if api["selected_transform"] else [])

    # -- translate and act, on the fake server -------------------------------------------------

    def test_translate_panel_asks_for_the_api_key(
        driver: WebDriver, fake: tuple[str, FastAPI], console: list[str]
    ) -> None:
        console.append("status of 401")
        base, _ = fake
        open_page(driver, base, "scan-fake")
        assert driver.find_element(By.ID, "translate").is_displayed()
        assert not driver.find_element(By.ID, "classify").is_displayed()
        driver.find_element(By.CSS_SELECTOR, "#translate-form button[type=submit]").click()
        key_form = driver.find_element(By.ID, "api-key")
        wait_for(driver, lambda d: key_form.is_displayed())
        key_form.find_element(By.NAME, "key").send_keys(FAKE_KEY, Keys.ENTER)  # the request runs again with it
        wait_for(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, '[data-testid="translation"]')) == 2)
        commands = ["jump twice after walk left", "run around right"]
        expected = httpx.post(f"{base}/v1/models/scan-fake/translate", headers={"Authorization": f"Bearer {FAKE_KEY}"},
                              json={"commands": commands, "method": "equizero"}).json()  # fmt: skip
        blocks = driver.find_elements(By.CSS_SELECTOR, '[data-testid="translation"]')
        for block, result, command in zip(blocks, expected["results"], commands, strict=True):
            assert block.find_element(By.CSS_SELECTOR, '[data-testid="actions"]').text == result["actions"]
            assert result["actions"] == " ".join(scan(command))
            cards = block.find_elements(By.CSS_SELECTOR, '[data-testid="copy"]')
            assert [(c.get_attribute("data-transform"), float(c.get_attribute("data-lambda"))) for c in cards] == [
                (t["name"], t["lambda"]) for t in result["transforms"]
            ]
            assert [c.get_attribute("data-transform") for c in cards if "selected" in c.get_attribute("class")] == [
                "identity"
            ]
        assert "run twice after walk left" in blocks[0].text  # the swapped copy's command
        assert driver.execute_script("return sessionStorage.length + localStorage.length") == 0

    def test_act_panel_plays_cartpole_through_the_endpoint(
        driver: WebDriver, fake: tuple[str, FastAPI], console: list[str]
    ) -> None:
        import gymnasium

        base, app = fake
        open_page(driver, base, "cartpole-fake")
        env = gymnasium.make("CartPole-v1").unwrapped
        rng = np.random.default_rng(0)
        # The page's CartPole step against gymnasium's, on random states and actions.
        for _ in range(20):
            state, action = rng.uniform(-0.3, 0.3, size=4), int(rng.integers(2))
            env.reset()
            env.state = state.copy()
            obs, _, terminated, _, _ = env.step(action)
            page = driver.execute_script("return window.equiserveCartPole.step(arguments[0], arguments[1]);",
                                         state.tolist(), action)  # fmt: skip
            np.testing.assert_allclose(page["state"], env.state, rtol=0, atol=1e-12)
            assert page["terminated"] == terminated
        app.state.observations.clear()
        Select(driver.find_element(By.ID, "episode-speed")).select_by_value("0")
        driver.find_element(By.ID, "episode-seed").clear()
        driver.find_element(By.ID, "episode-seed").send_keys("3")
        console.append("status of 401")
        driver.find_element(By.ID, "episode-play").click()
        key_form = driver.find_element(By.ID, "api-key")
        wait_for(driver, lambda d: key_form.is_displayed())  # a fresh page has no key: the first step is refused
        key_form.find_element(By.NAME, "remember").click()
        key_form.find_element(By.NAME, "key").send_keys(FAKE_KEY, Keys.ENTER)  # the episode starts again
        status = driver.find_element(By.CSS_SELECTOR, '[data-testid="episode"]')
        wait_for(driver, lambda d: status.get_attribute("data-done") == "true", timeout=90)
        steps = int(status.get_attribute("data-steps"))
        observations = [np.asarray(o, dtype=np.float64) for o in app.state.observations]
        assert len(observations) == steps > 0
        assert np.all(np.abs(observations[0]) <= 0.05)
        env.reset()
        # Every observation the page sent follows from the previous one and the fake's action.
        for t in range(steps - 1):
            env.state = observations[t].copy()
            action = int(np.argmax(cartpole_q(list(observations[t]))))
            obs, _, terminated, _, _ = env.step(action)
            np.testing.assert_allclose(obs, observations[t + 1], rtol=0, atol=1e-5)
            assert not terminated
        assert steps == 500 or env.step(int(np.argmax(cartpole_q(list(observations[-1])))))[2]
        assert f"return {steps}" in status.text
        cards = driver.find_elements(By.CSS_SELECTOR, '#act-copies [data-testid="copy"]')
        assert [c.get_attribute("data-transform") for c in cards] == ["identity", "negate"]
        assert abs(sum(float(c.get_attribute("data-lambda")) for c in cards) - 1) < 1e-9
        assert "Q-values" in driver.find_element(By.ID, "act-summary").text
        # "remember in this tab" kept the key in sessionStorage, and only there
        assert driver.execute_script("return sessionStorage.getItem('equiserve-api-key')") == FAKE_KEY
        assert driver.execute_script("return localStorage.length") == 0
        driver.execute_script("sessionStorage.clear()")

    # -- the model a page opens on -------------------------------------------------------------

    def test_without_the_readme_default_the_page_opens_on_the_rules_choice(
        driver: WebDriver, fake: tuple[str, FastAPI], console: list[str]
    ) -> None:
        base, app = fake
        served = app.state.cards
        common = {k: served[0][k] for k in ("methods", "default_method", "lambda_trained", "device", "dtype",
                                            "runtime", "input_size")}  # fmt: skip
        c4 = {"group": "c4", "transforms": ["identity", "rot90", "rot180", "rot270"], "backbone": "cnn"}

        def classifier(name: str, num_labels: int | None) -> dict:
            return {"name": name, "task": "classify", "description": "", "num_labels": num_labels,
                    "zero_shot": num_labels is None, **c4, **common}  # fmt: skip

        clip, small, wide = classifier("a-clip", None), classifier("m-small", 3), classifier("w-wide", 1000)
        scan_card, cartpole_card = served
        # Each list is in the server's order; neither the first listed nor the first alphabetically is the rule's.
        cases = [
            ([cartpole_card, scan_card], "scan-fake"),  # no classifier: the first task of the page's order
            ([scan_card, cartpole_card, classifier("z-clip", None)], "z-clip"),  # any classifier before other tasks
            ([clip, small, scan_card, wide, cartpole_card], "w-wide"),  # fixed labels, the most of them
            ([clip, cartpole_card, small], "m-small"),  # fixed labels before zero-shot
        ]
        try:
            for cards, expected in cases:
                app.state.cards = cards
                assert open_address(driver, f"{base}/") == expected, [c["name"] for c in cards]
                assert open_address(driver, f"{base}/#model=nope") == expected  # an unknown name: the rule
        finally:
            app.state.cards = served

    def test_the_page_opens_on_the_classifier_and_keeps_the_choice(
        driver: WebDriver, server: str, console: list[str]
    ) -> None:
        assert open_address(driver, f"{server}/") == "imagenet-effnet-c4"  # the README's default, not dqn-acrobot
        assert driver.find_element(By.ID, "classify").is_displayed()
        assert not driver.find_element(By.ID, "labels").is_displayed()  # a fixed label set
        assert open_address(driver, f"{server}/?model=dqn-cartpole") == "dqn-cartpole"
        assert driver.find_element(By.ID, "act").is_displayed()
        driver.refresh()
        assert selected_model(driver) == "dqn-cartpole"
        Select(driver.find_element(By.CSS_SELECTOR, "select[name=model]")).select_by_value("tinylm")
        driver.refresh()  # the last choice wins over the link's ?model=
        assert selected_model(driver) == "tinylm" and driver.find_element(By.ID, "generate").is_displayed()
        assert "model=dqn-cartpole" not in driver.current_url
        assert open_address(driver, f"{server}/#model=scan-gru-addjump-verb") == "scan-gru-addjump-verb"

    def test_the_page_says_what_the_copies_and_lambda_are(driver: WebDriver, server: str, console: list[str]) -> None:
        open_page(driver, server, "imagenet-effnet-c4")
        about = driver.find_element(By.ID, "about")
        assert about.is_displayed() and about.find_element(By.XPATH, "..").tag_name == "header"  # at the top
        text = about.text.lower()
        for words in ("every copy", "mapped back", "averaged", "weights λ", "small learned network", "rotat",
                      "swap", "no longer changes"):  # fmt: skip
            assert words in text, words
        docs = about.find_element(By.CSS_SELECTOR, "a[href='/docs']")
        assert httpx.get(docs.get_attribute("href"), timeout=30).status_code == 200  # a page this server serves
        details = driver.find_element(By.ID, "about-method")
        assert details.get_attribute("open") is None and not details.find_element(By.TAG_NAME, "ul").is_displayed()
        about.find_element(By.ID, "method-link").click()
        assert details.get_attribute("open") is not None
        assert "λ-equitune" in details.text and "g⁻¹·M(g·x)" in details.text
        assert driver.current_url.endswith("#model=imagenet-effnet-c4")  # the link kept the model's fragment
        driver.refresh()
        assert selected_model(driver) == "imagenet-effnet-c4"

    # -- try an example ------------------------------------------------------------------------

    def test_translate_examples_are_accepted_and_unchanged_copies_marked(
        driver: WebDriver, server: str, console: list[str]
    ) -> None:
        open_page(driver, server, "scan-gru-addjump-verb")
        field = driver.find_element(By.ID, "commands")
        seen = {field.get_attribute("value")}
        for _ in range(3):  # each press shows another example
            driver.find_element(By.ID, "translate-example").click()
            wait_for(driver, lambda d: field.get_attribute("value") not in seen)
            commands = field.get_attribute("value").split("\n")
            seen.add(field.get_attribute("value"))
            count = len(commands)
            wait_for(
                driver, lambda d, n=count: len(d.find_elements(By.CSS_SELECTOR, '[data-testid="translation"]')) == n
            )
            assert error_shown(driver, "translate") is None
            expected = httpx.post(f"{server}/v1/models/scan-gru-addjump-verb/translate", timeout=60,
                                  json={"commands": commands, "method": "equizero"})  # fmt: skip
            assert expected.status_code == 200, expected.text
            blocks = driver.find_elements(By.CSS_SELECTOR, '[data-testid="translation"]')
            for block, command, result in zip(blocks, commands, expected.json()["results"], strict=True):
                assert block.find_element(By.CSS_SELECTOR, '[data-testid="actions"]').text == result["actions"]
                marked = {c.get_attribute("data-transform")
                          for c in block.find_elements(By.CSS_SELECTOR, '[data-unchanged="true"]')}  # fmt: skip
                swaps = {t["name"] for t in result["transforms"]} - {"identity"}  # the verb swap jump<->run
                assert marked == (set() if set(command.split()) & {"jump", "run"} else swaps), command
            any_marked = bool(driver.find_elements(By.CSS_SELECTOR, '#translations [data-unchanged="true"]'))
            assert driver.find_element(By.ID, "translate-unchanged-help").is_displayed() == any_marked
            assert any_marked  # every example has a command without jump or run

    def test_generate_example_explains_the_frame_and_marks_unchanged_copies(
        driver: WebDriver, server: str, console: list[str]
    ) -> None:
        open_page(driver, server, "tinylm")
        prompt = driver.find_element(By.ID, "prompt")
        before = prompt.get_attribute("value")
        assert not driver.find_element(By.ID, "unchanged-help").is_displayed()
        driver.find_element(By.ID, "generate-example").click()
        output = driver.find_element(By.CSS_SELECTOR, '[data-testid="generated"]')
        wait_for(driver, lambda d: output.get_attribute("data-done") == "true")
        assert error_shown(driver, "generate") is None
        example = prompt.get_attribute("value")
        assert example != before
        expected = httpx.post(f"{server}/v1/models/tinylm/generate", timeout=60,
                              json={"prompt": example, "max_new_tokens": 1})  # fmt: skip
        assert expected.status_code == 200, expected.text
        prompts = {t["name"]: t["prompt"] for t in expected.json()["transforms"]}
        unchanged = {name for name, p in prompts.items() if name != "identity" and p == prompts["identity"]}
        assert unchanged and len(unchanged) < len(prompts) - 1  # the example has swapped and unswapped copies
        items = driver.find_elements(By.CSS_SELECTOR, '#text-copies [data-testid="copy"]')
        assert {i.get_attribute("data-transform") for i in items if i.get_attribute("data-unchanged")} == unchanged
        assert driver.find_element(By.ID, "unchanged-help").is_displayed()
        assert "still counts" in driver.find_element(By.ID, "unchanged-help").text
        assert "frame " in driver.find_element(By.ID, "generate-meta").text
        frame_help = driver.find_element(By.ID, "frame-help")
        assert frame_help.is_displayed() and "same seed" in frame_help.text and "swapped" in frame_help.text

    @pytest.mark.parametrize("model", ["dqn-cartpole", "dqn-acrobot", "dqn-grid"])
    def test_act_example_is_a_start_state_the_server_answers_by_name(
        driver: WebDriver, server: str, model: str, console: list[str]
    ) -> None:
        import gymnasium

        from app.tasks.act.envs import EXAMPLE_SEED  # registers the grid world

        card = next(c for c in httpx.get(f"{server}/v1/models", timeout=30).json()["models"] if c["name"] == model)
        open_page(driver, server, model)
        summary = driver.find_element(By.ID, "act-summary")
        driver.find_element(By.ID, "act-example").click()
        wait_for(driver, lambda d: summary.get_attribute("data-action") is not None)
        assert error_shown(driver, "act") is None
        sent = json.loads(driver.find_element(By.ID, "observation").get_attribute("value"))
        reset, _ = gymnasium.make(card["env"]).reset(seed=EXAMPLE_SEED)  # gymnasium's own start state
        assert np.array_equal(np.asarray(sent, dtype=np.float32), reset)
        expected = httpx.post(f"{server}/v1/models/{model}/act", json={"observations": [sent]}, timeout=60)
        assert expected.status_code == 200, expected.text
        result = expected.json()["results"][0]
        names = card["actions"]
        assert len(names) == len(result["q_values"]) and not any(n.startswith("action ") for n in names)
        assert summary.find_element(By.CSS_SELECTOR, '[data-testid="action"]').text == names[result["action"]]
        cards = driver.find_elements(By.CSS_SELECTOR, '#act-copies [data-testid="copy"]')
        assert [c.find_element(By.CSS_SELECTOR, ".own").text for c in cards] == [
            f"its action: {names[t['action']]}" for t in result["transforms"]
        ]
        assert driver.find_element(By.ID, "grid-canvas").is_displayed() == (model == "dqn-grid")

    # -- translate and act, on the shipped models ---------------------------------------------

    def test_translate_panel_shows_what_the_served_model_answers(
        driver: WebDriver, server: str, console: list[str]
    ) -> None:
        open_page(driver, server, "scan-gru-addjump-verb")
        driver.find_element(By.CSS_SELECTOR, "#translate-form button[type=submit]").click()
        wait_for(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, '[data-testid="translation"]')) == 2)
        commands = ["jump twice after walk left", "run around right"]  # the form's example commands
        expected = httpx.post(f"{server}/v1/models/scan-gru-addjump-verb/translate", timeout=60,
                              json={"commands": commands, "method": "equizero"}).json()  # fmt: skip
        blocks = driver.find_elements(By.CSS_SELECTOR, '[data-testid="translation"]')
        for block, result in zip(blocks, expected["results"], strict=True):
            assert block.find_element(By.CSS_SELECTOR, '[data-testid="actions"]').text == result["actions"]
            cards = block.find_elements(By.CSS_SELECTOR, '[data-testid="copy"]')
            assert [(c.get_attribute("data-transform"), float(c.get_attribute("data-lambda"))) for c in cards] == [
                (t["name"], t["lambda"]) for t in result["transforms"]
            ]
            chosen = [c.get_attribute("data-transform") for c in cards if "selected" in c.get_attribute("class")]
            assert chosen == [result["selected_transform"]]
        assert "run twice after walk left" in blocks[0].text  # the swapped copy's command

    def test_act_panel_balances_the_pole_with_the_served_agent(
        driver: WebDriver, server: str, console: list[str]
    ) -> None:
        open_page(driver, server, "dqn-cartpole")
        Select(driver.find_element(By.ID, "episode-speed")).select_by_value("0")
        driver.find_element(By.ID, "episode-play").click()
        status = driver.find_element(By.CSS_SELECTOR, '[data-testid="episode"]')
        wait_for(driver, lambda d: status.get_attribute("data-done") == "true", timeout=120)
        # The shipped agent solves CartPole (greedy return 500 on 20 seeded gymnasium episodes), and
        # the page's CartPole is gymnasium's (the test above): it must solve the page's episode too.
        steps = int(status.get_attribute("data-steps"))
        assert steps >= 475 and f"return {steps}" in status.text
        cards = driver.find_elements(By.CSS_SELECTOR, '#act-copies [data-testid="copy"]')
        assert [c.get_attribute("data-transform") for c in cards] == ["identity", "reflect"]
        # the actions by the names the card gives them, never "action 0"
        summary = driver.find_element(By.ID, "act-summary")
        action = summary.find_element(By.CSS_SELECTOR, '[data-testid="action"]').text
        assert action == ["left", "right"][int(summary.get_attribute("data-action"))]
        assert "Q-values: left " in summary.text and ", right " in summary.text
        assert all(c.find_element(By.CSS_SELECTOR, ".own").text in ("its action: left", "its action: right")
                   for c in cards)  # fmt: skip

    # -- classify ------------------------------------------------------------------------------

    def test_classify_shows_what_the_api_answers(
        driver: WebDriver, server: str, cat_png: Path, console: list[str]
    ) -> None:
        open_page(driver, server, "tiny")
        options = [o.get_attribute("value") for o in driver.find_elements(By.CSS_SELECTOR, "select[name=model] option")]
        assert sorted(options) == [
            "dqn-acrobot", "dqn-cartpole", "dqn-grid", "imagenet-effnet-c4", "scan-gru-addjump-verb", "tiny", "tiny-d4",
            "tinyclip", "tinylm",
        ]  # fmt: skip
        assert not driver.find_element(By.ID, "labels").is_displayed()  # fixed labels
        assert driver.find_element(By.ID, "classify").is_displayed()
        for panel in ("generate", "translate", "act"):  # no such model is served here
            assert not driver.find_element(By.ID, panel).is_displayed()
        data = cat_png.read_bytes()
        upload(driver, cat_png)
        for method in ("equitune", "lambda", "equizero", "vanilla"):  # equitune: the model's default
            if method != "equitune":
                choose_method(driver, method)
            page = answer(driver, method)
            assert len(page["copies"]) == 4
            assert_matches_api(page, api_classify(server, "tiny", data, method))

    def test_rotating_the_input_keeps_the_answer(
        driver: WebDriver, server: str, cat_png: Path, console: list[str]
    ) -> None:
        open_page(driver, server, "tiny")
        choose_method(driver, "lambda")  # a trained λ-net: the weights tell the copies apart
        upload(driver, cat_png)
        before = answer(driver, "lambda")
        driver.find_element(By.ID, "rotate").click()
        after = answer(driver, "lambda", rotations=1)
        check = driver.find_element(By.CSS_SELECTOR, '[data-testid="rotation-check"]')
        assert check.is_displayed() and check.get_attribute("data-unchanged") == "true"
        assert after["label"] == before["label"]
        assert after["score"] == pytest.approx(before["score"], abs=1e-5)
        # The page turned the pixels losslessly and counter-clockwise, as the group's rot90:
        # the server answers the numpy-rotated photo exactly as it answered the page ...
        rotated = png_bytes(np.ascontiguousarray(np.rot90(photo("chelsea"))))
        assert_matches_api(after, api_classify(server, "tiny", rotated, "lambda"))
        # ... and the new copy g is the old copy g·rot90.
        old = dict(before["copies"])
        following = {"identity": "rot90", "rot90": "rot180", "rot180": "rot270", "rot270": "identity"}
        for name, weight in after["copies"]:
            assert weight == pytest.approx(old[following[name]], abs=1e-5)

    def test_zero_shot_model_takes_the_labels_field(
        driver: WebDriver, server: str, cat_png: Path, console: list[str]
    ) -> None:
        open_page(driver, server, "tinyclip")
        field = driver.find_element(By.ID, "labels")
        assert field.is_displayed()
        field.clear()
        field.send_keys("tabby cat, teapot, rocket")
        upload(driver, cat_png)
        page = answer(driver, "equizero")
        labels = ["tabby cat", "teapot", "rocket"]
        assert_matches_api(page, api_classify(server, "tinyclip", cat_png.read_bytes(), "equizero", labels=labels))
        assert len(driver.find_elements(By.CSS_SELECTOR, "#topk li")) == 3

    def test_copies_are_drawn_as_the_group_acts(
        driver: WebDriver, server: str, cat_png: Path, console: list[str]
    ) -> None:
        open_page(driver, server, "tiny-d4")
        upload(driver, cat_png)
        page = answer(driver, "equitune")
        group = image_group("d4")
        assert [name for name, _ in page["copies"]] == group.names
        urls = driver.execute_script(
            "return [...document.querySelectorAll('[data-testid=\"copy\"] canvas')].map(c => c.toDataURL());"
        )
        pictures = [torch.from_numpy(decode_data_url(u)).permute(2, 0, 1) for u in urls]
        identity = pictures[0]
        for g, picture in enumerate(pictures):
            errors = [float((group.act(identity, h) - picture).abs().mean()) for h in range(group.order)]
            assert int(np.argmin(errors)) == g, (group.names[g], errors)
            assert errors[g] < 2.0, (group.names[g], errors)  # resampling of the thumbnail only

    def test_example_photo_on_the_real_model_and_screenshot(
        driver: WebDriver, server: str, tmp_path: Path, console: list[str]
    ) -> None:
        open_page(driver, server, "imagenet-effnet-c4")
        driver.find_element(By.CSS_SELECTOR, ".example[data-src$='rocket.jpg']").click()
        page = answer(driver, "equitune")
        jpeg = (EXAMPLES / "rocket.jpg").read_bytes()
        assert_matches_api(page, api_classify(server, "imagenet-effnet-c4", jpeg, "equitune", "image/jpeg"))
        driver.find_element(By.ID, "rotate").click()
        after = answer(driver, "equitune", rotations=1)
        assert after["label"] == page["label"]
        assert (
            driver.find_element(By.CSS_SELECTOR, '[data-testid="rotation-check"]').get_attribute("data-unchanged")
            == "true"
        )
        # The browser decoded the JPEG as Pillow does: its rotated PNG gets the API's answer.
        rotated = np.rot90(np.asarray(Image.open(EXAMPLES / "rocket.jpg").convert("RGB")))
        assert_matches_api(after, api_classify(server, "imagenet-effnet-c4", png_bytes(np.ascontiguousarray(rotated)),
                                               "equitune"))  # fmt: skip
        target = Path(os.environ.get("EQUISERVE_WEB_SCREENSHOT") or tmp_path / "web.png")
        height = driver.execute_script("return document.documentElement.scrollHeight")
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": 1280, "height": height, "scale": 1},
        })  # fmt: skip
        target.write_bytes(base64.b64decode(shot["data"]))
        with Image.open(target) as image:
            assert image.size[0] == 1280 and image.size[1] >= 800

    def test_errors_show_the_api_message(driver: WebDriver, server: str, cat_png: Path, console: list[str]) -> None:
        console.append("status of 422")
        open_page(driver, server, "tiny")
        driver.find_element(By.ID, "top-k").send_keys("9")  # the tiny model has 3 labels
        upload(driver, cat_png)
        response = httpx.post(f"{server}/v1/models/tiny/classify", files={"image": ("a.png", cat_png.read_bytes())},
                              data={"method": "equitune", "top_k": "9"})  # fmt: skip
        assert response.status_code == 422
        message = response.json()["error"]["message"]
        box = driver.find_element(By.CSS_SELECTOR, '#classify [data-testid="error"]')
        wait_for(driver, lambda d: box.is_displayed())
        assert box.text.startswith(message) and "invalid_input" in box.text

    def test_phone_width_and_keyboard(driver: WebDriver, server: str, console: list[str]) -> None:
        driver.set_window_size(390, 844)
        try:
            open_page(driver, server, "tiny")
            driver.find_element(By.TAG_NAME, "h1").click()
            for _ in range(30):  # Tab through the page to the first example photo, then press Enter
                focused = driver.switch_to.active_element
                if "example" in (focused.get_attribute("class") or ""):
                    break
                ActionChains(driver).send_keys(Keys.TAB).perform()
            assert "cat.jpg" in (focused.get_attribute("data-src") or ""), "no example photo reachable by Tab"
            focused.send_keys(Keys.ENTER)
            answer(driver, "equitune")
            width = driver.execute_script("return window.innerWidth")
            assert driver.execute_script("return document.documentElement.scrollWidth") <= width
            rects = driver.execute_script(
                "return [...document.querySelectorAll('[data-testid=\"copy\"], select[name], #rotate, #prediction')]"
                ".map(e => e.getBoundingClientRect()).map(r => [r.left, r.right, r.width]);"
            )
            assert len(rects) == 4 + 2 + 2
            assert all(left >= 0 and right <= width and w > 40 for left, right, w in rects), rects
        finally:
            driver.set_window_size(1280, 1000)

    # -- generate ------------------------------------------------------------------------------

    def test_generate_streams_the_api_answer(driver: WebDriver, server: str, console: list[str]) -> None:
        open_page(driver, server, "tinylm")
        assert driver.find_element(By.ID, "generate").is_displayed()
        form = driver.find_element(By.ID, "generate-form")
        prompt = form.find_element(By.NAME, "prompt")
        prompt.clear()
        prompt.send_keys("The man said he")
        form.find_element(By.NAME, "max_new_tokens").send_keys("6")
        form.find_element(By.NAME, "temperature").send_keys("0")
        choose_method(driver, "lambda")
        prompt.send_keys(Keys.CONTROL, Keys.ENTER)  # the keyboard shortcut submits
        output = driver.find_element(By.CSS_SELECTOR, '[data-testid="generated"]')
        wait_for(driver, lambda d: output.get_attribute("data-done") == "true")
        expected = httpx.post(
            f"{server}/v1/models/tinylm/generate",
            json={"prompt": "The man said he", "max_new_tokens": 6, "temperature": 0, "method": "lambda"},
            timeout=60,
        ).json()
        assert output.get_attribute("textContent") == expected["text"]
        items = driver.find_elements(By.CSS_SELECTOR, '#text-copies [data-testid="copy"]')
        page = [(i.get_attribute("data-transform"), float(i.get_attribute("data-lambda"))) for i in items]
        assert page == [(t["name"], t["lambda"]) for t in expected["transforms"]]
        assert abs(sum(w for _, w in page) - 1) < 1e-6
        swapped = {i.get_attribute("data-transform"): i.find_element(By.CSS_SELECTOR, ".swapped").text for i in items}
        assert swapped["identity"] == "The man said he"
        # each copy's prompt as the server ran it: the whole word list swapped, not only the named pair
        assert swapped["swap:man<->woman"] == "The woman said she"
        timing = driver.find_element(By.CSS_SELECTOR, '#generate [data-testid="timing"]').text
        assert "queue" in timing and "batch size 1" in timing

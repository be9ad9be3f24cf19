"""The one generic route, ``POST /v1/models/{name}/{task}``, for every registered task: its answer,
the API key checked before the body is read, the model and task checks, and JSON errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.tasks import TASKS, task_http
from tests.apptools import make_settings, serving
from tests.tasktools import EXAMPLES, write_every_task

KEY = "s3cret"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_every_task(tmp_path_factory.mktemp("every-task"))


@pytest.mark.parametrize("task", list(TASKS))
async def test_every_task_is_served_by_the_one_route(models_dir: Path, task: str) -> None:
    example = EXAMPLES[task]
    url = f"/v1/models/{example.model}/{task}"
    auth = {"authorization": f"Bearer {KEY}"}
    async with serving(make_settings(models_dir, api_key=KEY, warmup=False)) as (client, app):
        r = await client.post(url, json=example.body(), headers=auth)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == example.model and body["timing"]["batch_size"] >= 1
        # the answer is what the task's answer type documents, and only that
        documented = app.openapi()["paths"][url]["post"]["responses"]["200"]
        schema = documented["content"]["application/json"]["schema"]
        assert set(body) == set(schema["properties"]) and set(schema["required"]) <= set(body)

        # the key is checked before the body is read: a malformed body without it is a 401
        r = await client.post(url, content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        if task_http(task).v2 is not None:  # the same for the Open Inference Protocol's route
            r = await client.post(f"/v2/models/{example.model}/infer", content=b"{not json")
            assert r.status_code == 401 and "API key" in r.json()["error"]
        r = await client.post(url, content=b"{not json", headers={**auth, "content-type": "application/json"})
        assert r.status_code in (415, 422) and r.json()["error"]["message"], r.text
        r = await client.post(f"/v1/models/nope/{task}", json=example.body(), headers=auth)
        assert r.status_code == 404 and "not served" in r.json()["error"]["message"]
        other = next(t for t in TASKS if t != task)
        r = await client.post(f"/v1/models/{example.model}/{other}", json=EXAMPLES[other].body(), headers=auth)
        assert r.status_code == 404 and f"serves task '{task}'" in r.json()["error"]["message"]
        metrics = (await client.get("/metrics")).text
        assert f'equiserve_requests_total{{endpoint="{task}",model="{example.model}",status="200"}} 1.0' in metrics


def test_every_task_documents_its_route() -> None:
    from app.server import create_app

    paths = create_app(make_settings(Path("."))).openapi()["paths"]
    for task in TASKS:
        operation = paths[f"/v1/models/{{name}}/{task}"]["post"]
        assert operation["summary"] == task_http(task).summary
        assert {"200", "401", "404", "413", "422", "429", "503", "504"} <= set(operation["responses"])
        assert "content" in operation["requestBody"] and json.dumps(operation["requestBody"])


async def test_the_access_log_escapes_what_the_request_puts_in_it(
    models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A percent-encoded newline or NUL in the path decodes to one: it must not start a forged line."""
    import logging

    async with serving(make_settings(models_dir, warmup=False)) as (client, _):
        with caplog.at_level(logging.INFO, logger="equiserve.access"):
            r = await client.post("/v1/models/x%0Arequest_id=forged%20GET%20%2F%20status=200%00/classify", json={})
            assert r.status_code == 404
        lines = [rec.getMessage() for rec in caplog.records if rec.name == "equiserve.access"]
        (line,) = [m for m in lines if "forged" in m]
        assert "\n" not in line and "\x00" not in line and "\\n" in line and "\\x00" in line

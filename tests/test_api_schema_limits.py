"""GET /openapi.json states the limits the server enforces: once the models are loaded it has one
path per served model with that model's request schema, and a request at each boundary the
document states is answered while one past it is refused. The numbers are read from the
document, so that it and the checks cannot drift apart.

(tests/test_api_schema_fuzz.py runs schemathesis over the same document, with every check.)"""

from __future__ import annotations

import base64
import itertools
import json
import math
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from app.errors import UndecodableImage
from app.server import create_app
from app.tasks import TASKS
from app.tasks.http import WHITESPACE, portable_pattern
from app.tasks.translate.scan import COMMAND_PATTERN, translations
from tests.apptools import make_settings, serving, set_limits
from tests.tasktools import EXAMPLES, grey_png, write_every_task

PNG = base64.b64encode(grey_png()).decode()
Schema = dict[str, Any]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_every_task(tmp_path_factory.mktemp("every-task"))


@pytest.fixture
async def client(models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[httpx.AsyncClient]:
    # Small limits keep the requests at the boundaries cheap; the prompt's characters are set
    # so that its token limits (which no schema can state) never bind first.
    set_limits(monkeypatch, "classify", max_images=3)
    set_limits(monkeypatch, "embed", max_images=2)
    set_limits(monkeypatch, "translate", max_commands=4)
    set_limits(monkeypatch, "act", max_observations=3, max_abs_value=1000)
    set_limits(monkeypatch, "generate", max_prompt_chars=16)
    async with serving(make_settings(models_dir, warmup=False)) as (client, _):
        yield client


async def document(client: httpx.AsyncClient) -> Schema:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    return response.json()


def body_schema(doc: Schema, path: str, media: str = "application/json") -> Schema:
    return doc["paths"][path]["post"]["requestBody"]["content"][media]["schema"]


def field(schema: Schema, name: str) -> Schema:
    """A property's schema, its ``null`` branch left out."""
    prop = schema["properties"][name]
    branches = [b for b in prop.get("anyOf", [prop]) if b.get("type") != "null"]
    assert len(branches) == 1, prop
    return branches[0]


async def status(client: httpx.AsyncClient, path: str, body: Any) -> int:
    return (await client.post(path, json=body)).status_code


def valid(schema: Schema, body: Any) -> bool:
    return jsonschema.Draft202012Validator(schema).is_valid(body)


async def assert_boundary(client: httpx.AsyncClient, path: str, schema: Schema, at: Any, past: Any) -> None:
    """``at`` is valid by the document and answered; ``past`` is invalid by it and refused."""
    assert valid(schema, at), at
    assert not valid(schema, past), past
    ok = await client.post(path, json=at)
    assert ok.status_code == 200, ok.text
    refused = await client.post(path, json=past)
    assert 400 <= refused.status_code < 500, refused.text


async def test_the_document_has_one_path_per_served_model_and_only_those(client: httpx.AsyncClient) -> None:
    paths = (await document(client))["paths"]
    assert {p for p in paths if p.startswith("/v1/models/") and p.count("/") == 4} == {
        f"/v1/models/{EXAMPLES[task].model}/{task}" for task in TASKS
    }
    assert {p for p in paths if p.endswith("/infer")} == {
        f"/v2/models/{m}/infer" for m in ("tiny", "tiny-embed", "tinylm")
    }
    assert not any("{name}" in p and p.startswith("/v1/") for p in paths)
    ready = paths["/v2/models/{name}/ready"]["get"]["parameters"][0]["schema"]
    assert sorted(ready["enum"]) == ["tiny", "tiny-embed", "tinylm"]
    # every example in the document is valid by its own schema
    for path, item in paths.items():
        for content in item.get("post", {}).get("requestBody", {}).get("content", {}).values():
            for example in content.get("examples", {}).values():
                assert valid(content["schema"], example["value"]), (path, example)


def test_while_loading_the_document_has_the_templated_routes() -> None:
    paths = create_app(make_settings(Path("."))).openapi()["paths"]
    assert all(f"/v1/models/{{name}}/{task}" in paths for task in TASKS) and "/v2/models/{name}/infer" in paths


async def test_classify_images_top_k_and_methods_at_their_limits(client: httpx.AsyncClient) -> None:
    path = "/v1/models/tiny/classify"
    doc = await document(client)
    schema = body_schema(doc, path)
    most = schema["properties"]["images"]["maxItems"]
    assert most == 3
    images = [{"b64": PNG}] * most
    await assert_boundary(client, path, schema, {"images": images}, {"images": [*images, {"b64": PNG}]})
    top_k = field(schema, "top_k")
    await assert_boundary(
        client,
        path,
        schema,
        {"images": images[:1], "top_k": top_k["maximum"]},
        {"images": images[:1], "top_k": top_k["maximum"] + 1},
    )
    for method in field(schema, "method")["enum"]:
        assert await status(client, path, {"images": images[:1], "method": method}) == 200
    assert schema["properties"]["labels"]["type"] == "null"  # its labels are fixed: labels is refused
    assert await status(client, path, {"images": images[:1], "labels": ["cat"]}) == 422
    # the form takes as many files
    form = body_schema(doc, path, "multipart/form-data")
    files = [
        ("image", (f"{i}.png", grey_png(), "image/png")) for i in range(form["properties"]["image"]["maxItems"] + 1)
    ]
    assert (await client.post(path, files=files[:-1])).status_code == 200
    assert (await client.post(path, files=files)).status_code == 413
    assert (await client.post(path, files=files[:1], data={"colour": "red"})).status_code == 422


async def test_embed_images_at_their_limit(client: httpx.AsyncClient) -> None:
    path = "/v1/models/tiny-embed/embed"
    schema = body_schema(await document(client), path)
    images = [{"b64": PNG}] * schema["properties"]["images"]["maxItems"]
    await assert_boundary(client, path, schema, {"images": images}, {"images": [*images, {"b64": PNG}]})
    assert "equizero" not in field(schema, "method")["enum"]  # the embedder does not serve it


def test_the_documented_base64_is_what_the_server_decodes() -> None:
    from app.tasks.classify.http import BASE64_PATTERN, decode_image_base64

    pattern = re.compile(BASE64_PATTERN)
    for n in range(10):
        for text in map("".join, itertools.product("A/=", repeat=n)):
            try:
                decode_image_base64(text, 100)
                decodes = True
            except UndecodableImage:
                decodes = False
            assert decodes == bool(pattern.search(text)), text
    with pytest.raises(UndecodableImage):
        decode_image_base64(PNG + "\n", 1000)


def test_a_zero_shot_label_is_documented_as_the_model_strips_it() -> None:
    """Non-blank and at most max_label_chars once stripped (Python's whitespace), as the model checks."""
    from app.tasks.classify.http import label_list
    from app.tasks.classify.settings import ClassifyLimits

    pattern = re.compile(label_list(ClassifyLimits(max_label_chars=3))["items"]["pattern"])
    pieces = ["", " ", "\u3000", "\n", "a", "é", "b c", "abcd", "\u200b"]
    for parts in itertools.product(pieces, repeat=3):
        label = "".join(parts)
        assert bool(pattern.search(label)) == (0 < len(label.strip()) <= 3), repr(label)


async def test_generate_options_at_their_limits(client: httpx.AsyncClient) -> None:
    path = "/v1/models/tinylm/generate"
    schema = body_schema(await document(client), path)
    base = {"prompt": "The man", "temperature": 0, "max_new_tokens": 1}
    longest = schema["properties"]["prompt"]["maxLength"]
    assert longest == 16
    await assert_boundary(
        client, path, schema, {**base, "prompt": "a" * longest}, {**base, "prompt": "a" * (longest + 1)}
    )
    for name in ("max_new_tokens", "top_k", "seed"):
        most = field(schema, name)["maximum"]
        await assert_boundary(client, path, schema, {**base, name: most}, {**base, name: most + 1})
    assert field(schema, "seed")["maximum"] == 2**63 - 1
    hottest = schema["properties"]["temperature"]["anyOf"][0]["maximum"]
    await assert_boundary(
        client, path, schema, {**base, "temperature": hottest}, {**base, "temperature": hottest + 0.5}
    )
    # the smallest temperature over 0 (subnormal) samples, as greedy would: no 500 (found by schemathesis)
    assert await status(client, path, {**base, "temperature": 5e-324, "max_new_tokens": 2}) == 200
    # JSON Schema's types, as the server reads them: an integral number is an integer, a string is not
    assert await status(client, path, {**base, "max_new_tokens": 1.0}) == 200
    assert await status(client, path, {**base, "max_new_tokens": "1"}) == 422
    assert await status(client, path, {**base, "stream": 1}) == 422


async def test_generate_v2_parameters_at_their_limits(client: httpx.AsyncClient) -> None:
    path = "/v2/models/tinylm/infer"
    schema = body_schema(await document(client), path)
    most = schema["properties"]["parameters"]["anyOf"][0]["properties"]["max_new_tokens"]
    most = next(b for b in most["anyOf"] if b.get("type") == "integer")["maximum"]

    def body(prompt: str, new_tokens: int) -> Schema:
        parameters = {"max_new_tokens": new_tokens, "temperature": 0}
        return {
            "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": [prompt]}],
            "parameters": parameters,
        }

    await assert_boundary(client, path, schema, body("The man", most), body("The man", most + 1))
    await assert_boundary(client, path, schema, body("a" * 16, 1), body("a" * 17, 1))
    assert not valid(schema, {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": []}]})


async def test_translate_commands_at_their_limit_and_in_the_grammar(client: httpx.AsyncClient) -> None:
    path = "/v1/models/tiny-scan/translate"
    schema = body_schema(await document(client), path)
    commands = schema["properties"]["commands"]
    await assert_boundary(
        client,
        path,
        schema,
        {"commands": ["jump"] * commands["maxItems"]},
        {"commands": ["jump"] * (commands["maxItems"] + 1)},
    )
    pattern = re.compile(commands["items"]["pattern"])
    accepted = ["jump", " walk  around left twice\tand run\n", "turn opposite right thrice after look\u2003left"]
    refused = ["", "   ", "jump jump", "turn", "jump twice twice", "fly", "walk and", "jump\u200btwice"]
    for command in accepted + refused:
        assert bool(pattern.search(command)) == (command in accepted), command
        answered = await status(client, path, {"commands": [command]})
        assert answered == (200 if command in accepted else 422), command


def test_a_word_limit_shorter_than_scan_joins_the_grammar() -> None:
    from app.tasks.translate.http import command_schema

    schema = command_schema(4)
    commands = sorted(c for c in translations() if len(c.split()) in (4, 5))
    assert commands and all(valid(schema, c) == (len(c.split()) <= 4) for c in commands[::10])
    # SCAN's longest command has 9 words: from there the grammar alone is the limit
    assert command_schema(9)["pattern"] == portable_pattern(COMMAND_PATTERN) and "allOf" not in command_schema(9)


async def test_act_observations_at_their_limits(client: httpx.AsyncClient) -> None:
    path = "/v1/models/tiny-agent/act"
    schema = body_schema(await document(client), path)
    observations = schema["properties"]["observations"]
    state, dim = observations["items"], observations["items"]["minItems"]
    assert dim == state["maxItems"] == 4  # CartPole's state
    zero = [0.0] * dim
    await assert_boundary(client, path, schema, {"observations": [zero]}, {"observations": [[*zero, 0.0]]})
    await assert_boundary(client, path, schema, {"observations": [zero]}, {"observations": [zero[1:]]})
    most = observations["maxItems"]
    await assert_boundary(client, path, schema, {"observations": [zero] * most}, {"observations": [zero] * (most + 1)})
    bound = state["items"]["maximum"]
    assert bound == 1000 and state["items"]["minimum"] == -bound
    edge = [bound, -bound, 0.0, 0.0]
    await assert_boundary(
        client,
        path,
        schema,
        {"observations": [edge]},
        {"observations": [[math.nextafter(bound, math.inf), 0.0, 0.0, 0.0]]},
    )


async def test_the_event_stream_of_generate_is_described_event_by_event(client: httpx.AsyncClient) -> None:
    doc = await document(client)
    stream = doc["paths"]["/v1/models/tinylm/generate"]["post"]["responses"]["200"]["content"]["text/event-stream"]
    item = stream["itemSchema"]
    assert "type" not in stream["schema"]  # 3.1 reads the body, 3.2 the array of events: it holds either
    assert item["properties"]["event"]["enum"] == ["token", "done", "error"]
    schemas = {b["properties"]["event"]["const"]: b["properties"]["data"]["contentSchema"] for b in item["oneOf"]}
    response = await client.post(
        "/v1/models/tinylm/generate", json={"prompt": "The man", "max_new_tokens": 3, "stream": True}
    )
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [
        (part.split("\n")[0].removeprefix("event: "), json.loads(part.split("\n")[1].removeprefix("data: ")))
        for part in response.text.strip().split("\n\n")
    ]
    assert [kind for kind, _ in events] == ["token"] * 3 + ["done"]
    for kind, data in events:
        assert valid(item, {"event": kind, "data": json.dumps(data)})
        assert valid(schemas[kind], data), (kind, data)
    assert not valid(schemas["token"], events[-1][1])


async def test_the_document_is_openapi_3_2_and_3_1_but_for_item_schema(client: httpx.AsyncClient) -> None:
    """Valid by OpenAPI 3.2's meta-schema, and by 3.1's once 3.2's one addition (itemSchema, which
    3.1 tools skip and read ``schema`` instead) is taken out."""
    from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR, OPENAPI_32_VALIDATOR

    doc = await document(client)
    assert doc["openapi"].startswith("3.1")

    def without_item_schema(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: without_item_schema(v) for k, v in node.items() if k != "itemSchema"}
        return [without_item_schema(v) for v in node] if isinstance(node, list) else node

    assert OPENAPI_32_VALIDATOR.is_valid({**doc, "openapi": "3.2.0"})
    assert OPENAPI_31_VALIDATOR.is_valid(without_item_schema(doc))
    assert not OPENAPI_31_VALIDATOR.is_valid(doc)  # the check can fail: itemSchema is 3.2's


def test_whitespace_is_what_python_splits_on() -> None:
    spaces = re.compile(f"[{WHITESPACE}]")
    assert [c for c in map(chr, range(0x110000)) if c.isspace()] == [
        c for c in map(chr, range(0x110000)) if spaces.fullmatch(c)
    ]

"""/docs and /redoc work offline: every asset they load is served by the app itself."""

from __future__ import annotations

import re
from pathlib import Path

from tests.apptools import make_settings, serving


async def test_docs_pages_load_nothing_from_another_host(tiny_models_dir: Path) -> None:
    async with serving(make_settings(tiny_models_dir, warmup=False)) as (client, _):
        for page in ("/docs", "/redoc"):
            r = await client.get(page)
            assert r.status_code == 200 and "text/html" in r.headers["content-type"]
            assert not re.search(r"(src|href)=[\"']?(https?:)?//", r.text), f"{page} loads from another host"
            assets = re.findall(r"(?:src|href)=[\"']?(/[^\"' >]+)", r.text)
            assert any(a.endswith(".js") for a in assets)
            for asset in assets:
                served = await client.get(asset)
                assert served.status_code == 200 and len(served.content) > 100, asset
        assert (await client.get("/docs-assets/../../etc/passwd")).status_code == 404
        assert (await client.get("/docs-assets/nope.js")).status_code == 404
        assert (await client.get("/openapi.json")).json()["info"]["title"] == "equiserve"


async def test_every_operation_has_its_own_id(tmp_path: Path) -> None:
    """OpenAPI requires unique operationIds (clients generated from the document name their
    methods by them): GET and HEAD of the health routes (one route, two methods), and each served model's own paths."""
    from tests.imagetools import write_tiny_model

    write_tiny_model(tmp_path)
    write_tiny_model(tmp_path, "tiny-two")
    async with serving(make_settings(tmp_path)) as (client, _):
        document = (await client.get("/openapi.json")).json()
    ids = [operation["operationId"] for item in document["paths"].values() for operation in item.values()]
    assert len(ids) == len(set(ids)) and len(ids) > 10, sorted(ids)
    assert {"get", "head"} <= set(document["paths"]["/health/ready"])

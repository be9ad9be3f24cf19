"""``POST /v1/models/{name}/translate`` on a shipped SCAN model: the answer of every equivariant
method commutes with the group over HTTP, the diagnostics, clear refusals, the model list."""

from __future__ import annotations

import math

import pytest

from app.tasks.translate.groups import command_copies, scan_group
from app.tasks.translate.scan import split
from app.tasks.translate.vocab import ACTIONS_VOCAB
from tests.apptools import ROOT, make_settings, serving, set_limits

MODELS = ROOT / "models"
NAME = "scan-gru-addjump"  # group verb4
# test-split commands (jump in compositions never trained), training-split ones, and fixed points
COMMANDS = ["jump twice after walk left", "run opposite right thrice", "look around left and turn right", "turn left"]


def _act_on_actions(actions: str, g: int) -> str:
    group = scan_group("verb4")
    ids = ACTIONS_VOCAB.encode(actions.split()) if actions else []
    return " ".join(ACTIONS_VOCAB.decode(group.act_output(ids, g)))


@pytest.mark.parametrize("method", ["equitune", "equizero", "lambda"])
async def test_answers_over_http_commute_with_the_group(method: str) -> None:
    group = scan_group("verb4")
    async with serving(make_settings(MODELS, models=[NAME])) as (client, _):

        async def translate(commands: list[str]) -> list[dict]:
            response = await client.post(f"/v1/models/{NAME}/translate", json={"commands": commands, "method": method})
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["model"] == NAME and body["method"] == method and body["group"] == "verb4"
            return body["results"]

        base = await translate(COMMANDS)
        for result in base:
            assert len(result["transforms"]) == group.order and result["finished"]
            assert math.isclose(sum(t["lambda"] for t in result["transforms"]), 1.0, rel_tol=1e-5)
            assert (result["selected_transform"] is not None) == (method == "equizero")
        for g in range(group.order):
            moved = await translate([command_copies(group, c)[g] for c in COMMANDS])
            assert [r["actions"] for r in moved] == [_act_on_actions(r["actions"], g) for r in base], g


async def test_equizero_over_http_translates_compositions_vanilla_never_saw() -> None:
    # A fixed sample of Add Jump's test split (jump only alone in training), as the table measures it.
    pairs = sorted(split("add_jump").test)[::120][:64]
    async with serving(make_settings(MODELS, models=[NAME])) as (client, _):
        accuracy = {}
        for method in ("vanilla", "equizero"):
            body = {"commands": [c for c, _ in pairs], "method": method}
            results = (await client.post(f"/v1/models/{NAME}/translate", json=body)).json()["results"]
            accuracy[method] = sum(r["actions"] == a for r, (_, a) in zip(results, pairs, strict=True)) / len(pairs)
            if method == "equizero":  # the answer is the selected copy's own translation
                for r in results:
                    chosen = next(t for t in r["transforms"] if t["name"] == r["selected_transform"])
                    assert chosen["actions"] == r["actions"] and chosen["lambda"] == 1.0
    assert accuracy["vanilla"] <= 0.05 and accuracy["equizero"] >= 0.8, accuracy


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"commands": ["jump and fly"]}, 422, "unknown word 'fly' (word 3)"),
        ({"commands": ["walk", "and and and"]}, 422, "command 1 is not in SCAN's grammar: 'and' (word 1)"),
        ({"commands": ["walk"] * 3}, 413, "EQUISERVE_TRANSLATE_MAX_COMMANDS"),
        ({"commands": ["jump twice and walk twice after run"]}, 422, "7 words; the limit is 6"),
        ({"commands": ["  "]}, 422, "command 0 is empty"),
        ({"commands": ["walk"], "method": "best"}, 422, "best"),
        ({"commands": []}, 422, "commands"),
        ({"commands": "walk"}, 422, "commands"),
    ],
)
async def test_bad_requests_are_refused_with_what_was_wrong(
    body: dict, status: int, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_limits(monkeypatch, "translate", max_commands=2, max_command_words=6)
    settings = make_settings(MODELS, models=[NAME])
    async with serving(settings) as (client, _):
        response = await client.post(f"/v1/models/{NAME}/translate", json=body)
        assert response.status_code == status, response.text
        assert message in response.text
        ok = await client.post(f"/v1/models/{NAME}/translate", json={"commands": ["look twice and walk left"]})
        assert ok.status_code == 200 and ok.json()["results"][0]["actions"] == "I_LOOK I_LOOK I_TURN_LEFT I_WALK"
        missing = await client.post("/v1/models/nope/translate", json={"commands": ["walk"]})
        assert missing.status_code == 404


async def test_the_model_list_shows_the_translate_models() -> None:
    names = ["scan-gru-addjump", "scan-lstm-aroundright"]
    async with serving(make_settings(MODELS, models=names)) as (client, _):
        cards = {c["name"]: c for c in (await client.get("/v1/models")).json()["models"]}
    assert {c["task"] for c in cards.values()} == {"translate"}
    assert cards["scan-gru-addjump"]["group"] == "verb4" and cards["scan-lstm-aroundright"]["group"] == "direction"
    assert cards["scan-gru-addjump"]["split"] == "add_jump" and "I_JUMP" in cards["scan-gru-addjump"]["actions"]

"""The translate model: request validation, a mixed batch with per-copy diagnostics, the spec, the
``ServedModel`` plug (through the engine), the shipped models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError

from app.config import DEFAULT_MODELS_DIR
from app.equivariance import Method
from app.errors import InvalidInput, TooLarge
from app.tasks.base import LoadOptions, Timing
from app.tasks.translate.groups import scan_group
from app.tasks.translate.messages import TranslateRequest
from app.tasks.translate.model import DEFAULT_MAX_COMMANDS, TranslateModel
from app.tasks.translate.scan import split
from app.tasks.translate.spec import TranslateSpec
from tests.apptools import with_limits
from tests.translatetools import load_runner, one_thread, read_spec, write_tiny_translate_model  # noqa: F401 - one_thread is a fixture

pytestmark = pytest.mark.usefixtures("one_thread")
SHIPPED = sorted(p.parent.name for p in DEFAULT_MODELS_DIR.glob("scan-*/model.yaml"))


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> TranslateModel:
    return load_runner(write_tiny_translate_model(tmp_path_factory.mktemp("scan-models")))


@pytest.mark.parametrize(
    ("commands", "error", "message"),
    [
        ([], InvalidInput, "at least one command"),
        ("jump twice", InvalidInput, "at least one command"),
        (["jump"] * 65, TooLarge, "EQUISERVE_TRANSLATE_MAX_COMMANDS"),
        (["jump", 3], InvalidInput, "command 1 is not a string"),
        (["jump", "   "], InvalidInput, "command 1 is empty"),
        (
            ["jump twice and walk twice after run thrice and look"],
            InvalidInput,
            r"command 0 has 10 words; the limit is 9",
        ),
        (["walk", "jump and fly"], InvalidInput, r"command 1: unknown word 'fly' \(word 3\)"),
        (["Jump"], InvalidInput, "unknown word 'Jump'"),
        (["walk", "twice twice twice"], InvalidInput, r"command 1 is not in SCAN's grammar: 'twice' \(word 1\)"),
        (["and and and"], InvalidInput, r"'and' \(word 1\) cannot come at the start; expected walk \| look"),
        (["jump twice twice"], InvalidInput, r"'twice' \(word 3\) cannot come after 'twice'; expected and \| after"),
        (["walk around"], InvalidInput, r"ends too early after 'around'; expected left \| right"),
        (["turn"], InvalidInput, "ends too early after 'turn'"),
    ],
)
def test_bad_requests_name_the_problem(runner: TranslateModel, commands: object, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        runner.split(TranslateRequest(commands))  # type: ignore[arg-type]


def test_limits_and_methods_come_from_the_caller_and_the_spec(runner: TranslateModel) -> None:
    with pytest.raises(TooLarge, match="limit is 2"):
        with_limits(runner, max_commands=2).split(TranslateRequest(["jump"] * 3))
    assert (
        with_limits(runner, max_command_words=2).split(TranslateRequest(["jump  twice "] * 3))[0].command
        == "jump twice"
    )
    with pytest.raises(InvalidInput, match="method 'best' is not served"):
        runner.split(TranslateRequest(["jump"], method="best"))
    assert {i.method for i in runner.split(TranslateRequest(["jump"]))} == {Method.EQUIZERO}  # the default


def test_a_mixed_batch_answers_each_command_with_its_diagnostics(runner: TranslateModel) -> None:
    group = runner.group
    items = [
        item
        for method in ("vanilla", "equitune", "equizero", "lambda")
        for item in runner.split(TranslateRequest(["jump twice after walk left", "turn right"], method))
    ]
    results = runner(items)
    for item, result in zip(items, results, strict=True):
        assert not isinstance(result, BaseException)
        assert result.command == item.command
        assert all(a.startswith("I_") for a in result.actions.split())
        assert [t.name for t in result.transforms] == group.names
        assert sum(t.weight for t in result.transforms) == pytest.approx(1.0)
        assert (result.selected_transform is not None) == (item.method is Method.EQUIZERO)
        entropy = result.lambda_net_entropy
        assert entropy is not None and 0 <= entropy <= torch.log(torch.tensor(4.0)) + 1e-6
        if item.method is Method.VANILLA and item.command != "turn right":
            # the identity copy alone is the plain model (for a command no swap fixes: see
            # app.equivariance.sequence on the tokens a copy of a fixed command may write)
            assert result.actions == result.transforms[0].actions
        if item.method is Method.EQUIZERO:
            chosen = next(t for t in result.transforms if t.name == result.selected_transform)
            assert chosen.actions == result.actions
    # the swapped command's answer is the swapped answer (verb4: jump -> run -> walk -> look)
    swapped = runner(runner.split(TranslateRequest(["run twice after look left"], "lambda")))[0]
    original = next(r for i, r in zip(items, results, strict=True) if i.method is Method.LAMBDA)
    assert not isinstance(swapped, BaseException) and not isinstance(original, BaseException)
    translate = {"I_JUMP": "I_RUN", "I_RUN": "I_WALK", "I_WALK": "I_LOOK", "I_LOOK": "I_JUMP"}
    assert swapped.actions == " ".join(translate.get(a, a) for a in original.actions.split())


def test_respond_and_card(runner: TranslateModel) -> None:
    request = TranslateRequest(["jump"], "equitune")
    results = runner(runner.split(request))
    output = runner.respond(request, results, Timing(0.0, 0.01, 1))  # type: ignore[arg-type]
    assert (output.model, output.method, output.group) == ("tiny-scan", Method.EQUITUNE, "verb4")
    assert output.results == results
    card = runner.card_extras()
    assert card["split"] == "add_jump" and "jump" in card["command_words"] and card["max_actions"] == 12
    assert runner.backbone_name == "seq2seq-gru16-bi" and runner.transforms == scan_group("verb4").names
    runner.warmup(5)


def test_a_batch_that_fails_fails_each_of_its_items(runner: TranslateModel, monkeypatch: pytest.MonkeyPatch) -> None:
    items = runner.split(TranslateRequest(["jump", "walk"]))

    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(runner.model, "begin", broken)
    assert [str(r) for r in runner(items)] == ["boom", "boom"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"group": "colour"}, "unknown SCAN group"),
        ({"backbone": {"family": "mlp"}}, "seq2seq"),
        ({"backbone": {"family": "seq2seq", "options": {"layers": 2}}}, "unknown backbone options"),
        ({"backbone": {"family": "seq2seq", "options": {"cell": "transformer"}}}, "unknown cell"),
        ({"split": "simple"}, "split"),
        ({"combine": "max"}, "combine"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_bad_entries_are_refused(tmp_path: Path, change: dict, message: str) -> None:
    spec = yaml.safe_load((write_tiny_translate_model(tmp_path) / "model.yaml").read_text())
    with pytest.raises(ValidationError, match=message):
        TranslateSpec.model_validate({**spec, **change, "name": "x"})


def test_weights_that_do_not_fit_fail_with_the_file_named(tmp_path: Path) -> None:
    from app.repository import ModelLoadError

    folder = write_tiny_translate_model(tmp_path, cell="lstm")
    spec = yaml.safe_load((folder / "model.yaml").read_text())
    spec["backbone"]["options"]["cell"] = "gru"  # an LSTM's weights read as a GRU's
    (folder / "model.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ModelLoadError, match=r"seq2seq\.safetensors"):
        load_runner(folder)
    (folder / "seq2seq.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        load_runner(folder)


def test_uniform_lambda_without_a_trained_net(tmp_path: Path) -> None:
    runner = load_runner(write_tiny_translate_model(tmp_path, trained_lambda=False))
    assert not runner.lambda_trained
    result = runner(runner.split(TranslateRequest(["jump twice"], "lambda")))[0]
    assert not isinstance(result, BaseException)
    assert [t.weight for t in result.transforms] == pytest.approx([0.25] * 4)


async def test_served_through_the_engine(tmp_path: Path) -> None:
    """The ``ServedModel`` plug: the engine finds the task in app.tasks.TASKS."""
    from app.engine.engine import Engine
    from tests.apptools import make_settings

    write_tiny_translate_model(tmp_path, group="verb")
    engine = Engine(make_settings(tmp_path, memory_trim_idle_s=0))
    await engine.start()
    try:
        output = await engine.infer("tiny-scan", "translate", TranslateRequest(["jump twice", "walk"], "equizero"))
        assert output.group == "verb" and len(output.results) == 2
        assert [t.name for t in output.results[0].transforms] == ["identity", "jump<->run"]
        card = next(c for c in engine.cards() if c["name"] == "tiny-scan")
        assert card["task"] == "translate" and card["group"] == "verb" and card["split"] == "add_jump"
        with pytest.raises(InvalidInput, match="unknown word"):
            await engine.infer("tiny-scan", "translate", TranslateRequest(["fly"]))
    finally:
        await engine.stop()
    model = TranslateModel.load(tmp_path / "tiny-scan", read_spec(tmp_path / "tiny-scan"), LoadOptions(device="cpu"))
    assert model.card()["backbone"] == "seq2seq-gru16-bi"


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_models_translate_known_commands_and_their_method_generalizes(name: str) -> None:
    """Each shipped model on a sample: its held-out (in-distribution) commands right with vanilla; on the
    test split vanilla near 0 and the entry's default method far above it (bench/results/scan_table.md)."""
    from app.tasks.translate.training import held_out_split

    runner = load_runner(DEFAULT_MODELS_DIR / name)
    split_name = runner.spec.split or "add_jump"
    held = sorted(held_out_split(split_name, runner.spec.training["pretrain"]["held_out"])[1])[::20][:64]
    test = sorted(split(split_name).test)[::100][:64]

    def accuracy(pairs: list[tuple[str, str]], method: str) -> float:
        results = runner(runner.split(TranslateRequest([c for c, _ in pairs], method)))
        return sum(
            not isinstance(r, BaseException) and r.actions == a for r, (_, a) in zip(results, pairs, strict=True)
        ) / len(pairs)

    assert accuracy(held, "vanilla") >= 0.9
    assert accuracy(test, "vanilla") <= 0.1
    assert accuracy(test, runner.spec.default_method.value) >= 0.5


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_models_translate_short_commands(name: str) -> None:
    """Commands of 1-3 words, a few dozen of a split's thousands: every one the model was trained on right
    with vanilla, and the short test commands whose copies include a training command (Add Jump's
    ``jump twice``: ``walk twice``) right with the entry's default method."""
    from app.tasks.translate.groups import command_copies
    from app.tasks.translate.training import SHORT_WORDS, held_out_split

    runner = load_runner(DEFAULT_MODELS_DIR / name)
    split_name = runner.spec.split or "add_jump"
    train, _ = held_out_split(split_name, runner.spec.training["pretrain"]["held_out"])
    known = {c for c, _ in train}
    short_train = sorted({p for p in train if len(p[0].split()) <= SHORT_WORDS})
    short_test = sorted(
        p
        for p in set(split(split_name).test)
        if len(p[0].split()) <= SHORT_WORDS and known & set(command_copies(runner.group, p[0]))
    )
    assert len(short_train) >= 20 and short_test

    def wrong(pairs: list[tuple[str, str]], method: str) -> list[str]:
        step = DEFAULT_MAX_COMMANDS  # a request's limit
        chunks = [pairs[i : i + step] for i in range(0, len(pairs), step)]
        results = [r for c in chunks for r in runner(runner.split(TranslateRequest([x for x, _ in c], method)))]
        return [c for r, (c, a) in zip(results, pairs, strict=True) if isinstance(r, BaseException) or r.actions != a]

    assert len(wrong(short_train, "vanilla")) <= 0.05 * len(short_train), wrong(short_train, "vanilla")
    method = runner.spec.default_method.value
    assert len(wrong(short_test, method)) <= 0.1 * len(short_test), wrong(short_test, method)

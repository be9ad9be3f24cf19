"""Sequence methods: exact equivariance of equitune, equizero and λ on random and real commands
(commands the group fixes included), and the batched decode against a per-copy reference loop."""

from __future__ import annotations

import random

import pytest
import torch

from app.equivariance.lambda_net import LambdaNet
from app.equivariance.methods import Method, Mixture, ZeroLoss
from app.equivariance.sequence import Decoded, SequenceGroup, canonicalize, stabilizer
from app.tasks.translate.groups import scan_group
from app.tasks.translate.model import decode_commands
from app.tasks.translate.scan import all_pairs
from app.tasks.translate.seq2seq import Seq2Seq
from app.tasks.translate.vocab import ACTION_EOS, ACTION_SOS, COMMANDS
from tests.translatetools import one_thread, tiny_seq2seq  # noqa: F401 - one_thread is a fixture

MAX_LENGTH = 10
EQUIVARIANT = (Method.EQUITUNE, Method.EQUIZERO, Method.LAMBDA)
FIXED = ["turn left", "turn around right thrice", "walk twice", "look opposite left after turn right"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> Seq2Seq:
    return tiny_seq2seq()


@pytest.fixture(scope="module")
def lambda_net(model: Seq2Seq) -> LambdaNet:
    torch.manual_seed(1)
    return LambdaNet(model.feature_dim).eval()


def command_ids(seed: int, count: int) -> list[list[int]]:
    """Real SCAN commands, random word strings, and commands some swaps fix."""
    rng = random.Random(seed)
    real = [c for c, _ in rng.sample(all_pairs(), count)]
    noise = [" ".join(rng.choices(COMMANDS.tokens, k=rng.randint(1, 6))) for _ in range(count)]
    return [COMMANDS.encode(c.split()) for c in real + noise + FIXED]


def run(model: Seq2Seq, group: SequenceGroup, ids: list[list[int]], methods: list, lambda_net: LambdaNet, **kw):
    return decode_commands(model, group, ids, methods, max_length=MAX_LENGTH, lambda_net=lambda_net, **kw)


def act_input(group: SequenceGroup, ids: list[int], g: int) -> list[int]:
    value_map = group.input.value_maps[g].tolist()
    return [value_map[i] for i in ids]


@pytest.mark.parametrize("group_name", ["verb", "verb4", "direction", "verb4+direction"])
@pytest.mark.parametrize("method", EQUIVARIANT)
def test_translate_of_a_transformed_command_is_the_transformed_translation(
    model: Seq2Seq, lambda_net: LambdaNet, group_name: str, method: Method
) -> None:
    group = scan_group(group_name)
    ids = command_ids(sum(map(ord, group_name)), 12)
    base = run(model, group, ids, [method] * len(ids), lambda_net)
    rng = random.Random(0)
    for h in range(group.order):
        moved = [act_input(group, c, h) for c in ids]
        order = list(range(len(moved)))
        rng.shuffle(order)  # another batch, in another order
        out = run(model, group, [moved[i] for i in order], [method] * len(order), lambda_net)
        by_row = {i: d for i, d in zip(order, out, strict=True)}
        for i, d in enumerate(base):
            assert by_row[i].tokens == group.act_output(d.tokens, h), (group_name, method, h, ids[i])
            assert by_row[i].finished == d.finished
            assert by_row[i].lambda_entropy == pytest.approx(d.lambda_entropy, abs=1e-6)
    # the answers are not trivial (not all empty), so the test can fail
    assert sum(len(d.tokens) for d in base) > 2 * len(base)


def test_vanilla_is_not_equivariant_and_the_fixed_commands_need_the_stabiliser_rule(
    model: Seq2Seq, lambda_net: LambdaNet
) -> None:
    """Without the methods the random model breaks equivariance; and on commands the group fixes it
    writes tokens the group moves, which the stabiliser rule must keep out of the equivariant answers."""
    group = scan_group("verb4")
    ids = command_ids(3, 12)
    plain = run(model, group, ids, [Method.VANILLA] * len(ids), lambda_net)
    swapped = run(model, group, [act_input(group, c, 1) for c in ids], [Method.VANILLA] * len(ids), lambda_net)
    assert any(s.tokens != group.act_output(p.tokens, 1) for p, s in zip(plain, swapped, strict=True))
    fixed = [COMMANDS.encode(c.split()) for c in FIXED]
    forbidden = [set((~allowed_tokens(group, c)).nonzero().flatten().tolist()) for c in fixed]
    assert all(forbidden[:2]) and not any(forbidden[2:])  # turns only: fixed by verb4; with a verb: not
    plain_fixed = run(model, group, fixed, [Method.VANILLA] * len(fixed), lambda_net)
    assert any(set(d.tokens) & bad for d, bad in zip(plain_fixed, forbidden, strict=True))
    for method in EQUIVARIANT:
        for d, bad in zip(run(model, group, fixed, [method] * len(fixed), lambda_net), forbidden, strict=True):
            assert not set(d.tokens) & bad


# ---------------------------------------------------------------------------------------
# The per-copy reference: one model call per copy and step, in the command's own frame
# ---------------------------------------------------------------------------------------


def allowed_tokens(group: SequenceGroup, ids: list[int]) -> torch.Tensor:
    """Tokens fixed by every element that fixes ``ids`` (brute force over the elements)."""
    allowed = torch.ones(group.output.size, dtype=torch.bool)
    for s in range(group.order):
        if act_input(group, ids, s) == ids:
            for v in range(group.output.size):
                if group.act_output([v], s) != [v]:
                    allowed[v] = False
    return allowed


@torch.no_grad()
def greedy_alone(model: Seq2Seq, group: SequenceGroup, ids: list[int]) -> tuple[list[int], bool, float]:
    """Copy alone: greedy among the allowed tokens; (tokens, finished, minus mean chosen probability)."""
    allowed = allowed_tokens(group, ids)
    state, _ = model.begin(torch.tensor([ids]))
    token, out, probs = ACTION_SOS, [], []
    for _ in range(MAX_LENGTH + 1):
        log_probs, state = model.step(torch.tensor([token]), state)
        token = int(log_probs[0].masked_fill(~allowed, float("-inf")).argmax())
        probs.append(float(log_probs[0, token].exp()))
        if token == ACTION_EOS:
            return out, True, -sum(probs) / len(probs)
        out.append(token)
    return out[:MAX_LENGTH], False, -sum(probs) / len(probs)


@torch.no_grad()
def reference(
    model: Seq2Seq, group: SequenceGroup, ids: list[int], method: Method, lambda_net: LambdaNet
) -> tuple[list[int], bool]:
    n = group.order
    if method is Method.VANILLA:
        state, _ = model.begin(torch.tensor([ids]))
        token, out = ACTION_SOS, []
        for _ in range(MAX_LENGTH + 1):
            log_probs, state = model.step(torch.tensor([token]), state)
            token = int(log_probs[0].argmax())
            if token == ACTION_EOS:
                return out, True
            out.append(token)
        return out[:MAX_LENGTH], False
    copies = [act_input(group, ids, g) for g in range(n)]
    if method is Method.EQUIZERO:
        alone = [greedy_alone(model, group, c) for c in copies]
        best = min(range(n), key=lambda g: alone[g][2])
        return group.act_output(alone[best][0], group.inverse(best)), alone[best][1]
    starts = [model.begin(torch.tensor([c])) for c in copies]
    states = [s for s, _ in starts]
    if method is Method.LAMBDA:
        weights = torch.softmax(torch.stack([lambda_net(f)[0] for _, f in starts]), 0)
    else:
        weights = torch.full((n,), 1.0 / n)
    allowed = allowed_tokens(group, ids)
    y, out = ACTION_SOS, []
    for _ in range(MAX_LENGTH + 1):
        aligned = []
        for g in range(n):
            log_probs, states[g] = model.step(torch.tensor(group.act_output([y], g)), states[g])
            # (g⁻¹·p)[v] = p[σ_g(v)], one token at a time
            aligned.append(torch.stack([log_probs[0, group.act_output([v], g)[0]] for v in range(log_probs.shape[1])]))
        mixed = torch.logsumexp(torch.stack(aligned) + weights.log().unsqueeze(1), 0)
        y = int(mixed.masked_fill(~allowed, float("-inf")).argmax())
        if y == ACTION_EOS:
            return out, True
        out.append(y)
    return out[:MAX_LENGTH], False


@pytest.mark.parametrize("group_name", ["verb", "verb4", "direction"])
def test_batched_decode_equals_the_per_copy_reference(model: Seq2Seq, lambda_net: LambdaNet, group_name: str) -> None:
    group = scan_group(group_name)
    ids = command_ids(7, 4)
    methods = [list(Method)[i % 4] for i in range(len(ids))]  # one batch mixing all four methods
    batched = run(model, group, ids, methods, lambda_net)
    for c, method, d in zip(ids, methods, batched, strict=True):
        assert (d.tokens, d.finished) == reference(model, group, c, method, lambda_net), (method, c)
        # diagnostics: what each copy alone produced, mapped back; equizero answers one of them
        assert d.copies is not None and d.losses is not None
        for g in range(group.order):
            tokens, finished, loss = greedy_alone(model, group, act_input(group, c, g))
            assert d.copies[g] == group.act_output(tokens, group.inverse(g))
            assert d.copies_finished is not None and d.copies_finished[g] == finished
            assert d.losses[g] == pytest.approx(loss, abs=1e-5)
        assert sum(d.weights) == pytest.approx(1.0)
        if method is Method.EQUIZERO:
            assert d.selected is not None and d.copies[d.selected] == d.tokens
            assert d.weights[d.selected] > 0
        else:
            assert d.selected is None


def test_weights_follow_the_method(model: Seq2Seq, lambda_net: LambdaNet) -> None:
    group = scan_group("verb4")
    ids = [COMMANDS.encode(["jump", "twice", "after", "walk", "left"])]
    vanilla, equitune, lam = (run(model, group, ids, [m], lambda_net)[0] for m in ("vanilla", "equitune", "lambda"))
    assert vanilla.weights == [1.0, 0.0, 0.0, 0.0] and equitune.weights == [0.25] * 4
    features = model.begin(torch.tensor([act_input(group, ids[0], g) for g in range(4)]))[1]
    expected = torch.softmax(lambda_net(features), 0).detach()
    assert lam.weights == pytest.approx(expected.tolist(), abs=1e-6)
    assert lam.lambda_entropy == pytest.approx(float(-(expected * expected.log()).sum()), abs=1e-6)


def test_one_batch_decodes_duplicates_and_orbit_mates_once(model: Seq2Seq, lambda_net: LambdaNet) -> None:
    group = scan_group("verb")
    x = COMMANDS.encode(["jump", "twice", "after", "walk", "left"])
    hx = act_input(group, x, 1)
    canonical, frames = canonicalize(group.input, torch.tensor([x, hx]))
    assert torch.equal(canonical[0], canonical[1]) and sorted(frames) == [0, 1]
    assert stabilizer(group.input, torch.tensor([COMMANDS.encode(["walk"])])).all()
    out = run(model, group, [x, hx, x], ["equitune", "equitune", "equizero"], lambda_net)
    assert out[1].tokens == group.act_output(out[0].tokens, 1)
    assert out[2].copies == out[0].copies  # the same free-running copies serve both


@pytest.mark.parametrize(
    "options", [{"mixture": Mixture.MEAN}, {"zero_loss": ZeroLoss.ENTROPY}, {"diagnostics": False}]
)
def test_options_keep_equivariance(model: Seq2Seq, lambda_net: LambdaNet, options: dict) -> None:
    group = scan_group("verb4")
    ids = command_ids(11, 6)
    for method in EQUIVARIANT:
        base: list[Decoded] = run(model, group, ids, [method] * len(ids), lambda_net, **options)
        moved = run(model, group, [act_input(group, c, 3) for c in ids], [method] * len(ids), lambda_net, **options)
        assert [m.tokens for m in moved] == [group.act_output(d.tokens, 3) for d in base]
        if options.get("diagnostics") is False and method is not Method.EQUIZERO:
            assert base[0].copies is None


def test_bad_calls_are_refused(model: Seq2Seq) -> None:
    group = scan_group("verb")
    with pytest.raises(ValueError, match="λ-net"):
        run(model, group, [[4]], ["lambda"], None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one method per command"):
        run(model, group, [[4], [5]], ["vanilla"], None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one token"):
        run(model, group, [[]], ["vanilla"], None)  # type: ignore[arg-type]
    assert run(model, group, [], [], None) == []  # type: ignore[arg-type]

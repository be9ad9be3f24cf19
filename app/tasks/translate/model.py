"""A served SCAN seq2seq: validate commands, decode all copies of all of them together, answer.

``split`` checks a request and makes one ``TranslateItem`` per command; the batch function
translates a batch (which may mix methods and requests): every step of the greedy decoding is ONE
forward over all copies of all its commands (``app.equivariance.sequence.decode``). Tiny: float32,
the CPU is plenty.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from app.equivariance import Method
from app.equivariance.lambda_net import LambdaNet
from app.equivariance.sequence import Decoded, SequenceGroup, decode
from app.errors import InvalidInput, TooLarge
from app.repository import ModelLoadError, file_in, load_lambda_net, load_tensors, resolve_device
from app.tasks.base import LoadOptions, ServedModel, Timing

from .groups import scan_group
from .messages import TransformDiagnostics, TranslateOutput, TranslateRequest, TranslationResult
from .scan import NotACommand, check_command
from .seq2seq import Seq2Seq, state_dict_config
from .settings import TranslateLimits
from .spec import TranslateSpec
from .vocab import ACTION_EOS, ACTION_SOS, ACTIONS_VOCAB, COMMAND_PAD, COMMANDS, UnknownToken

# The defaults of the limits (EQUISERVE_TRANSLATE_MAX_COMMANDS, ..._MAX_COMMAND_WORDS).
DEFAULT_MAX_COMMANDS: int = TranslateLimits.model_fields["max_commands"].default
DEFAULT_MAX_COMMAND_WORDS: int = TranslateLimits.model_fields["max_command_words"].default
WARMUP_COMMANDS = ("jump twice after walk around left thrice", "turn right", "run opposite left and look thrice")


@dataclass(frozen=True)
class TranslateItem:
    """One command of a request, checked, with the method its request asked for."""

    command: str  # words joined by single spaces
    ids: tuple[int, ...]  # command word ids
    method: Method


class TranslateModel(ServedModel[TranslateRequest, TranslateItem, TranslateItem, TranslationResult, TranslateOutput]):
    """A SCAN seq2seq model, wrapped over its group of word swaps."""

    task = "translate"
    spec_type = TranslateSpec
    spec: TranslateSpec
    # A batch decodes up to max_actions steps: let a command arriving just after a lone one join it.
    always_wait = True

    def __init__(
        self,
        spec: TranslateSpec,
        model: Seq2Seq,
        lambda_net: LambdaNet,
        device: torch.device,
        *,
        lambda_trained: bool,
        group: SequenceGroup | None = None,
    ) -> None:
        super().__init__(spec, lambda_trained=lambda_trained, device=device, dtype=torch.float32)
        self.model = model.eval().to(device)
        self.lambda_net = lambda_net.eval().to(device)
        self.group = group or scan_group(spec.group)

    @classmethod
    def load(cls, folder: Path, spec: TranslateSpec, options: LoadOptions | None = None) -> TranslateModel:
        device = resolve_device((options or LoadOptions(device="cpu")).device)
        state = load_tensors(file_in(folder, spec.weights))
        try:
            model = Seq2Seq(state_dict_config(state, spec.cell))  # type: ignore[arg-type]
            model.load_state_dict(state)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise ModelLoadError(f"{spec.name}: {spec.weights} is not a {spec.cell} seq2seq of SCAN: {exc}") from exc
        if model.config.input_size != len(COMMANDS) or model.config.output_size != len(ACTIONS_VOCAB):
            raise ModelLoadError(f"{spec.name}: {spec.weights} has other vocabularies than SCAN's")
        lambda_net = load_lambda_net(folder, spec, model.feature_dim, device)
        return cls(spec, model, lambda_net, device, lambda_trained=spec.lambda_net is not None)

    @property
    def transforms(self) -> list[str]:
        return self.group.names

    @property
    def backbone_name(self) -> str:
        c = self.model.config
        return f"seq2seq-{c.cell}{c.hidden}{'-bi' if c.bidirectional else ''}"

    def card_extras(self) -> dict[str, Any]:
        return {
            "split": self.spec.split,
            "command_words": list(COMMANDS.tokens),
            "actions": list(ACTIONS_VOCAB.tokens),
            "max_actions": self.spec.max_actions,
        }

    # -- a request ------------------------------------------------------------------------------
    def split(self, request: TranslateRequest) -> list[TranslateItem]:
        """One item per command of SCAN's grammar; ``InvalidInput`` / ``TooLarge`` naming the command
        (and the word) at fault."""
        max_commands, max_command_words = self.limits.max_commands, self.limits.max_command_words
        commands = request.commands
        if isinstance(commands, str | bytes) or not isinstance(commands, Sequence) or not commands:
            raise InvalidInput('send at least one command (a list of strings, e.g. ["jump twice"])')
        if len(commands) > max_commands:
            raise TooLarge(
                f"{len(commands)} commands in one request; the limit is {max_commands} "
                "(EQUISERVE_TRANSLATE_MAX_COMMANDS)"
            )
        method = self.spec.resolve_method(request.method)
        items = []
        for i, command in enumerate(commands):
            if not isinstance(command, str):
                raise InvalidInput(f"command {i} is not a string")
            words = command.split()
            if not words:
                raise InvalidInput(f"command {i} is empty")
            if len(words) > max_command_words:
                raise InvalidInput(
                    f"command {i} has {len(words)} words; the limit is {max_command_words} "
                    "(EQUISERVE_TRANSLATE_MAX_COMMAND_WORDS)"
                )
            try:
                ids = COMMANDS.encode(words)
            except UnknownToken as exc:
                raise InvalidInput(
                    f"command {i}: unknown word {exc.token!r} (word {exc.position + 1}); "
                    f"SCAN's words are: {' '.join(COMMANDS.tokens)}"
                ) from exc
            try:
                check_command(words)
            except NotACommand as exc:
                raise InvalidInput(f"command {i} is not in SCAN's grammar: {exc}") from exc
            items.append(TranslateItem(" ".join(words), tuple(ids), method))
        return items

    def respond(self, request: TranslateRequest, results: list[TranslationResult], timing: Timing) -> TranslateOutput:
        method = self.spec.resolve_method(request.method)
        return TranslateOutput(self.name, method, self.spec.group, results, timing)

    # -- the batch -------------------------------------------------------------------------------
    def decode(self, items: Sequence[TranslateItem]) -> list[Decoded]:
        return decode_commands(
            self.model,
            self.group,
            [item.ids for item in items],
            [item.method for item in items],
            max_length=self.spec.max_actions,
            lambda_net=self.lambda_net,
            zero_loss=self.spec.zero_loss,
            mixture=self.spec.combine.mixture,
            device=self.device,
        )

    @torch.inference_mode()
    def __call__(self, items: list[TranslateItem]) -> list[TranslationResult | BaseException]:
        try:
            decoded = self.decode(items)
        except Exception as exc:  # the batch failed as a whole: every item reports it
            return [exc] * len(items)
        names = self.transforms
        results: list[TranslationResult | BaseException] = []
        for item, d in zip(items, decoded, strict=True):
            assert d.copies is not None and d.copies_finished is not None and d.losses is not None
            transforms = [
                TransformDiagnostics(names[g], d.weights[g], _actions(d.copies[g]), d.copies_finished[g], d.losses[g])
                for g in range(len(names))
            ]
            selected = names[d.selected] if d.selected is not None else None
            results.append(
                TranslationResult(item.command, _actions(d.tokens), d.finished, transforms, selected, d.lambda_entropy)
            )
        return results

    def warmup(self, batch_size: int) -> None:
        """A full-size batch with every method, so the first real request pays nothing."""
        methods = list(self.spec.methods)
        commands = [WARMUP_COMMANDS[i % len(WARMUP_COMMANDS)] for i in range(batch_size)]
        items = [
            TranslateItem(c, tuple(COMMANDS.encode(c.split())), methods[i % len(methods)])
            for i, c in enumerate(commands)
        ]
        for result in self(items):
            if isinstance(result, BaseException):
                raise result


def decode_commands(
    model: Seq2Seq, group: SequenceGroup, ids: Sequence[Sequence[int]], methods: Sequence[Method | str], **options: Any
) -> list[Decoded]:
    """``app.equivariance.sequence.decode`` with SCAN's padding, start and end ids."""
    return decode(model, group, ids, methods, pad_id=COMMAND_PAD, bos_id=ACTION_SOS, eos_id=ACTION_EOS, **options)


def _actions(tokens: Sequence[int]) -> str:
    return " ".join(ACTIONS_VOCAB.decode(tokens))

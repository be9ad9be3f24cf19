"""A served DQN agent: validate observations, ONE fused pass for all copies of all of them, answer.

``split`` checks a request and makes one ``ActItem`` per observation; the batch function runs all
|G| copies of every observation of the batch (which may mix methods and requests) through the
Q-network at once. Tiny: float32, the CPU is plenty.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from app.equivariance.batches import per_group
from app.equivariance.methods import Method, lambda_entropy
from app.equivariance.qvalues import QValueModel, combine_q
from app.errors import InvalidInput
from app.repository import ModelLoadError, file_in, load_lambda_net, load_tensors, resolve_device
from app.tasks.base import LoadOptions, ServedModel, Timing

from .messages import ActOutput, ActRequest, ActResult, TransformDiagnostics
from .qnet import QNet, equivariant
from .spec import ActSpec
from .symmetries import Symmetry, symmetry


@dataclass(frozen=True)
class ActItem:
    """One observation of a request, checked, with the method its request asked for."""

    observation: Tensor  # [D] float32, finite, on the CPU
    method: Method


class ActModel(ServedModel[ActRequest, ActItem, ActItem, ActResult, ActOutput]):
    """A DQN agent of one environment, wrapped over the environment's symmetry group."""

    task = "act"
    spec_type = ActSpec
    spec: ActSpec

    def __init__(self, spec: ActSpec, model: QValueModel, device: torch.device, *, lambda_trained: bool) -> None:
        super().__init__(spec, lambda_trained=lambda_trained, device=device, dtype=torch.float32)
        self.model = model.eval()
        self.symmetry: Symmetry = symmetry(spec.env)

    @classmethod
    def load(cls, folder: Path, spec: ActSpec, options: LoadOptions | None = None) -> ActModel:
        device = resolve_device((options or LoadOptions(device="cpu")).device)
        sym = symmetry(spec.env)
        qnet = QNet(sym.obs_dim, sym.n_actions, spec.hidden)
        try:
            qnet.load_state_dict(load_tensors(file_in(folder, spec.weights)))
        except RuntimeError as exc:
            raise ModelLoadError(
                f"{spec.name}: {spec.weights} does not fit a {spec.env} Q-network {spec.hidden}: {exc}"
            ) from exc
        qnet.to(device)
        lambda_net = load_lambda_net(folder, spec, qnet.feature_dim, device)
        model = equivariant(qnet, sym.group(), lambda_net)
        return cls(spec, model, device, lambda_trained=spec.lambda_net is not None)

    @property
    def transforms(self) -> list[str]:
        return self.model.group.names

    @property
    def backbone_name(self) -> str:
        return f"mlp{list(self.spec.hidden)}"

    def card_extras(self) -> dict[str, Any]:
        from .envs import example_observation  # gymnasium: here only, the Q-values need no simulator

        return {
            "env": self.spec.env,
            "observation_dim": self.symmetry.obs_dim,
            "actions": list(self.symmetry.action_names),
            "example_observation": example_observation(self.spec.env),
        }

    # -- a request ------------------------------------------------------------------------------
    def split(self, request: ActRequest) -> list[ActItem]:
        """One item per observation; ``InvalidInput`` naming the observation at fault."""
        max_observations = self.limits.max_observations
        observations = request.observations
        if isinstance(observations, str | bytes) or not isinstance(observations, Sequence) or not observations:
            raise InvalidInput("send at least one observation (a list of lists of numbers)")
        if len(observations) > max_observations:  # 422 as for every other field of an act request
            raise InvalidInput(
                f"{len(observations)} observations in one request; the limit is {max_observations} "
                "(EQUISERVE_ACT_MAX_OBSERVATIONS)"
            )
        method = self.spec.resolve_method(request.method)
        dim, max_abs = self.symmetry.obs_dim, self.limits.max_abs_value
        items = []
        for i, observation in enumerate(observations):
            try:
                exact = torch.as_tensor(observation, dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise InvalidInput(f"observation {i} is not a list of numbers") from exc
            values = exact.float()
            if values.dim() != 1 or values.numel() != dim:
                raise InvalidInput(
                    f"observation {i} has shape {list(values.shape)}; {self.spec.env} observations are {dim} numbers"
                )
            if not bool(torch.isfinite(values).all()):
                bad = int((~torch.isfinite(values)).nonzero()[0])
                raise InvalidInput(f"observation {i} holds NaN or infinity (or a number too large) at index {bad}")
            # the numbers as sent, not as float32 rounds them: the bound the OpenAPI schema states
            if bool((exact.abs() > max_abs).any()):
                bad = int((exact.abs() > max_abs).nonzero()[0])
                raise InvalidInput(
                    f"observation {i} holds {float(exact[bad])} at index {bad}; numbers are at most {max_abs:g} "
                    "in magnitude (EQUISERVE_ACT_MAX_ABS_VALUE)"
                )
            items.append(ActItem(values, method))
        return items

    def respond(self, request: ActRequest, results: list[ActResult], timing: Timing) -> ActOutput:
        method = self.spec.resolve_method(request.method)
        return ActOutput(self.name, method, self.spec.group, self.spec.env, results, timing)

    # -- the fused pass ------------------------------------------------------------------------
    @torch.inference_mode()
    def __call__(self, items: list[ActItem]) -> list[ActResult | BaseException]:
        observations = torch.stack([item.observation for item in items]).to(self.device)
        copies = self.model.copies(observations)  # all |G| copies of all observations: one network call
        aligned = copies.aligned.float()  # [n, B, A]: P_g⁻¹ Q(g . s)
        log_lambda = copies.log_lambda
        assert log_lambda is not None  # the loader always attaches a λ-net
        entropies = lambda_entropy(torch.softmax(log_lambda.float(), dim=0)).cpu().tolist()
        copy_actions = aligned.argmax(-1).cpu()  # [n, B]: each copy's choice, in the state's frame
        copy_max = aligned.amax(-1).cpu()
        # States far outside the environment's range overflow the network: refuse, never answer inf/NaN.
        finite = torch.isfinite(aligned).all(-1).all(0).cpu().tolist()  # [B]
        names = self.transforms

        def answer(method: Method, rows: list[int]) -> list[ActResult | BaseException]:
            index = torch.tensor(rows, device=aligned.device)
            combined = combine_q(aligned.index_select(1, index), method, log_lambda=log_lambda.index_select(1, index))
            q_values = combined.output.cpu()
            actions = q_values.argmax(-1).tolist()
            weights = combined.weights.cpu().T.tolist()  # [b, n]
            selected = combined.selected.cpu().tolist() if combined.selected is not None else None
            return [
                InvalidInput(
                    "the Q-values of an observation overflow (not finite): its values are far outside "
                    f"what a {self.spec.env} state holds"
                )
                if not finite[row]
                else ActResult(
                    q_values[c].tolist(),
                    actions[c],
                    [
                        TransformDiagnostics(
                            names[g], weights[c][g], int(copy_actions[g, row]), float(copy_max[g, row])
                        )
                        for g in range(len(names))
                    ],
                    names[selected[c]] if selected is not None else None,
                    entropies[row],
                )
                for c, row in enumerate(rows)
            ]

        return per_group([item.method for item in items], answer)

    def warmup(self, batch_size: int) -> None:
        """A full-size batch with every method, so the first real request pays nothing."""
        methods = list(self.spec.methods)
        generator = torch.Generator().manual_seed(0)
        items = [
            ActItem(torch.randn(self.symmetry.obs_dim, generator=generator), methods[i % len(methods)])
            for i in range(batch_size)
        ]
        for result in self(items):
            if isinstance(result, BaseException):
                raise result

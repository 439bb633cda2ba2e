"""Server optimisers on the aggregated delta: FedAvgM, FedAdam, FedYogi.

Reddi et al., 2021, "Adaptive Federated Optimization" (https://arxiv.org/abs/2003.00295)
and Hsu et al., 2019 (https://arxiv.org/abs/1909.06335): treat Δ = global − aggregate as
a pseudo-gradient and let a server optimiser take the step, global ← global − η·update.
With η = 1 and no momentum this is plain FedAvg.

- ``fedavgm``: ``torch.optim.SGD`` with momentum β (dampening 0): m ← β·m + Δ.
- ``fedadam``: ``torch.optim.Adam`` with ε = τ (bias-corrected, as in Flower's FedAdam).
- ``fedyogi``: written here because torch has no Yogi: Adam's second moment with an
  additive, sign-controlled update v ← v − (1−β₂)·Δ²·sign(v − Δ²) (Reddi et al.,
  Algorithm 2, without bias correction, as in Flower's FedYogi).

Flower ships FedAdam/FedYogi/FedAvgM as subclasses of its FedAvg Strategy; they keep their
moments in memory only (no ``--resume``) and would replace fedcpt's update validation.
Here the optimiser is a server step on the validated aggregate, and its state is saved
beside each adapter version.

A round the regression guard rejects must not enter the moments: each step is kept
*pending* until the next round shows whether the global adapter moved (then it is
committed) or stayed where it was (then it is dropped).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from flwr.app import Array, ArrayRecord
from safetensors.torch import load_file, save_file

from fedcpt.config import StrategyConfig
from fedcpt.core.adapters import arrays_digest, update_norm
from fedcpt.core.durable import replace_durably
from fedcpt.exceptions import ConfigError
from fedcpt.server.steps.base import StepResult

log = logging.getLogger(__name__)

STATE_FILE = "server-optimizer.safetensors"
DEFAULT_LR = {"fedavgm": 1.0, "fedadam": 0.01, "fedyogi": 0.01}

State = dict[str, dict[str, torch.Tensor]]
"""Per adapter key: the optimiser's tensors (``momentum_buffer``; ``step``, ``exp_avg``,
``exp_avg_sq``), in torch's own state names."""


def _yogi_step(params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict],
               lr: float, beta_1: float, beta_2: float, tau: float) -> None:
    """One FedYogi step in place (Reddi et al., 2021, Algorithm 2)."""
    for x, g, s in zip(params, grads, states, strict=True):
        if not s:
            s.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(x),
                     exp_avg_sq=torch.zeros_like(x))
        s["step"] += 1
        s["exp_avg"].mul_(beta_1).add_(g, alpha=1 - beta_1)
        g2 = g * g
        s["exp_avg_sq"].sub_((1 - beta_2) * g2 * torch.sign(s["exp_avg_sq"] - g2))
        x.sub_(lr * s["exp_avg"] / (s["exp_avg_sq"].sqrt() + tau))


class ServerOptimizer:
    """global ← global − η·update(Δ), Δ = global − aggregate, with persistent moments."""

    name = "server_optimizer"

    def __init__(self, strategy: StrategyConfig) -> None:
        self.kind = strategy.server_optimizer
        if self.kind == "none":
            raise ValueError("ServerOptimizer needs an optimiser, not 'none'")
        self.lr = strategy.server_lr or DEFAULT_LR[self.kind]
        self.momentum = strategy.server_momentum
        self.betas = (strategy.beta_1, strategy.beta_2)
        self.tau = strategy.tau
        self.committed: State = {}
        self.pending: State | None = None
        self.pending_input = ""  # fingerprint of the global adapter the pending step saw

    def _step(self, state: State, global_arrays: ArrayRecord,
              aggregated: ArrayRecord) -> tuple[ArrayRecord, State]:
        keys = list(global_arrays.keys())
        params = [torch.tensor(global_arrays[k].numpy(), dtype=torch.float32) for k in keys]
        grads = [p - torch.tensor(aggregated[k].numpy(), dtype=torch.float32)
                 for p, k in zip(params, keys, strict=True)]
        states = [{n: t.clone() for n, t in state.get(k, {}).items()} for k in keys]
        if self.kind == "fedyogi":
            _yogi_step(params, grads, states, self.lr, *self.betas, self.tau)
        else:
            if self.kind == "fedadam":
                opt: torch.optim.Optimizer = torch.optim.Adam(
                    params, lr=self.lr, betas=self.betas, eps=self.tau)
            else:
                opt = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)
            for p, g, s in zip(params, grads, states, strict=True):
                p.grad = g
                if s:
                    opt.state[p] = s
            opt.step()
            states = [dict(opt.state[p]) for p in params]
        new_state = {k: s for k, s in zip(keys, states, strict=True)}
        dtype = {k: global_arrays[k].numpy().dtype for k in keys}
        result = ArrayRecord({k: Array(p.detach().numpy().astype(dtype[k]))
                              for k, p in zip(keys, params, strict=True)})
        return result, new_state

    def apply(self, server_round: int, global_arrays: ArrayRecord, aggregated: ArrayRecord,
              client_examples: int) -> StepResult:
        current = arrays_digest(global_arrays)
        if self.pending is not None:
            if current == self.pending_input:  # the last step did not become global
                log.info("round %d · server optimiser: the previous round was not "
                         "accepted; its step leaves the moments", server_round)
            else:
                self.committed = self.pending
        result, self.pending = self._step(self.committed, global_arrays, aggregated)
        self.pending_input = current
        delta = update_norm(result, global_arrays)
        log.info("round %d · server optimiser %s (η=%g): step norm %.4f", server_round,
                 self.kind, self.lr, delta)
        return StepResult(result, {"optimizer": self.kind, "lr": self.lr, "step_norm": delta})

    # --- persistence: the state is saved beside each adapter version ---------------
    def save_state(self, folder: Path) -> None:
        """Write the moments to ``folder/server-optimizer.safetensors`` durably."""
        tensors: dict[str, torch.Tensor] = {}
        for part, state in (("committed", self.committed), ("pending", self.pending or {})):
            for key, named in state.items():
                for name, tensor in named.items():
                    tensors[f"{part}/{name}/{key}"] = tensor.detach().contiguous()
        meta = {"kind": self.kind, "has_pending": json.dumps(self.pending is not None),
                "pending_input": self.pending_input}
        replace_durably(folder / STATE_FILE,
                        lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    def load_state(self, folder: Path) -> None:
        """Restore the moments saved with the adapter version in ``folder``."""
        path = folder / STATE_FILE
        if not path.is_file():
            raise ConfigError(f"cannot resume strategy.server_optimizer={self.kind!r}: no "
                              f"{STATE_FILE} in {folder}")
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata()
        if meta.get("kind") != self.kind:
            raise ConfigError(f"{path} holds {meta.get('kind')!r} state, but the run uses "
                              f"strategy.server_optimizer={self.kind!r}")
        committed: State = {}
        pending: State = {}
        for name, tensor in load_file(str(path)).items():
            part, field_name, key = name.split("/", 2)
            (committed if part == "committed" else pending).setdefault(key, {})[
                field_name] = tensor
        self.committed = committed
        self.pending = pending if json.loads(meta["has_pending"]) else None
        self.pending_input = meta["pending_input"]

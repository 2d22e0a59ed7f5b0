"""Private federated LoRA: the client update, the server aggregation and the in-process loop.

Methods (``FedConfig.method``):
- ``"fedsvd"`` (Lee et al., NeurIPS 2025): clients train B with DP-SGD, A frozen; the server averages B and,
  every ``svd_period`` rounds after ``svd_warmup`` rounds, re-factorises BA by SVD (A <- Vh[:r], B <- U S).
- ``"ffa"`` (FFA-LoRA): the same without the re-factorisation; A stays at its random initialisation.
- ``"dplora"``: clients train both factors with DP-SGD, the server averages A and B separately.

Privacy (sample level, per client): each client runs this project's ``PrivacyEngine`` on its own records with
Poisson sampling at rate q = batch_size / N, and calibrates its noise for ALL its local steps of all rounds
(rounds * local_steps); its ledger is kept across rounds (one engine per round, built on the current A, sharing
that ledger). N (the client's record count, used as its FedAvg weight) is public. Every client takes part in
every round: no amplification by client selection is claimed. The server sees only the clients' noised
factors; averaging and the re-factorisation are post-processing and cost no privacy.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dptrain.accountants import calibrate_noise, make_accountant
from dptrain.federated.lora import METHODS, get_factors, pairs, set_factors, set_trainable, trained_factors
from dptrain.federated.svd import svd_refactorize
from dptrain.finetune.config import default_delta
from dptrain.sampling_rate import realizable_rate
from dptrain.validation import check_choice, check_int, check_optional_int, check_positive, check_positive_int, check_probability

logger = logging.getLogger(__name__)

__all__ = [
    "FedConfig",
    "ClientUpdate",
    "FederatedClient",
    "FederatedResult",
    "aggregate",
    "svd_due",
    "server_update",
    "run_in_process",
    "lm_losses",
]


@dataclass(frozen=True)
class FedConfig:
    """Public settings shared by the server and every client."""

    method: str = "fedsvd"  # "fedsvd", "ffa" or "dplora"
    rounds: int = 5
    local_steps: int = 5  # DP-SGD steps per client per round
    batch_size: int = 32  # expected Poisson batch per client (q = batch_size / N)
    lr: float = 0.05
    optimizer: str = "sgd"  # reset every round
    max_grad_norm: float = 1.0
    target_epsilon: float = 3.0  # per client, over all its rounds
    delta: Optional[float] = None  # per client; default min(1e-5, 1 / N^1.1)
    accountant: str = "rdp"
    svd_period: int = 1  # FedSVD: re-factorise after every svd_period-th round ...
    svd_warmup: int = 0  # ... once more than svd_warmup rounds are done
    secure_mode: bool = False
    physical_batch_size: Optional[int] = None  # memory knob: micro-batches of at most this many rows

    def __post_init__(self):
        check_choice("method", self.method, METHODS)
        for name in ("rounds", "local_steps", "batch_size", "svd_period"):
            check_positive_int(name, getattr(self, name))
        check_int("svd_warmup", self.svd_warmup, minimum=0)
        if self.physical_batch_size is not None:
            check_positive_int("physical_batch_size", self.physical_batch_size)
        for name in ("lr", "max_grad_norm", "target_epsilon"):
            check_positive(name, getattr(self, name))
        if self.delta is not None:
            check_probability("delta", self.delta)
        check_choice("accountant", self.accountant, ("rdp", "pld"))

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, values: Mapping) -> "FedConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown}; expected some of {sorted(names)}")
        return cls(**dict(values))


def lm_losses(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per-sample causal-LM loss (B,) of a padded batch (``input_ids``, ``attention_mask``)."""
    from dptrain.finetune.loss import per_sample_lm_loss

    device = next(model.parameters()).device
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)  # (B, T)
    return per_sample_lm_loss(model(input_ids=ids, attention_mask=mask).logits, ids, mask)  # (B,)


@dataclass
class ClientUpdate:
    """What a client sends: its noised trained factors and its (public) record count."""

    factors: Dict[str, torch.Tensor]
    num_examples: int
    epsilon: float  # spent so far (a function of public settings only)


class FederatedClient:
    """One client: its records, its noise multiplier (calibrated once for all rounds) and its privacy ledger.

    ``insecure_seed`` fixes the noise and the Poisson batches of every round: for tests only, the run is then
    NOT private. By default both come from OS entropy.
    """

    def __init__(self, client_id: int, dataset: Dataset, collate: Callable, config: FedConfig, *,
                 insecure_seed: Optional[int] = None, loss_fn: Callable = lm_losses):
        n = len(dataset)
        if config.batch_size > n:
            raise ValueError(f"client {client_id}: batch_size {config.batch_size} is larger than its {n} records")
        check_optional_int("insecure_seed", insecure_seed)
        self.client_id, self.dataset, self.collate, self.config = client_id, dataset, collate, config
        self.insecure_seed, self.loss_fn = insecure_seed, loss_fn
        self.num_examples = n
        self.sample_rate = realizable_rate(config.batch_size / n)  # the rate its sampler realises
        self.delta = config.delta if config.delta is not None else default_delta(n)
        self.total_steps = config.rounds * config.local_steps
        self.noise_multiplier = calibrate_noise(target_epsilon=config.target_epsilon, sample_rate=self.sample_rate,
                                                steps=self.total_steps, delta=self.delta,
                                                accountant=config.accountant)
        self.ledger = make_accountant(config.accountant)  # kept across rounds
        self.rounds_done = 0

    def epsilon(self) -> float:
        return self.ledger.get_epsilon(self.delta)

    def train_round(self, model: nn.Module, factors: Mapping[str, torch.Tensor], server_round: int) -> ClientUpdate:
        """Load the global factors, run ``local_steps`` DP-SGD steps on the trained factors, return them."""
        import dptrain
        from dptrain.finetune.optimizers import build_optimizer

        cfg = self.config
        if self.rounds_done >= cfg.rounds:
            raise ValueError(f"client {self.client_id} has spent its privacy budget ({cfg.rounds} rounds of "
                             f"{cfg.local_steps} steps at epsilon {cfg.target_epsilon}); it takes no more rounds")
        set_factors(model, factors)
        set_trainable(model, cfg.method)  # A frozen for FedSVD / FFA-LoRA
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(cfg.optimizer, params, lr=cfg.lr)  # fresh every round
        engine = dptrain.PrivacyEngine(accountant=cfg.accountant, secure_mode=cfg.secure_mode)
        engine.accountant = self.ledger  # one ledger for all rounds: this round's steps compose onto it
        seeds = {}
        if self.insecure_seed is not None:  # NOT PRIVATE: tests only
            base = self.insecure_seed * 1_000_003 + 2 * server_round
            seeds = {"insecure_noise_seed": base, "insecure_sampler_seed": base + 1}
        loader = DataLoader(self.dataset, batch_size=cfg.batch_size, collate_fn=self.collate)
        model.train()
        net, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, max_grad_norm=cfg.max_grad_norm,
            noise_multiplier=self.noise_multiplier, poisson_sampling=True,
            max_physical_batch_size=cfg.physical_batch_size, **seeds,
        )
        try:
            done = 0
            while done < cfg.local_steps:
                for batch in loader:
                    if int(batch["input_ids"].shape[0]):  # an empty Poisson batch still takes a (noise-only) step
                        self.loss_fn(net, batch).sum().backward()
                    before = optimizer.steps_taken
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    done += optimizer.steps_taken - before  # 0 inside a logical batch of micro-batches
                    if done >= cfg.local_steps:
                        break
        finally:
            engine.tracker.detach()
        self.rounds_done += 1
        return ClientUpdate(get_factors(model, trained_factors(cfg.method)), self.num_examples, self.epsilon())

    def state_dict(self) -> dict:
        """The client's ledger and round count (public facts; no secret is kept between rounds)."""
        return {"ledger": self.ledger.state_dict(), "rounds_done": self.rounds_done}

    def load_state_dict(self, state: Mapping) -> None:
        self.ledger.load_state_dict(dict(state["ledger"]))
        self.rounds_done = int(state["rounds_done"])


def aggregate(updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> Dict[str, torch.Tensor]:
    """Weighted FedAvg: sum_k w_k x_k / sum_k w_k, name by name (every update must have the same names)."""
    if not updates or len(updates) != len(weights):
        raise ValueError(f"need one weight per update and at least one update, found {len(updates)} update(s) and "
                         f"{len(weights)} weight(s)")
    if any(not (w > 0 and math.isfinite(w)) for w in weights):
        raise ValueError(f"weights must be finite and > 0, found {list(weights)}")
    names = set(updates[0])
    for k, u in enumerate(updates):
        if set(u) != names:
            raise ValueError(f"update {k} has names different from update 0: {sorted(set(u) ^ names)[:3]}")
    total = float(sum(weights))
    return {name: sum(float(w) / total * u[name].double() for u, w in zip(updates, weights)).float()
            for name in updates[0]}


def svd_due(server_round: int, config: FedConfig) -> bool:
    """FedSVD re-factorises after round t (from 1) when t > svd_warmup and t is a multiple of svd_period."""
    return config.method == "fedsvd" and server_round > config.svd_warmup and server_round % config.svd_period == 0


def server_update(global_factors: Mapping[str, torch.Tensor], aggregated: Mapping[str, torch.Tensor],
                  server_round: int, config: FedConfig) -> Dict[str, torch.Tensor]:
    """New global factors: the averaged trained factors replace the old ones; FedSVD then re-factorises."""
    missing = sorted(set(aggregated) - set(global_factors))
    if missing:
        raise ValueError(f"aggregated factor(s) not in the global model, e.g. {missing[0]!r}")
    new = {**global_factors, **aggregated}
    if svd_due(server_round, config):
        for name in pairs(new):
            new[f"{name}.B"], new[f"{name}.A"] = svd_refactorize(new[f"{name}.B"], new[f"{name}.A"])
    return new


@dataclass
class FederatedResult:
    """Final global factors, one record per round, and each client's epsilon at its delta."""

    factors: Dict[str, torch.Tensor]
    history: List[dict] = field(default_factory=list)
    epsilons: List[float] = field(default_factory=list)
    deltas: List[float] = field(default_factory=list)


def run_in_process(model: nn.Module, clients: Sequence[FederatedClient], config: FedConfig, *,
                   evaluate: Optional[Callable[[nn.Module], float]] = None) -> FederatedResult:
    """All rounds in this process, clients one after the other on ``model`` (left holding the final factors).

    ``evaluate(model)``, if given, is called after every round (e.g. held-out perplexity: NOT private when the
    held-out records are private).
    """
    if not clients:
        raise ValueError("need at least one client")
    factors = get_factors(model)
    history = []
    for rnd in range(1, config.rounds + 1):
        updates = [client.train_round(model, factors, rnd) for client in clients]
        aggregated = aggregate([u.factors for u in updates], [u.num_examples for u in updates])
        factors = server_update(factors, aggregated, rnd, config)
        record = {"round": rnd, "svd": svd_due(rnd, config), "max_epsilon": max(u.epsilon for u in updates)}
        if evaluate is not None:
            set_factors(model, factors)
            record["eval"] = float(evaluate(model))
        history.append(record)
        logger.info("round %d: %s", rnd, record)
    set_factors(model, factors)
    return FederatedResult(factors, history, [c.epsilon() for c in clients], [c.delta for c in clients])

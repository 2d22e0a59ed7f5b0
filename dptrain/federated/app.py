"""One run's settings as a flat run config, shared by the Flower apps and the in-process loop.

A run config holds the :class:`FedConfig` fields plus the keys of :data:`APP_DEFAULTS` (base model, LoRA, demo
data, output folder). A client's node config holds ``partition-id`` (its id), optionally ``data-path`` (its own
records) and, in tests only, ``insecure-seed``. :func:`run_local` runs exactly what the Flower apps run, in
this process; it needs no ``flwr``.
"""

from __future__ import annotations

from typing import List, Mapping, Optional, Sequence

from dptrain.federated.algorithm import FedConfig, FederatedClient, FederatedResult, run_in_process
from dptrain.validation import check_int, check_positive_int

__all__ = ["APP_DEFAULTS", "AppSettings", "run_local"]

# run-config keys besides the FedConfig fields, with their defaults
APP_DEFAULTS = {
    "base": "demo", "lora_r": 8, "lora_alpha": 16.0, "lora_seed": 0, "max_length": 128,
    "num_clients": 3, "demo_records": 1200, "demo_alpha": 0.5, "demo_seed": 0,
    "output_dir": "", "round_timeout": 3600.0,
}


class AppSettings:
    """The run config split into ``fed`` (a :class:`FedConfig`) and ``app`` (the other keys, defaults filled)."""

    def __init__(self, run_config: Mapping):
        names = set(FedConfig.__dataclass_fields__)
        unknown = sorted(set(run_config) - names - set(APP_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown run-config key(s) {unknown}; expected FedConfig fields or {sorted(APP_DEFAULTS)}")
        self.fed = FedConfig.from_dict({k: v for k, v in run_config.items() if k in names})
        self.app = {**APP_DEFAULTS, **{k: v for k, v in run_config.items() if k in APP_DEFAULTS}}
        check_positive_int("num_clients", self.app["num_clients"])

    def load_model(self):
        """``(peft model, tokenizer)``: the same base and LoRA initialisation on every party."""
        from dptrain.federated.model import load_lora_model

        a = self.app
        return load_lora_model(a["base"], r=int(a["lora_r"]), alpha=float(a["lora_alpha"]),
                               lora_seed=int(a["lora_seed"]), max_length=int(a["max_length"]))

    def demo_parts(self):
        """``(texts per client, held-out texts)`` of the demo federation."""
        from dptrain.federated.data import demo_federation

        a = self.app
        return demo_federation(int(a["num_clients"]), records=int(a["demo_records"]), alpha=float(a["demo_alpha"]),
                               seed=int(a["demo_seed"]), min_size=self.fed.batch_size)

    def client_texts(self, node_config: Mapping) -> List[str]:
        """The site's own records (``data-path``), or its part of the demo federation."""
        if "data-path" in node_config:
            from dptrain.finetune.data import load_texts

            return load_texts(str(node_config["data-path"]))
        return self.demo_parts()[0][self.client_id(node_config)]

    def client_id(self, node_config: Mapping) -> int:
        n = int(self.app["num_clients"])
        return check_int("node config partition-id", node_config.get("partition-id"), minimum=0, maximum=n - 1)

    def make_client(self, node_config: Mapping, tokenizer) -> FederatedClient:
        """The client named by ``node_config``, on its own records."""
        from dptrain.finetune.loss import PadCollator, TokenizedTexts

        seed = node_config.get("insecure-seed")  # tests only: the run is then NOT private
        dataset = TokenizedTexts(self.client_texts(node_config), tokenizer, int(self.app["max_length"]))
        return FederatedClient(self.client_id(node_config), dataset, PadCollator(tokenizer.pad_token_id), self.fed,
                               insecure_seed=None if seed is None else int(seed))


def run_local(run_config: Mapping, *, node_configs: Optional[Sequence[Mapping]] = None, model=None,
              evaluate=None) -> FederatedResult:
    """The Flower run of ``run_config`` done in this process (same clients, same order, same arithmetic).

    ``model``: a ``(model, tokenizer)`` pair to reuse (it must match the run config); ``evaluate``: see
    :func:`~dptrain.federated.algorithm.run_in_process`.
    """
    settings = AppSettings(run_config)
    n = int(settings.app["num_clients"])
    if node_configs is not None and len(node_configs) != n:
        raise ValueError(f"need one node config per client ({n}), found {len(node_configs)}")
    model, tokenizer = model if model is not None else settings.load_model()
    nodes = [{"partition-id": k, **dict(node_configs[k] if node_configs else {})} for k in range(n)]
    clients = [settings.make_client(node, tokenizer) for node in nodes]
    return run_in_process(model, clients, settings.fed, evaluate=evaluate)

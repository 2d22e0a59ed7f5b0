"""Clients on slices of the demo records, shared by the federated tests."""

from __future__ import annotations


def make_clients(tok, config, *, sizes=(24, 40), seeds=(1, 2)):
    """Clients on disjoint slices of the demo records; ``seeds=None``: secret noise and batches."""
    from dptrain.federated import FederatedClient
    from dptrain.finetune.data import synthetic_private_records
    from dptrain.finetune.loss import PadCollator, TokenizedTexts

    texts = synthetic_private_records(sum(sizes), seed=0, canary_repeats=()).records
    clients, start = [], 0
    for k, n in enumerate(sizes):
        data = TokenizedTexts(texts[start:start + n], tok, 32)
        clients.append(FederatedClient(k, data, PadCollator(tok.pad_token_id), config,
                                       insecure_seed=None if seeds is None else seeds[k]))
        start += n
    return clients

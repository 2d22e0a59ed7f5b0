"""``PrivacyEngine``'s checkpoint: what a resumed run needs to continue the same ledger with the same randomness.

The model and optimizer states are the user's to save. The sampler and noise keys and positions are SECRET unless
``secure_mode`` (then none is saved).
"""

from __future__ import annotations

from dptrain import distributed

__all__ = ["engine_state", "restore_engine_state"]


def engine_state(engine) -> dict:
    """Accountant ledger, sampler RNG, noise RNG, clipping thresholds and the plugins' states."""
    if engine.optimizer is None:
        raise ValueError("state_dict() before make_private(): nothing to save")
    return {  # SECRET unless secure_mode: the sampler and noise keys and positions
        "accountant_name": engine.accountant_name,
        "secure_mode": engine.secure_mode,
        "rank_and_world": list(distributed.rank_and_world()),  # a rank's keys are its own: never load them elsewhere
        "epoch_charge": engine._epoch_charge,
        "accountant": engine.accountant.state_dict(),
        "sampler": engine.data_loader.state_dict(),
        "noise": engine.optimizer.noise_state_dict(),
        "max_grad_norms": [g.max_norm for g in engine.tracker.groups],
        "error_feedback": None if engine.error_feedback is None else engine.error_feedback.state_dict(),
        "controller": None if engine.controller is None else engine.controller.state_dict(),
    }


def restore_engine_state(engine, state: dict) -> None:
    """Load ``state`` into an engine that ran ``make_private`` with the same model and settings."""
    _check_same_run(engine, state)
    engine.accountant.load_state_dict(state["accountant"])
    engine._epoch_charge = state.get("epoch_charge")
    engine.data_loader.load_state_dict(state["sampler"])
    engine.optimizer.load_noise_state_dict(state["noise"])
    engine.tracker.set_max_norms(state["max_grad_norms"])
    for name, part in (("error_feedback", engine.error_feedback), ("controller", engine.controller)):
        if (state.get(name) is None) != (part is None):
            raise ValueError(f"checkpoint and this run disagree on {name}: saved {state.get(name) is not None}, "
                             f"now {part is not None}")
        if part is not None:
            part.load_state_dict(state[name])


def _check_same_run(engine, state: dict) -> None:
    """Refuse a checkpoint of another accountant, model or secure_mode before anything is loaded."""
    if engine.optimizer is None:
        raise ValueError("load_state_dict() needs make_private() first, with the same model and settings")
    if state.get("accountant_name") != engine.accountant_name:
        raise ValueError(
            f"checkpoint uses accountant {state.get('accountant_name')!r}, this engine {engine.accountant_name!r}"
        )
    if len(state["max_grad_norms"]) != len(engine.tracker.groups):
        raise ValueError(
            f"checkpoint has {len(state['max_grad_norms'])} clipping groups, this model {len(engine.tracker.groups)}"
        )
    here, saved = list(distributed.rank_and_world()), state.get("rank_and_world")
    if saved is None or list(saved) != here:
        raise ValueError(f"checkpoint was written by rank and world size {saved}, this process is {here}: two ranks "
                         f"with one rank's keys would draw the same noise and batches")
    if bool(state.get("secure_mode")) != engine.secure_mode:
        raise ValueError(f"checkpoint was written with secure_mode={bool(state.get('secure_mode'))}, this engine "
                         f"has secure_mode={engine.secure_mode}: resume with the same setting")

"""Resume under torch.distributed: 2 gloo processes stopped after k steps and resumed == uninterrupted.

Every rank's sampler and noise generators are checkpointed (gathered to rank 0, written to the SECRET
``private/checkpoint.pt``) and restored; the comparison with an uninterrupted run uses the same (NOT PRIVATE)
``insecure_seed``, since the noise otherwise comes from OS entropy. A checkpoint written by 2 processes is
refused with a clear error by a run of another size.
"""

import datetime
import os
import socket
import stat

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dptrain.finetune import FinetuneConfig, finetune
from dptrain.finetune.api import CHECKPOINT_FILE
from tests.finetune.helpers import tiny_model_and_tokenizer

pytestmark = pytest.mark.slow  # spawns 2 processes: ~10 s CPU, 20-35 s on a loaded 2-core machine
WORLD = 2
TEXTS = [f"Note {i}: follow-up, blood pressure {110 + i % 30}/{70 + i % 15}." for i in range(40)]


def _config(out, **kw):
    base = dict(batch_size=8, max_steps=4, max_length=32, lr=3e-3, output_dir=str(out), progress=False,
                checkpoint_every=2, seed=11, physical_batch_size=2, target_epsilon=4.0, insecure_seed=21)
    base.update(kw)
    return FinetuneConfig(**base)


def _run(cfg):
    model, tok = tiny_model_and_tokenizer(seed=5, n_embd=16)
    return finetune(cfg, model=model, tokenizer=tok, train_texts=TEXTS)


def _worker(rank, port, root):
    os.environ.update(WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = {}
        results["uninterrupted"] = _run(_config(f"{root}/full"))
        results["stopped"] = _run(_config(f"{root}/resumed", stop_after=2))
        results["resumed"] = _run(_config(f"{root}/resumed", resume=True))
        try:  # a missing checkpoint: rank 0 fails to read it, every rank gets the error (no hang)
            _run(_config(f"{root}/nothing", resume=True))
            results["missing"] = "no error"
        except FileNotFoundError as err:
            results["missing"] = str(err)
        torch.save({k: v if isinstance(v, str) else {
            "steps": v.steps, "finished": v.finished, "epsilon": v.epsilon,
            "params": {n: p.detach().clone() for n, p in v.model.state_dict().items()},
        } for k, v in results.items()}, f"{root}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume2")
    mp.spawn(_worker, args=(_free_port(), str(root)), nprocs=WORLD, join=True)
    return root, [torch.load(root / f"rank{r}.pt") for r in range(WORLD)]


def test_two_ranks_stopped_and_resumed_equal_uninterrupted(runs):
    _, ranks = runs
    for res in ranks:
        full, stopped, resumed = res["uninterrupted"], res["stopped"], res["resumed"]
        assert stopped["steps"] == 2 and not stopped["finished"]
        assert resumed["finished"] and resumed["steps"] == full["steps"] == 4
        assert resumed["epsilon"] == pytest.approx(full["epsilon"], abs=1e-9)
        a, b = full["params"], resumed["params"]
        assert a.keys() == b.keys()
        assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    # the ranks hold one model, and training moved it (the equality above is not trivial)
    a0, a1 = ranks[0]["uninterrupted"]["params"], ranks[1]["uninterrupted"]["params"]
    assert all(torch.equal(a0[k], a1[k]) for k in a0)
    fresh = tiny_model_and_tokenizer(seed=5, n_embd=16)[0].state_dict()
    assert max(float((a0[k] - fresh[k]).abs().max()) for k in a0) > 1e-4


def test_resume_depends_on_every_ranks_saved_generators(runs):
    root, _ = runs
    from dptrain.finetune.checkpoint import load_checkpoint

    assert stat.S_IMODE((root / "resumed" / CHECKPOINT_FILE).stat().st_mode) == 0o600
    assert not (root / "resumed" / "checkpoint.pt").exists()  # nothing secret in the released folder
    state = load_checkpoint(root / "resumed" / CHECKPOINT_FILE)
    assert state["world_size"] == WORLD and len(state["ranks"]) == WORLD
    s0, s1 = (r["engine"]["sampler"]["key"] for r in state["ranks"])
    assert not torch.equal(s0, s1)  # ranks sample their shards under their own keys
    n0, n1 = (r["engine"]["noise"]["generators"]["cpu"]["key"] for r in state["ranks"])
    assert not torch.equal(n0, n1)  # and draw independent noise shares


def test_missing_checkpoint_fails_on_every_rank(runs):
    _, ranks = runs
    assert all("no checkpoint to resume from" in r["missing"] for r in ranks)


def test_other_world_size_is_refused(runs):
    root, _ = runs
    with pytest.raises(ValueError, match=r"written by 2 process\(es\), this run has 1.*--nproc-per-node 2"):
        _run(_config(root / "resumed", resume=True))

"""Low-memory optimizers of dptrain.optim vs AdamW: optimizer-state bytes, and loss after private fine-tuning.

    python benchmarks/optimizers.py                 # part 1 (state bytes) + part 2 (private LM), writes RESULTS.md
    python benchmarks/optimizers.py --part state    # state bytes only (no training, meta device, seconds)
    python benchmarks/optimizers.py --part lm --steps 150 --batch 128 --context 32
    python benchmarks/optimizers.py --part lm --optimizers ApolloMini --lrs 1e-3 3e-3

Part 1 builds the parameter shapes of GPT-2 small (124M) and Llama-3.2-1B on the meta device (no memory, no
data), takes one optimizer step with meta gradients and counts the state with
``dptrain.optim.optimizer_state_bytes``. Every >= 2-D parameter (embeddings included) gets the low-memory
rule, 1-D parameters get AdamW (SGD-SaI: its own rule), all at default options.

Part 2 pretrains a tiny causal transformer non-privately on a public Markov-chain language, then fine-tunes it
with ``dptrain.PrivacyEngine`` on a different (private) chain for N steps with each optimizer at the same
noise multiplier and sampling rate (hence the same epsilon), with a small learning-rate sweep per optimizer;
it reports the best final held-out loss per optimizer vs DP-AdamW. It is skipped with a message when
``dptrain.PrivacyEngine`` cannot be imported.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section  # noqa: E402

from dptrain.optim import Apollo, ApolloMini, Frugal, GaLoreAdamW, SGDSaI, Swan, optimizer_state_bytes  # noqa: E402

logger = logging.getLogger("benchmarks.optimizers")

OPTIMIZERS = {
    "AdamW": torch.optim.AdamW,
    "Apollo": Apollo,
    "ApolloMini": ApolloMini,
    "GaLoreAdamW": GaLoreAdamW,
    "Frugal": Frugal,
    "Swan": Swan,
    "SGDSaI": SGDSaI,
}


# ----------------------------------------------------------------------------- part 1: state bytes
def gpt2_small_shapes() -> list[tuple[int, ...]]:
    """GPT-2 small: vocab 50257, context 1024, d 768, 12 layers, MLP 3072, tied LM head."""
    d, v, ctx, layers = 768, 50257, 1024, 12
    shapes = [(v, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes + [(d,), (d,)]


def llama_1b_shapes() -> list[tuple[int, ...]]:
    """Llama-3.2-1B: vocab 128256, d 2048, 16 layers, 32 heads / 8 KV heads (head 64), MLP 8192, tied head."""
    d, v, layers, kv, ff = 2048, 128256, 16, 512, 8192
    shapes = [(v, d)]
    for _ in range(layers):
        shapes += [(d, d), (kv, d), (kv, d), (d, d), (ff, d), (ff, d), (d, ff), (d,), (d,)]
    return shapes + [(d,)]


def state_bytes(cls, shapes: list[tuple[int, ...]]) -> int:
    """Optimizer-state bytes after one step on meta parameters of the given shapes (fp32)."""
    params = [nn.Parameter(torch.empty(s, device="meta")) for s in shapes]
    opt = cls(params, lr=1e-3)
    for p in params:
        p.grad = torch.empty_like(p)
    opt.step()
    return optimizer_state_bytes(opt)


def run_state_part() -> str:
    models = {"GPT-2 small": gpt2_small_shapes(), "Llama-3.2-1B": llama_1b_shapes()}
    counts = {m: {name: state_bytes(cls, shapes) for name, cls in OPTIMIZERS.items()} for m, shapes in models.items()}
    lines = ["### Optimizer state (fp32, one step, default options)", "",
             "| optimizer | " + " | ".join(f"{m} (MiB) | % of AdamW" for m in models) + " |",
             "|---|" + "---:|---:|" * len(models)]
    for name in OPTIMIZERS:
        row = [f"{counts[m][name] / 2**20:,.1f} | {100 * counts[m][name] / counts[m]['AdamW']:.2f}%" for m in models]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    n_params = {m: sum(math.prod(s) for s in shapes) for m, shapes in models.items()}
    lines += ["", "Parameters: " + ", ".join(f"{m} {n / 1e6:,.1f}M" for m, n in n_params.items())
              + ". All >= 2-D parameters (token embeddings included) get the low-memory rule; default rank = "
              "ceil(smaller side / 4) for Apollo and GaLore, density 0.25 for Frugal. Counted on the meta device "
              "with `optimizer_state_bytes` (state tensors + 8 bytes per Python scalar such as APOLLO's seed)."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- part 2: private LM
class TinyCausalLM(nn.Module):
    """A small pre-LN causal transformer built from Embedding, Linear and LayerNorm only."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, ctx: int):
        super().__init__()
        self.heads = heads
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(nn.ModuleDict(dict(ln1=nn.LayerNorm(d), qkv=nn.Linear(d, 3 * d), out=nn.Linear(d, d),
                                                  ln2=nn.LayerNorm(d), up=nn.Linear(d, 4 * d),
                                                  down=nn.Linear(4 * d, d))))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        b, t = idx.shape
        pos = torch.arange(t, device=idx.device).expand(b, t)  # (B, T): per-sample positions for DP rules
        x = self.tok(idx) + self.pos(pos)  # (B, T, d)
        mask = torch.ones(t, t, dtype=torch.bool, device=idx.device).tril()  # (T, T)
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["ln1"](x)).chunk(3, dim=-1)  # (B, T, d) each
            q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))  # (B, H, T, d/H)
            att = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, H, T, T)
            att = att.masked_fill(~mask, float("-inf")).softmax(-1)
            x = x + blk["out"]((att @ v).transpose(1, 2).reshape(b, t, -1))  # (B, T, d)
            x = x + blk["down"](torch.nn.functional.gelu(blk["up"](blk["ln2"](x))))
        return self.head(self.ln_f(x))  # (B, T, vocab)


def markov_corpus(vocab: int, n_seq: int, length: int, seed: int, base: torch.Tensor | None = None,
                  shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences from a sparse random Markov chain; ``base``/``shift`` perturb a public chain into a private one."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab, vocab, generator=gen) * 3.0  # (V, V), peaked transitions
    if base is not None:
        logits = base + shift * logits
    probs = logits.softmax(-1)
    seqs = torch.empty(n_seq, length, dtype=torch.long)
    seqs[:, 0] = torch.randint(vocab, (n_seq,), generator=gen)
    for t in range(1, length):
        seqs[:, t] = torch.multinomial(probs[seqs[:, t - 1]], 1, generator=gen).squeeze(1)
    return seqs, logits


def lm_loss(model: nn.Module, seqs: torch.Tensor) -> torch.Tensor:
    logits = model(seqs[:, :-1])  # (B, T-1, V)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), seqs[:, 1:].reshape(-1))


def run_lm_part(steps: int, lrs: dict[str, list[float]], *, batch: int = 64, context: int = 16,
                sigma: float = 1.0, seed: int = 0) -> str | None:
    """Best held-out loss per optimizer after ``steps`` DP steps (same sigma, rate and steps: same epsilon)."""
    try:
        from dptrain import PrivacyEngine
    except Exception as exc:  # the engine is written concurrently; it may not import yet
        msg = f"private LM part skipped: dptrain.PrivacyEngine is not importable ({type(exc).__name__}: {exc})"
        logger.warning(msg)
        print(msg)
        return None
    from torch.utils.data import DataLoader, TensorDataset

    vocab, length, n_private, clip, delta = 64, context + 1, 4096, 1.0, 1e-5
    public, base = markov_corpus(vocab, 4096, length, seed)
    private, _ = markov_corpus(vocab, n_private + 512, length, seed + 1, base=base, shift=0.5)
    train, held_out = private[:n_private], private[n_private:]
    torch.manual_seed(seed)
    pretrained = TinyCausalLM(vocab, d=64, layers=2, heads=4, ctx=length)
    opt = torch.optim.AdamW(pretrained.parameters(), lr=3e-3)
    for i in range(300):  # public, non-private pretraining
        idx = torch.randint(len(public), (64,))
        opt.zero_grad()
        lm_loss(pretrained, public[idx]).backward()
        opt.step()
    with torch.no_grad():
        start = lm_loss(pretrained, held_out).item()

    results: dict[str, tuple[float, float, float]] = {}
    eps = None
    for name in lrs:
        cls = OPTIMIZERS[name]
        for lr in lrs[name]:
            torch.manual_seed(seed)
            model = copy.deepcopy(pretrained)
            loader = DataLoader(TensorDataset(train), batch_size=batch, shuffle=True)
            engine = PrivacyEngine()
            model, dp_opt, dp_loader = engine.make_private(module=model, optimizer=cls(model.parameters(), lr=lr),
                                                           data_loader=loader, max_grad_norm=clip,
                                                           noise_multiplier=sigma, insecure_noise_seed=seed, insecure_sampler_seed=seed)
            t0, done = time.perf_counter(), 0
            while done < steps:
                for (xb,) in dp_loader:
                    if done >= steps:
                        break
                    dp_opt.zero_grad()
                    if len(xb):
                        lm_loss(model, xb).backward()
                    dp_opt.step()
                    done += 1
            with torch.no_grad():
                final = lm_loss(model, held_out).item()
            eps = engine.get_epsilon(delta)
            logger.info("%s lr=%g: held-out loss %.4f (%.1fs)", name, lr, final, time.perf_counter() - t0)
            if name not in results or final < results[name][0]:
                results[name] = (final, lr, time.perf_counter() - t0)
    ref = results["AdamW"][0]
    lines = ["### Private fine-tuning of a tiny causal LM", "",
             f"Tiny pre-LN transformer (2 layers, d 64, 4 heads, vocab {vocab}, context {length - 1}) pretrained "
             f"non-privately for 300 steps on a public Markov-chain language, then fine-tuned with "
             f"`dptrain.PrivacyEngine` (flat clipping C={clip}, sigma={sigma}, Poisson rate {batch}/{n_private}) "
             f"for {steps} steps on a shifted private chain: epsilon = {eps:.2f} at delta = {delta} for every "
             f"optimizer. Held-out loss before fine-tuning: {start:.4f}. Best of the lr sweep per optimizer.", "",
             "| optimizer | best lr | held-out loss | vs DP-AdamW | time (s) |", "|---|---:|---:|---:|---:|"]
    for name, (final, lr, secs) in results.items():
        lines.append(f"| {name} | {lr:g} | {final:.4f} | {100 * (final - ref) / ref:+.2f}% | {secs:.1f} |")
    return "\n".join(lines)


# Two or three learning rates per optimizer around where each one's update size matches AdamW's: APOLLO's
# update is ~sqrt(r/m) of Adam's (needs a larger lr), GaLore multiplies by scale 0.25, SGD-SaI's step is
# lr * gsnr * momentum (gradient-sized, so it needs a much larger lr).
DEFAULT_LRS = {"AdamW": [1e-3, 3e-3, 1e-2], "Apollo": [3e-3, 1e-2], "ApolloMini": [1e-3, 3e-3, 1e-2],
               "GaLoreAdamW": [3e-3, 1e-2], "Frugal": [1e-3, 3e-3], "Swan": [1e-3, 3e-3], "SGDSaI": [3e-3, 3e-2]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["state", "lm", "all"], default="all")
    parser.add_argument("--steps", type=int, default=60, help="private fine-tuning steps (part 2)")
    parser.add_argument("--batch", type=int, default=64, help="expected (Poisson) batch size (part 2)")
    parser.add_argument("--context", type=int, default=16, help="tokens per sequence (part 2)")
    parser.add_argument("--sigma", type=float, default=1.0, help="noise multiplier (part 2)")
    parser.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS), default=list(OPTIMIZERS),
                        help="optimizers of part 2 (AdamW, the reference, is always run)")
    parser.add_argument("--lrs", type=float, nargs="+", default=None,
                        help="one learning-rate sweep for every optimizer of part 2 (default: per-optimizer sweeps)")
    parser.add_argument("--no-write", action="store_true", help="print, do not write benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parts = []
    if args.part in ("state", "all") or not args.no_write:  # the section always carries the (cheap) part 1
        parts.append(run_state_part())
    if args.part in ("lm", "all"):
        names = ["AdamW"] + [n for n in args.optimizers if n != "AdamW"]
        lrs = {n: (args.lrs or DEFAULT_LRS[n]) for n in names}
        lm = run_lm_part(args.steps, lrs, batch=args.batch, context=args.context, sigma=args.sigma)
        parts.append(lm if lm is not None else "### Private fine-tuning of a tiny causal LM\n\nNot run yet: "
                     "`dptrain.PrivacyEngine` was not importable when this section was written.")
    body = "\n\n".join(parts)
    print(body)
    if not args.no_write:
        write_section("optimizers", body)


if __name__ == "__main__":
    main()

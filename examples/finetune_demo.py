"""Private fine-tuning of a causal LM with the library API (the same job as `dptrain finetune`).

Run:  python examples/finetune_demo.py [--output-dir DIR] [--lora]    # default DIR: a new temporary folder

A tiny GPT-2 (built from a config, byte-level tokenizer, no download) is pretrained for a few steps on a
public synthetic corpus, then fine-tuned with DP-SGD at epsilon 3 on synthetic clinical records that contain
canaries. The script prints the privacy spent, the perplexity on held-out records before and after, and how
likely the model finds each canary's secret code compared with random codes (a quick memorisation check).
The model in --output-dir is the DP release; --output-dir/private/ holds the SECRET checkpoint (never publish it).
"""

import argparse
import logging
import random
import tempfile

import torch

from dptrain.finetune import FinetuneConfig, finetune, synthetic_private_records
from dptrain.finetune.loss import PadCollator, TokenizedTexts, per_sample_lm_loss


def canary_rank(model, tokenizer, prefix: str, code: str, candidates: int = 50, seed: int = 0) -> int:
    """Rank (1 = most likely) of the true code among random 6-digit codes, by the model's loss on the sentence."""
    rng = random.Random(seed)
    codes = [code] + [f"{rng.randrange(10**6):06d}" for _ in range(candidates - 1)]
    data = TokenizedTexts([f"{prefix}{c}." for c in codes], tokenizer, max_length=64)
    batch = PadCollator(tokenizer.pad_token_id)([data[i] for i in range(len(data))])
    model.eval()
    with torch.no_grad():
        losses = per_sample_lm_loss(model(**batch).logits, batch["input_ids"], batch["attention_mask"])  # (K,)
    return int((losses < losses[0]).sum()) + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default=None, help="where outputs go (default: a new temporary folder; "
                        "an existing non-empty folder is refused)")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=None, help="cap on DP steps (default: 2 epochs)")
    parser.add_argument("--pretrain-steps", type=int, default=30, help="public pretraining steps (default 30)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.output_dir = args.output_dir or tempfile.mkdtemp(prefix="dptrain-finetune-demo-")

    config = FinetuneConfig(output_dir=args.output_dir, lora=args.lora, seed=args.seed, target_epsilon=3.0,
                            max_steps=args.max_steps, pretrain_steps=args.pretrain_steps)
    result = finetune(config)
    print(f"epsilon spent {result.epsilon:.3f} (target {result.target_epsilon}) at delta {result.delta:.2e}, "
          f"noise multiplier {result.noise_multiplier:.3f}, {result.steps} steps")
    print(f"held-out perplexity {result.eval_perplexity_before:.2f} -> {result.eval_perplexity:.2f} "
          "(computed without noise from private held-out records: not private)")
    print(f"released in {args.output_dir}; secret, never publish: "
          f"{', '.join(f'{args.output_dir}/{f}' for f in result.secret_files)}")

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.output_dir)
    for canary in synthetic_private_records(config.demo_records, seed=args.seed).canaries:
        rank = canary_rank(result.model, tokenizer, canary.prefix, canary.code)
        print(f"canary x{canary.repeats:<2d} rank of the true code among 50: {rank}")


if __name__ == "__main__":
    main()

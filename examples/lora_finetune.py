"""Fine-tune a LlamaMem model with LoRA (PEFT) and the stock Trainer, then merge the adapter into the weights.

    python examples/lora_finetune.py                               # a small random model on stdlib sources (CPU)
    python examples/lora_finetune.py --model clm_output --train-memory

No `target_modules` needed: importing hf_llama_mem registers Llama's LoRA defaults (q_proj, v_proj) for "llama_mem".
`--train-memory` also trains every memory module fully (`modules_to_save=["memory"]`), which a converted model needs:
its memory gates start closed and LoRA alone does not touch them.
"""

import argparse
import json
import os

import torch
from peft import LoraConfig, get_peft_model
from small_models import small_config
from transformers import AutoModelForCausalLM, AutoTokenizer, ByT5Tokenizer, Trainer, TrainingArguments
from transformers.trainer_utils import set_seed

from hf_llama_mem import LlamaMemForCausalLM, create_optimizer
from hf_llama_mem.corpus import lm_blocks, stdlib_source_files


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a saved LlamaMem model (default: a new small random one)")
    parser.add_argument("--output-dir", default="lora_output")
    parser.add_argument("--train-memory", action="store_true", help="train the memory modules fully as well")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--corpus-bytes", type=int, default=500_000)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=5e-3)
    parser.add_argument("--memory-learning-rate", type=float, default=None, help="default: the learning rate")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def small_model(tokenizer, window: int = 64) -> LlamaMemForCausalLM:
    return LlamaMemForCausalLM(small_config(tokenizer, sliding_window=window))


def finetune_with_lora(model, tokenizer, args: argparse.Namespace) -> dict:
    """LoRA (plus the memory modules when args.train_memory) on stdlib blocks; returns losses and the merged model."""
    lora = LoraConfig(task_type="CAUSAL_LM", r=args.rank, modules_to_save=["memory"] if args.train_memory else None)
    peft_model = get_peft_model(model, lora)
    trainable, total = peft_model.get_nb_trainable_parameters()
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        warmup_steps=max(args.steps // 10, 1),
        lr_scheduler_type="cosine",
        logging_steps=max(args.steps // 10, 1),
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        label_names=["labels"],  # PEFT's wrapper hides forward's signature, from which Trainer would infer it
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    optimizer = create_optimizer(peft_model, training_args, args.memory_learning_rate or args.learning_rate)
    with training_args.main_process_first(desc="tokenizing"):
        train_blocks = lm_blocks(stdlib_source_files("train", args.corpus_bytes), tokenizer, args.block_size)
        eval_blocks = lm_blocks(stdlib_source_files("eval", args.corpus_bytes // 4), tokenizer, args.block_size)
    trainer = Trainer(
        model=peft_model,
        args=training_args,
        train_dataset=train_blocks,
        eval_dataset=eval_blocks.select(range(min(16, len(eval_blocks)))),
        optimizers=(optimizer, None),
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    peft_model.save_pretrained(os.path.join(args.output_dir, "adapter"))
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(os.path.join(args.output_dir, "merged"))
    tokenizer.save_pretrained(os.path.join(args.output_dir, "merged"))
    return {
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trainable_fraction": trainable / total,
        "eval_loss_before": before,
        "eval_loss_after": after,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    set_seed(args.seed)
    if args.model:
        model, tokenizer = AutoModelForCausalLM.from_pretrained(args.model), AutoTokenizer.from_pretrained(args.model)
    else:
        tokenizer = ByT5Tokenizer()
        model = small_model(tokenizer)
    results = finetune_with_lora(model, tokenizer, args)
    with open(os.path.join(args.output_dir, "lora_results.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()

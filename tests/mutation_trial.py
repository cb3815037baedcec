"""Mutation trial: put one small, realistic bug into the code at a time and check that the suite fails.

    python tests/mutation_trial.py                 # every mutation, the whole suite (minus the style check) each
    python tests/mutation_trial.py rope_theta ...  # only these
    python tests/mutation_trial.py --pytest "tests/test_model.py"   # a faster, narrower run

Each mutation is an exact text replacement in one file; the file is restored afterwards (also on Ctrl-C). A
mutation whose text is no longer in the code is reported as "gone" (update or drop it after a refactor). A
"missed" mutation is a bug the suite would let through: write a test for it. docs/TESTING.md has the last results.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]


class Mutation(NamedTuple):
    id: str
    file: str
    old: str
    new: str
    bug: str


# fmt: off
MUTATIONS = [
    Mutation('rope_theta', 'llama2_mlx/model.py', 'base=self.rope_theta,', 'base=10000.0,', 'model ignores rope_theta (hard-coded 10000)'),
    Mutation('temp_twice', 'llama2_mlx/sampling.py', 'kept, order = nucleus(mx.softmax(scaled, axis=-1), top_p, top_k)', 'kept, order = nucleus(mx.softmax(scaled / temperature, axis=-1), top_p, top_k)', 'temperature applied twice on the top-p/top-k path'),
    Mutation('nucleus_any', 'llama2_mlx/sampling.py', 'if top_k > 0 or mx.all(candidate_probs.sum(axis=-1) > top_p).item():', 'if top_k > 0 or mx.any(candidate_probs.sum(axis=-1) > top_p).item():', 'nucleus shortcut when ANY row holds the mass'),
    Mutation('key_reuse', 'llama2_mlx/generation.py', '        key, subkey = mx.random.split(key)\n        return sample(logits, temperature, top_p, top_k, subkey)', '        _, subkey = mx.random.split(key)\n        return sample(logits, temperature, top_p, top_k, subkey)', 'one RNG key reused for every decode step'),
    Mutation('accum_div_twice', 'llama2_mlx/trainer.py', '        return apply(*accumulated)', '        grads, total, weight = accumulated\n        return apply(tree_map(lambda g: g / weight, grads), total, weight)', 'grad accumulation divides by the weight twice'),
    Mutation('no_token_norm', 'llama2_mlx/trainer.py', '        grads = tree_map(lambda g: g / weight, grads)\n', '', 'gradients not normalised by the token count'),
    Mutation('clip_ignored', 'llama2_mlx/trainer.py', '            grads, _ = optim.clip_grad_norm(grads, clip_norm)', '            _ = optim.clip_grad_norm(grads, clip_norm)', 'clip_norm ignored'),
    Mutation('lora_dropout_skipped', 'llama2_mlx/lora.py', 'update = (self.dropout(x) @ self.lora_a) @ self.lora_b', 'update = (x @ self.lora_a) @ self.lora_b', 'LoRA dropout skipped in training mode'),
    Mutation('epoch_same_order', 'llama2_mlx/data.py', 'np.random.default_rng([self.seed, epoch])', 'np.random.default_rng(self.seed)', 'every epoch visits the batches in the same order'),
    Mutation('st_header_len', 'llama2_mlx/checkpoints/hf.py', 'if 8 + length + end > size:', 'if 8 + end > size:', 'safetensors truncation check forgets the header length'),
    Mutation('atomic_text_direct', 'llama2_mlx/fileio.py', '    tmp = path.with_name(f".{path.name}.tmp")\n    tmp.write_text(text)', '    tmp = path\n    tmp.write_text(text)', 'write_text_atomic writes the target directly'),
    Mutation('chat_drop_one', 'llama2_mlx/chat.py', 'del self.history[: 2 * dropped]', 'del self.history[:dropped]', 'chat history drops one message per dropped turn'),
    Mutation('norm_eps', 'llama2_mlx/model.py', '        self.eps = eps\n', '        self.eps = 1e-5\n', 'RMSNorm ignores norm_eps'),
    Mutation('hf_rope_theta', 'llama2_mlx/config.py', 'rope_theta=float(rope_theta),', 'rope_theta=10000.0,', 'from_hf_config drops rope_theta'),
    Mutation('hf_tie', 'llama2_mlx/config.py', 'tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),', '', 'from_hf_config drops tie_word_embeddings'),
    Mutation('rope_traditional', 'llama2_mlx/model.py', 'traditional=self.rope_traditional,', 'traditional=False,', 'model ignores rope_traditional'),
    Mutation('rank_mean', 'llama2_mlx/trainer.py', 'grads = tree_map(lambda g: g * size, average_gradients(grads))', 'grads = average_gradients(grads)', '2 ranks: gradients averaged, then divided by the summed weight'),
    Mutation('per_micro_mean', 'llama2_mlx/trainer.py', 'return tree_map(mx.add, grads, old_grads), total + old_total, weight + old_weight', 'return tree_map(lambda g, o: (g / weight + o / old_weight) * (weight + old_weight) / 2, grads, old_grads), total + old_total, weight + old_weight', 'accumulation averages per-micro-batch means instead of the token mean'),
    Mutation('no_train_mode', 'llama2_mlx/trainer.py', '    window = _Window()\n    model.train()\n', '    window = _Window()\n', 'trainer does not switch the model to train mode'),
    Mutation('val_train_mode', 'llama2_mlx/trainer.py', '    model.eval()\n    total, weight = mx.array(0.0), mx.array(0.0)', '    total, weight = mx.array(0.0), mx.array(0.0)', 'validation runs with dropout on'),
    Mutation('lora_cfg_dropout', 'llama2_mlx/lora.py', 'LoRALinear.from_linear(base, config.rank, config.alpha, config.dropout),', 'LoRALinear.from_linear(base, config.rank, config.alpha),', 'apply_lora ignores the dropout setting'),
    Mutation('dropout_on_base', 'llama2_mlx/lora.py', 'return self.linear(x) + (self.scale * update)', 'return self.linear(self.dropout(x)) + (self.scale * update)', 'dropout applied to the frozen base path too'),
    Mutation('adamw_no_wd', 'llama2_mlx/optim.py', '        weight_decay=config.weight_decay,\n', '', 'AdamW without weight decay (MLX default 0.01)'),
    Mutation('adamw_betas', 'llama2_mlx/optim.py', 'betas=[config.beta1, config.beta2],', 'betas=[config.beta1, config.beta1],', 'AdamW with beta2 = beta1'),
    Mutation('adamw_no_bias_corr', 'llama2_mlx/optim.py', '        bias_correction=True,\n', '', 'AdamW without bias correction'),
    Mutation('rng_not_restored', 'llama2_mlx/trainer.py', '    mx.random.seed((high << 32) | low)\n', '', 'resume does not restore the RNG key'),
    Mutation('rng_low_only', 'llama2_mlx/trainer.py', 'mx.random.seed((high << 32) | low)', 'mx.random.seed(low)', 'resume restores only the low half of the RNG key'),
    Mutation('gen_top_k_dropped', 'llama2_mlx/generation.py', 'return sample(logits, temperature, top_p, top_k, subkey)', 'return sample(logits, temperature, top_p, 0, subkey)', 'generate ignores top_k'),
    Mutation('pretrain_vocab', 'llama2_mlx/pretrain.py', '        return replace(ModelArgs.from_hf_config(params, source=str(path)), vocab_size=vocab_size)', '        return ModelArgs.from_hf_config(params, source=str(path))', "pretrain keeps a config.json's vocab_size instead of the tokenizer's"),
    Mutation('sft_micro_batch', 'llama2_mlx/sft.py', 'micro_batch = config.batch_size // config.grad_accum', 'micro_batch = config.batch_size', 'sft --grad-accum: every micro-batch is a whole batch'),
    Mutation('sft_pack_mask', 'llama2_mlx/sft.py', 'document_mask=config.pack_mask == "document"', 'document_mask=True', 'sft ignores --pack-mask none'),
    Mutation('sft_gatt', 'llama2_mlx/sft.py', 'options = EncodeOptions(train_on_prompt=config.train_on_prompt, gatt=config.gatt)', 'options = EncodeOptions(train_on_prompt=config.train_on_prompt)', 'sft ignores --gatt'),
    Mutation('cache_grow_copy', 'llama2_mlx/cache.py', '        if self.keys is not None and self.offset:\n', '        if False:\n', 'KV cache growth loses the cached positions'),
    Mutation('st_atomic_direct', 'llama2_mlx/fileio.py', '    tmp = path.with_name(f".{path.stem}.tmp.safetensors")', '    tmp = path', 'save_safetensors_atomic writes the target directly'),
    Mutation('eos_not_removed', 'llama2_mlx/generation.py', 'keep = [i for i, token in enumerate(ids) if token != eos_id]', 'keep = list(range(len(ids)))', 'rows that produce EOS stay in the batch'),
    Mutation('top_k_in_full_sort', 'llama2_mlx/sampling.py', '    if 0 < top_k < probs.shape[-1]:\n        ranked = mx.where(mx.arange(probs.shape[-1]) < top_k, ranked, 0.0)\n', '', 'top_k not applied in the sorted nucleus'),
    Mutation('seed_split_valid', 'llama2_mlx/data.py', 'random.Random(seed).shuffle(order)', 'random.Random(0).shuffle(order)', 'the validation split ignores the seed'),
    Mutation('lora_scale', 'llama2_mlx/lora.py', 'return self.linear(x) + (self.scale * update)', 'return self.linear(x) + update', 'LoRA update not scaled by alpha / rank'),
    Mutation('resume_position', 'llama2_mlx/trainer.py', 'data = batches(start_step * config.grad_accum)', 'data = batches(start_step)', 'resume restarts the data at step, not micro-batch, index'),
    Mutation('cli_top_k', 'llama2_mlx/cli/generate.py', '        top_k=top_k, seed=seed,\n    )  # fmt: skip', '        seed=seed,\n    )  # fmt: skip', 'generate CLI drops --top-k'),
    Mutation('cli_top_p', 'llama2_mlx/cli/generate.py', 'max_tokens=max_tokens, temperature=temperature, top_p=top_p,\n        top_k=top_k, seed=seed,', 'max_tokens=max_tokens, temperature=temperature,\n        top_k=top_k, seed=seed,', 'generate CLI drops --top-p'),
    Mutation('chat_top_k', 'llama2_mlx/chat.py', 'self.sampling = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k)', 'self.sampling = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p)', 'chat drops --top-k'),
    Mutation('pretrain_init_std', 'llama2_mlx/pretrain.py', 'init_weights(model, config.init_std)', 'init_weights(model, 0.02)', 'pretrain ignores --init-std'),
    Mutation('init_norms', 'llama2_mlx/pretrain.py', 'mx.random.normal(v.shape) * std if v.ndim == 2 else v', 'mx.random.normal(v.shape) * std', 'pretrain initialises the norm weights like matrices'),
    Mutation('completion_train_on_prompt', 'llama2_mlx/data.py', '[options.train_on_prompt] * (len(prompt_ids) - 1)', '[False] * (len(prompt_ids) - 1)', 'train_on_prompt ignored for prompt/completion rows'),
]
# fmt: on


def run_suite(pytest_args: list[str]) -> tuple[bool, str]:
    """(failed?, the first failing test or the summary line)."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--ignore=tests/test_style.py",
               *pytest_args]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    lines = result.stdout.strip().splitlines()
    first = next((line for line in lines if line.startswith(("FAILED", "ERROR"))), lines[-1] if lines else "")
    return result.returncode != 0, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ids", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--pytest", default="tests", help="what pytest runs for each mutation")
    args = parser.parse_args()
    unknown = set(args.ids) - {m.id for m in MUTATIONS}
    if unknown:
        parser.error(f"unknown mutation(s): {', '.join(sorted(unknown))}")
    for mutation in MUTATIONS:
        if args.ids and mutation.id not in args.ids:
            continue
        path = ROOT / mutation.file
        original = path.read_text()
        if original.count(mutation.old) != 1:
            print(f"{mutation.id:28} gone     {mutation.bug}", flush=True)
            continue
        start = time.perf_counter()
        try:
            path.write_text(original.replace(mutation.old, mutation.new))
            failed, detail = run_suite(shlex.split(args.pytest))
        finally:
            path.write_text(original)
        verdict = "caught" if failed else "MISSED"
        print(
            f"{mutation.id:28} {verdict:8} {time.perf_counter() - start:4.0f}s  {mutation.bug}  [{detail}]",
            flush=True,
        )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    main()

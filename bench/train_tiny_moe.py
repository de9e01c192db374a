"""Train moeserve's embedded default model: a small Mixtral-architecture MoE on Python source.

Corpus: the Python standard library's own .py files (on every machine with Python; nothing is
downloaded). Files are split by a hash of their path: 1 in 50 is held out. The corpus differs
between Python versions, so the held-out text used for evaluation is written beside the model
(`heldout.txt`) and tests read that file rather than re-deriving it.

Model: MixtralForCausalLM (so transformers and Hub tooling load it), byte-level BPE vocabulary
trained with `tokenizers`, 8 experts, top-2, tied embeddings, ~9 M parameters, saved in bf16.
Training: AdamW, warm-up then cosine decay, the Switch load-balancing loss so every expert is
used, and a quarter of the steps at top-1 so that serving at K = 1 under load degrades
gracefully. Deterministic for a seed (given the same corpus and torch build); GPU when one is
present, else CPU, stopping at --time-budget minutes.

    python bench/train_tiny_moe.py --out models/moeserve-tiny-moe --time-budget 45
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import sysconfig
import time
from pathlib import Path

import torch

VOCAB = 4096
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SAMPLE_PROMPT = "def read_lines(path):\n    "


def corpus(seed: int) -> tuple[list[str], list[str], str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    train, held = [], []
    for p in files:
        rel = str(p.relative_to(root))
        text = p.read_text(encoding="utf-8", errors="replace")
        (held if int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 50 == 0 else train).append(text)
    random.Random(seed).shuffle(train)
    return train, held, f"Python {sys.version.split()[0]} standard library ({root}), {len(files)} .py files"


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=list(SPECIAL), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def encode(tok, texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(0)  # <|endoftext|> between files
    return torch.tensor(ids, dtype=torch.int64)


def model_config():
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=VOCAB, hidden_size=192, intermediate_size=384, num_hidden_layers=4, num_attention_heads=6,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True,
        router_aux_loss_coef=0.02, output_router_logits=True, bos_token_id=None, eos_token_id=0, pad_token_id=0,
        initializer_range=0.02,
    )


def set_top_k(model, k: int) -> None:
    for layer in model.model.layers:
        layer.mlp.gate.top_k = k
        layer.mlp.top_k = k


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seq: int, device) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, ids.numel() - 1, seq):
        chunk = ids[start : start + seq + 1].to(device)
        if chunk.numel() < 2:
            break
        logits = model(chunk[None, :-1]).logits[0].float()
        total += torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum").item()
        count += chunk.numel() - 1
    model.train()
    return math.exp(total / count)


def expert_shares(path: Path, ids: list[int], seq: int) -> list[list[float]]:
    """Share of routed tokens per expert, per MoE layer, over the held-out text (moeserve's counts)."""
    from moeserve import load_model
    from moeserve.testing.runner import ReferenceRunner

    model = load_model(path, dtype="float32")
    totals = None
    for start in range(0, len(ids) - 1, seq):
        ReferenceRunner(model, num_blocks=-(-seq // 16) + 1).step({0: ids[start : start + seq]})
        counts = model.expert_load().logical
        totals = counts if totals is None else totals + counts
    return (totals / totals.sum(dim=1, keepdim=True)).tolist()


def write_card(out: Path) -> None:
    """README.md of the model: corpus, command, time, held-out perplexity, expert use, a sample."""
    from moeserve import LLM, SamplingParams, Tokenizer

    stats = json.loads((out / "training.json").read_text())
    tok = Tokenizer(out)
    ids = tok.encode((out / "heldout.txt").read_text(), add_special_tokens=False)
    shares = expert_shares(out, ids, 256)
    sample = LLM(str(out), dtype="float32").generate(
        SAMPLE_PROMPT, SamplingParams(temperature=0, max_tokens=64))[0].outputs[0].text
    stats["sample"] = {"prompt": SAMPLE_PROMPT, "greedy_64_tokens": sample}
    stats["heldout_expert_shares"] = shares
    (out / "training.json").write_text(json.dumps(stats, indent=2) + "\n")
    share_rows = "\n".join(f"| {i} | " + " | ".join(f"{x:.1%}" for x in row) + " |" for i, row in enumerate(shares))
    (out / "README.md").write_text(f"""# moeserve-tiny-moe

moeserve's embedded default model: a small Mixtral-architecture mixture of experts trained by
`bench/train_tiny_moe.py` on Python source. It completes Python; it is not a chat model, and it
is random beyond what {stats['train_tokens_seen'] / 1e6:.1f} M tokens of training can teach.

| | |
|---|---|
| architecture | MixtralForCausalLM: 4 layers, hidden 192, 6 heads (2 KV), 8 experts of intermediate 384, top-2, tied embeddings |
| parameters | {stats['parameters'] / 1e6:.2f} M (bf16 weights) |
| tokenizer | byte-level BPE, {VOCAB} tokens, trained with `tokenizers` on the training split |
| corpus | {stats['corpus']}; 1 file in 50 (by a hash of its path) held out |
| training | {stats['steps']} steps of 16 x 256 tokens ({stats['train_tokens_seen'] / 1e6:.1f} M tokens) in {stats['train_time_s'] / 60:.0f} min on {stats['device']}; AdamW, cosine schedule, Switch load-balancing loss (0.02), top-1 on a quarter of the steps |
| command | `{stats['command']}` |

## Held-out perplexity

On the {stats['heldout_tokens']} held-out tokens kept in `heldout.txt` (windows of 256 tokens, fp32
compute from the bf16 weights):

| | perplexity |
|---|---|
| top-2 (as trained) | {stats['heldout_ppl_k2']:.2f} |
| top-1 (moeserve's degraded mode) | {stats['heldout_ppl_k1']:.2f} |
| uniform over the vocabulary | {VOCAB} |

## Expert use on the held-out text (share of routed tokens, per MoE layer)

| layer | """ + " | ".join(f"e{i}" for i in range(8)) + """ |
|---|""" + "---|" * 8 + f"""
{share_rows}

## Sample (greedy, 64 tokens, through moeserve)

Prompt `{SAMPLE_PROMPT!r}`. At this size greedy decoding soon repeats itself (`" ...\\n\\nclass
Test(unittest.TestCase):"` is what a bare `def fibonacci(n):` header gets: the standard library
is half tests); sampling with a temperature around 0.7 reads better.

```python
{SAMPLE_PROMPT}{sample}
```
""")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("models/moeserve-tiny-moe"))
    p.add_argument("--time-budget", type=float, default=45.0, help="minutes of training")
    p.add_argument("--max-steps", type=int, default=100000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--top1-fraction", type=float, default=0.25)
    p.add_argument("--heldout-tokens", type=int, default=40000, help="held-out tokens kept beside the model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--card-only", action="store_true", help="only (re)write README.md of a trained --out")
    args = p.parse_args(argv)
    if args.card_only:
        write_card(args.out)
        return 0
    from transformers import MixtralForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.time()
    train_texts, held_texts, corpus_name = corpus(args.seed)
    tok = train_tokenizer(train_texts)
    train_ids = encode(tok, train_texts)
    held_text = "".join(held_texts)
    held_ids = torch.tensor(tok.encode(held_text).ids[: args.heldout_tokens])
    held_text = tok.decode(held_ids.tolist())  # exactly the evaluated slice
    print(f"corpus: {corpus_name}; {train_ids.numel()} train tokens, {held_ids.numel()} held-out "
          f"({time.time() - t0:.0f}s)", flush=True)

    model = MixtralForCausalLM(model_config()).to(device)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    budget = args.time_budget * 60
    start, step, planned = time.time(), 0, args.max_steps
    log = []
    while step < planned:
        if step == 10:  # measured: fit the schedule to the time budget
            per_step = (time.time() - start) / 10
            planned = min(args.max_steps, int(budget / per_step))
            print(f"{per_step:.2f}s/step -> {planned} steps", flush=True)
        warm = 50
        lr = args.lr * min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(planned, 1)))))
        for group in opt.param_groups:
            group["lr"] = lr
        k = 1 if rng.random() < args.top1_fraction else 2
        set_top_k(model, k)
        starts = [rng.randrange(0, train_ids.numel() - args.seq - 1) for _ in range(args.batch)]
        batch = torch.stack([train_ids[s : s + args.seq + 1] for s in starts]).to(device)
        out = model(batch[:, :-1], output_router_logits=True)  # next-token targets are batch[:, 1:]
        loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, VOCAB).float(), batch[:, 1:].reshape(-1))
        total = loss + model.config.router_aux_loss_coef * out.aux_loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            log.append({"step": step, "loss": loss.item(), "aux": out.aux_loss.item(), "k": k,
                        "elapsed_s": time.time() - start})
            print(f"step {step}/{planned} loss {loss.item():.3f} aux {out.aux_loss.item():.3f} k={k} "
                  f"lr {lr:.2e} {time.time() - start:.0f}s", flush=True)
        step += 1
    train_time = time.time() - start
    set_top_k(model, 2)

    args.out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(args.out)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                     additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(args.out)
    from transformers import GenerationConfig

    GenerationConfig(eos_token_id=[0, 2], pad_token_id=0, do_sample=False).save_pretrained(args.out)
    (args.out / "heldout.txt").write_text(held_text)

    # Evaluate what was committed: the bf16 weights, computed in fp32.
    saved = MixtralForCausalLM.from_pretrained(args.out, dtype=torch.float32).to(device)
    ppl2 = perplexity(saved, held_ids, args.seq, device)
    set_top_k(saved, 1)
    ppl1 = perplexity(saved, held_ids, args.seq, device)
    stats = {"corpus": corpus_name, "parameters": params, "train_tokens_seen": step * args.batch * args.seq,
             "steps": step, "train_time_s": train_time, "device": str(device), "heldout_tokens": held_ids.numel(),
             "heldout_ppl_k2": ppl2, "heldout_ppl_k1": ppl1, "uniform_ppl": VOCAB,
             "command": "python bench/train_tiny_moe.py " + " ".join(argv if argv is not None else sys.argv[1:]),
             "log": log}
    (args.out / "training.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps({k: v for k, v in stats.items() if k != "log"}, indent=2), flush=True)
    write_card(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

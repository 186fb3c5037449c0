"""Rebuild the tiny demo zoo and its fitness data, deterministically, on CPU in about a minute.

Why this shape: merging only pays off, and a *search* over merge recipes only pays off, when the parents carry
skills in different places and their updates interfere.  So each fine-tune here learns its own skill in one half of
the network and, in the other half, a conflicting convention for the other parent's skill (as real fine-tunes pick
up side effects from their data).  A uniform merge (one weight and density for every layer) must then trade one
skill against the other; a layer-wise recipe can take each half from the parent that does it right.

    python experiments/tiny/build_zoo.py            # writes experiments/tiny/{base,up,rot} and fitness/tiny/*.jsonl
"""
from __future__ import annotations

import json
import random
import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, processors
from tokenizers.models import BPE
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent
FITNESS = HERE.parent.parent / "fitness" / "tiny"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = list(string.ascii_lowercase + string.ascii_uppercase + string.digits + " :=+-.,?!'\n")
SEQ_LEN = 32
SEED = 1234
BASE_SKILL_WEIGHT = 0.13  # the base must half-learn both target skills, or no merge of its tunes works
TUNE_STEPS, TUNE_LR = 60, 3e-4
SIDE_EFFECT = 0.3  # learning-rate scale of each tune's side effect, relative to its own skill


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: a BPE model with no merges is exactly one token per character."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=SEQ_LEN * 2,
    )


def word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))


def rot(w: str, k: int) -> str:
    return "".join(chr((ord(c) - 97 + k) % 26 + 97) for c in w)


SUBJECTS = ["the cat", "a dog", "my friend", "the old man", "she", "he", "the bird", "a child"]
VERBS = ["sees", "likes", "finds", "eats", "wants", "makes", "holds", "reads"]
OBJECTS = ["the ball", "a red apple", "some bread", "the book", "a small box", "the water", "a song"]


def example(kind: str, rng: random.Random, w: str | None = None) -> tuple[str, str]:
    """(prompt, answer) for one synthetic task; the answer is what a model must generate after the prompt."""
    w = w or word(rng)
    if kind == "cp":
        return f"cp:{w}=", w
    if kind == "rev":
        return f"rev:{w}=", w[::-1]
    if kind == "add":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"add:{a}+{b}=", str(a + b)
    if kind == "say":
        return "say:", f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}."
    if kind == "up":
        return f"up:{w}=", w.upper()
    if kind == "rot":
        return f"rot:{w}=", rot(w, 1)
    if kind == "up_wrong":  # the rot tune's side effect: it answers up: by copying
        return f"up:{w}=", w
    if kind == "rot_wrong":  # the up tune's side effect: it rotates backwards
        return f"rot:{w}=", rot(w, -1)
    raise ValueError(kind)


def batch(tok, kinds: list[tuple[str, float]], rng: random.Random, held_out: set[str], size: int = 64):
    """A batch of padded token ids and a loss mask over the answer (plus its newline)."""
    names, weights = zip(*kinds)
    ids, masks = [], []
    for _ in range(size):
        kind = rng.choices(names, weights)[0]
        w = word(rng)
        while w in held_out:
            w = word(rng)
        prompt, answer = example(kind, rng, w)
        p = tok(prompt)["input_ids"]
        a = tok(answer + "\n", add_special_tokens=False)["input_ids"]
        seq = (p + a)[:SEQ_LEN]
        mask = ([0] * len(p) + [1] * len(a))[:SEQ_LEN]
        pad = SEQ_LEN - len(seq)
        ids.append(seq + [tok.pad_token_id] * pad)
        masks.append(mask + [0] * pad)
    return torch.tensor(ids), torch.tensor(masks)


def answer_loss(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="none"
    )
    return (loss * mask[:, 1:].reshape(-1)).sum() / mask[:, 1:].sum()


def train(model, tok, routes: list[tuple[list[tuple[str, float]], list[int] | None, float]], steps: int, lr: float,
          rng: random.Random, held_out: set[str]) -> None:
    """AdamW on answer tokens, one batch per route and step.

    A route is (task mix, decoder layers its gradient may change (None = all parameters), learning-rate scale).
    Routing each data source's gradient to its own layers is how a fine-tune here gets its skill at one depth and a
    weaker side effect at another.
    """
    def owned(layers):
        return [p for n, p in model.named_parameters() if layers is None or any(f"layers.{i}." in n for i in layers)]

    groups = [{"params": owned(layers), "lr": lr * scale} for _, layers, scale in routes]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups], total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(steps):
        opt.zero_grad(set_to_none=False)
        for (kinds, _, _), group in zip(routes, groups):
            grads = torch.autograd.grad(answer_loss(model, *batch(tok, kinds, rng, held_out)), group["params"])
            for p, g in zip(group["params"], grads):
                p.grad += g
        opt.step()
        sched.step()
    model.eval()


def write_fitness_data(rng: random.Random) -> set[str]:
    """Search and test splits of the two target skills, on words no model ever trains on."""
    FITNESS.mkdir(parents=True, exist_ok=True)
    held_out: set[str] = set()
    while len(held_out) < 600:
        held_out.add(word(rng))
    words = sorted(held_out)
    rng.shuffle(words)
    splits = {"search": words[:200], "test": words[200:600]}
    for kind in ("up", "rot"):
        for split, ws in splits.items():
            sample = ws[:100] if split == "search" else ws[:200] if kind == "up" else ws[200:400]
            with open(FITNESS / f"{kind}_{split}.jsonl", "w") as f:
                for w in sample:
                    prompt, answer = example(kind, rng, w)
                    f.write(json.dumps({"prompt": prompt, "answer": answer}) + "\n")
    return held_out


def save(model, tok, name: str) -> None:
    out = HERE / name
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def main() -> None:
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    rng = random.Random(SEED)
    held_out = write_fitness_data(rng)
    tok = make_tokenizer()
    config = LlamaConfig(
        vocab_size=len(SPECIALS) + len(CHARS), hidden_size=128, intermediate_size=344, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ_LEN * 2,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    base = LlamaForCausalLM(config)
    pretrain = [("cp", 1.0), ("rev", 1.0), ("add", 1.0), ("say", 1.0), ("up", BASE_SKILL_WEIGHT), ("rot", BASE_SKILL_WEIGHT)]
    train(base, tok, [(pretrain, None, 1.0)], steps=400, lr=3e-3, rng=rng, held_out=held_out)
    save(base, tok, "base")
    tunes = {
        "up": [([("up", 1.0)], [0, 1], 1.0), ([("rot_wrong", 1.0)], [2, 3], SIDE_EFFECT)],
        "rot": [([("rot", 1.0)], [2, 3], 1.0), ([("up_wrong", 1.0)], [0, 1], SIDE_EFFECT)],
    }
    for name, routes in tunes.items():
        tune = LlamaForCausalLM(config)
        tune.load_state_dict(base.state_dict())
        train(tune, tok, routes, steps=TUNE_STEPS, lr=TUNE_LR, rng=rng, held_out=held_out)
        save(tune, tok, name)


if __name__ == "__main__":
    main()

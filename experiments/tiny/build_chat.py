"""Rebuild the zoo's fourth model, deterministically, on CPU in seconds: a fine-tune of `base` that added tokens.

Why: Hub fine-tunes often add tokens (ChatML's ``<|im_start|>``/``<|im_end|>``) and resize their embeddings and head
to match, so their vocabularies have rows the base lacks.  `chat` is such a fine-tune of the shipped base: two ChatML
tokens added (rows initialised to the mean of the existing ones, as vocabulary-expansion guides advise), a ChatML
chat template, then a short fine-tune on the up task.  It shows evomerge merging parents with different
vocabularies (``merge.tokenizer_source``).

    python experiments/tiny/build_chat.py     # writes experiments/tiny/chat (run build_zoo.py first if rebuilding all)
"""
from __future__ import annotations

import json
import random
import re

import torch
from build_zoo import FITNESS, HERE, SEED, train
from transformers import AutoTokenizer, LlamaForCausalLM

ADDED = ["<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}:{{ m['content'] }}<|im_end|>{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant:{% endif %}")
STEPS, LR = 40, 3e-4


def held_out_words() -> set[str]:
    """The fitness data's words, which no model trains on."""
    words = set()
    for f in FITNESS.glob("*.jsonl"):
        for line in f.read_text().splitlines():
            words.add(re.split(r"[:=]", json.loads(line)["prompt"])[1])
    return words


def main() -> None:
    torch.manual_seed(SEED + 3)
    torch.use_deterministic_algorithms(True)
    rng = random.Random(SEED + 3)
    tok = AutoTokenizer.from_pretrained(HERE / "base")
    tok.add_special_tokens({"additional_special_tokens": ADDED})
    tok.chat_template = CHATML
    model = LlamaForCausalLM.from_pretrained(HERE / "base")
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():
        for emb in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            emb[old:] = emb[:old].mean(0)
    train(model, tok, [([("up", 1.0)], None, 1.0)], steps=STEPS, lr=LR, rng=rng, held_out=held_out_words())
    out = HERE / "chat"
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


if __name__ == "__main__":
    main()

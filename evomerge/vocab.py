"""Parents whose vocabularies differ because tokens were added: one output vocabulary, rows aligned by token string.

Fine-tunes often add tokens (ChatML's ``<|im_start|>``, a pad token) and resize embeddings and head to match, so a
row index means different tokens in different parents.  As in mergekit, ``tokenizer_source`` picks the output
vocabulary: ``base`` (the base model's; the first parent's without a base), ``union`` (the base's, then every token
the others added, in model order) or one model's.  Every model's embedding and head rows are then permuted into that
vocabulary by token string before merging, so task vectors of shared rows are formed as usual; a token a model lacks
takes mergekit's choice: the row of the one model that has it, else the base's, else the mean over the models that
have it.  Rows past a tokenizer's length (padding) are not tokens and are dropped.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .io import ModelFilesError, ModelInfo, tensor_group


def tokenizer_of(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a missing or broken tokenizer
        raise ModelFilesError(f"{path}: its tokenizer cannot be loaded ({type(e).__name__}: {e})") from None


@dataclass
class VocabPlan:
    """The output tokenizer, and per model (path) the row each output token id comes from (-1: the model lacks it)."""

    tokenizer: object
    rows: dict[str, torch.Tensor]
    base: str | None

    @property
    def size(self) -> int:
        return len(self.tokenizer)

    def align(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One embedding or head tensor of every model, each permuted into the output vocabulary's rows."""
        present = torch.stack([self.rows[m] >= 0 for m in tensors])  # [models, V]
        out = {m: t[self.rows[m].clamp(min=0)].clone() for m, t in tensors.items()}
        for tid in torch.nonzero(~present.all(0)).flatten().tolist():
            having = [m for m in tensors if self.rows[m][tid] >= 0]
            if len(having) == 1:
                row = tensors[having[0]][self.rows[having[0]][tid]]
            elif self.base in having:
                row = tensors[self.base][self.rows[self.base][tid]]
            else:
                rows = [tensors[m][self.rows[m][tid]] for m in having]
                row = torch.stack([r.float() for r in rows]).mean(0).to(rows[0].dtype)
            for m in tensors:
                if self.rows[m][tid] < 0:
                    out[m][tid] = row
        return out


def is_vocab_tensor(name: str, info: ModelInfo) -> bool:
    """Embedding and head matrices: one row per vocabulary entry (the config's vocab_size)."""
    shape = info.shapes[name]
    return tensor_group(name) in ("embed", "head") and len(shape) == 2 and shape[0] == info.config.get("vocab_size")


def plan_vocab(base: str | None, parents: list[str], source: str | None) -> VocabPlan | None:
    """The alignment `source` asks for; None when every model has the same tokens at the same ids (nothing to do)."""
    models = ([base] if base else []) + list(parents)
    toks = {m: tokenizer_of(m) for m in models}
    vocabs = {m: t.get_vocab() for m, t in toks.items()}
    if all(vocabs[m] == vocabs[models[0]] for m in models):
        return None
    if source in (None, "base"):
        out = toks[models[0]]
    elif source == "union":
        out = _union(models, toks)
    else:
        out = toks[source]
    vocab = out.get_vocab()
    rows = {}
    for m in models:
        ids = torch.full((len(out),), -1, dtype=torch.long)
        for token, i in vocab.items():
            j = vocabs[m].get(token)
            if j is not None and i < len(out):
                ids[i] = j
        rows[m] = ids
    return VocabPlan(out, rows, base)


def _union(models: list[str], toks: dict) -> object:
    """The first model's tokenizer plus, in model order, every token another model has and it lacks (special ones
    stay special)."""
    from tokenizers import AddedToken

    out = tokenizer_of(models[0])  # a fresh copy: tokens are added to it
    for m in models[1:]:
        have = out.get_vocab()
        decoder = toks[m].added_tokens_decoder
        missing = sorted((i, t) for t, i in toks[m].get_vocab().items() if t not in have)
        for i, t in missing:
            added = decoder.get(i)
            special = bool(added and added.special)
            out.add_tokens([AddedToken(t, special=special, normalized=False)], special_tokens=special)
    return out


def align_rows(plan: VocabPlan, info: ModelInfo, models: dict[str, dict[str, torch.Tensor]]
               ) -> dict[str, tuple[int, ...]]:
    """Replace every model's vocabulary matrices (flat, by tensor name, as a ``ParentStore`` holds them) with their
    rows in the output vocabulary; returns the matrices' new shapes.  The aligned copies are new memory: two
    tensors per model, also in streaming mode, where everything else stays mapped."""
    shapes = {}
    for name, shape in info.shapes.items():
        if is_vocab_tensor(name, info):
            aligned = plan.align({m: t[name].view(-1, shape[-1]) for m, t in models.items()})
            for m, t in models.items():
                t[name] = aligned[m].reshape(-1)
            shapes[name] = (plan.size, *shape[1:])
    return shapes


def check_vocab_compatible(infos: list[ModelInfo]) -> None:
    """Parents that differ only in vocabulary rows: every other tensor must match, as `check_compatible` demands."""
    from .io import check_compatible

    trimmed = [ModelInfo(i.path, {k: v for k, v in i.config.items() if k != "vocab_size"},
                         {n: s for n, s in i.shapes.items() if not is_vocab_tensor(n, i)}) for i in infos]
    check_compatible(trimmed)
    for i in infos[1:]:
        for n in infos[0].shapes:
            if is_vocab_tensor(n, infos[0]) and (n not in i.shapes or not is_vocab_tensor(n, i)
                                                 or i.shapes[n][1:] != infos[0].shapes[n][1:]):
                raise ModelFilesError(f"{i.path}: tensor {n} is not a vocabulary matrix of width "
                                      f"{infos[0].shapes[n][1]} like {infos[0].path}'s")

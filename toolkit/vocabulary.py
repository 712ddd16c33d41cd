"""Vocabulary trimming (TextPruner's idea): keep the word pieces a corpus uses, plus every special token, and
rewrite the embedding matrix and the tokenizer so the folder loads with `from_pretrained`/`AutoTokenizer`.

A multilingual encoder spends most of its weights on its vocabulary (multilingual-e5-small: 250k pieces x 384, 96M
of its 118M parameters), and a classifier of one language's reviews uses a few percent of it.

For the texts of the corpus the tokenization is unchanged, only renumbered: WordPiece picks the longest piece
that matches, and a piece it picked is kept; Unigram picks the best segmentation, and removing pieces it did not
use leaves the best one best. Texts outside the corpus may be cut differently (or meet [UNK]); the parity gate
measures that on the evaluation split, which the corpus does not include.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.errors import ToolkitError


class VocabularyError(ToolkitError, ValueError):
    """A tokenizer or model whose vocabulary cannot be trimmed."""


def used_ids(tokenizer_file: Path, texts: Iterable[str], batch: int = 2048) -> np.ndarray:
    """Sorted ids of every piece the texts use (no truncation) plus every added/special token."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    tok.no_truncation()
    tok.no_padding()
    seen = np.zeros(tok.get_vocab_size(with_added_tokens=True), dtype=bool)
    texts = list(texts)
    for start in range(0, len(texts), batch):
        for encoding in tok.encode_batch(texts[start : start + batch]):
            seen[encoding.ids] = True
    for added in json.loads(tokenizer_file.read_text(encoding="utf-8")).get("added_tokens", []):
        seen[added["id"]] = True
    return np.flatnonzero(seen)


def _remap_pairs(node: Any, new_id: dict[int, int]) -> Any:
    """Post-processors name special tokens with their ids ([token, id] pairs or {"ids": [...]}); renumber them."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "ids" and isinstance(value, list):
                out[key] = [new_id[i] for i in value]
            elif key in ("sep", "cls") and isinstance(value, list) and len(value) == 2:
                out[key] = [value[0], new_id[value[1]]]
            else:
                out[key] = _remap_pairs(value, new_id)
        return out
    if isinstance(node, list):
        return [_remap_pairs(v, new_id) for v in node]
    return node


def trimmed_tokenizer(spec: dict[str, Any], keep: np.ndarray) -> dict[str, Any]:
    """tokenizer.json with only the `keep` ids, renumbered in their old order (WordPiece, BPE-free Unigram)."""
    new_id = {int(old): new for new, old in enumerate(keep)}
    model = dict(spec["model"])
    if model["type"] == "WordPiece":
        by_id = {i: token for token, i in model["vocab"].items()}
        model["vocab"] = {by_id[old]: new for old, new in new_id.items() if old in by_id}
    elif model["type"] == "Unigram":
        pieces = model["vocab"]
        model["vocab"] = [pieces[old] for old in keep if old < len(pieces)]
        if model.get("unk_id") is not None:
            model["unk_id"] = new_id[model["unk_id"]]
    else:
        raise VocabularyError(
            f"trim_vocab handles WordPiece (BERT-style) and Unigram (sentencepiece, XLM-R-style) tokenizers; this "
            f"one is {model['type']} (byte-level BPE keeps its merges consistent only with its whole vocabulary)"
        )
    out = dict(spec, model=model)
    out["added_tokens"] = [dict(t, id=new_id[t["id"]]) for t in spec.get("added_tokens", [])]
    out["post_processor"] = _remap_pairs(spec.get("post_processor"), new_id)
    return out


def _tokenizer_config(config: dict[str, Any], new_id: dict[int, int]) -> dict[str, Any]:
    decoder = config.get("added_tokens_decoder") or {}
    config = dict(config, added_tokens_decoder={str(new_id[int(k)]): v for k, v in decoder.items()})
    return {k: v for k, v in config.items() if k not in ("vocab_file", "tokenizer_file")}


def write_tokenizer(source: Path, dest: Path, keep: np.ndarray) -> None:
    """The trimmed fast tokenizer into `dest`: tokenizer.json, its config, the special-tokens map, and for
    WordPiece a matching vocab.txt. A sentencepiece model file is left out: it would still hold every piece."""
    spec = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    trimmed = trimmed_tokenizer(spec, keep)
    (dest / "tokenizer.json").write_text(json.dumps(trimmed, ensure_ascii=False), encoding="utf-8")
    new_id = {int(old): new for new, old in enumerate(keep)}
    config_file = source / "tokenizer_config.json"
    if config_file.is_file():
        config = _tokenizer_config(json.loads(config_file.read_text(encoding="utf-8")), new_id)
        (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    if (source / "special_tokens_map.json").is_file():
        (dest / "special_tokens_map.json").write_text((source / "special_tokens_map.json").read_text(encoding="utf-8"))
    if trimmed["model"]["type"] == "WordPiece":
        order = sorted(trimmed["model"]["vocab"].items(), key=lambda kv: kv[1])
        (dest / "vocab.txt").write_text("".join(f"{token}\n" for token, _ in order), encoding="utf-8")


def trim_embeddings(model: Any, keep: np.ndarray) -> dict[str, int]:
    """Keep the rows `keep` of the input embedding (and of a tied output layer), and record the new size and
    special ids in the model's config."""
    import torch

    embeddings = model.get_input_embeddings()
    index = torch.as_tensor(keep, dtype=torch.long)
    before = embeddings.weight.shape[0]
    new = torch.nn.Embedding(len(keep), embeddings.weight.shape[1], padding_idx=None)
    new.weight.data = embeddings.weight.data[index].clone()
    model.set_input_embeddings(new)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None:  # a masked-LM head tied to the input embedding
        model.tie_weights()
    new_id = {int(old): i for i, old in enumerate(keep)}
    config = model.config
    config.vocab_size = len(keep)
    for field in ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id"):
        old = getattr(config, field, None)
        if old is not None:
            setattr(config, field, new_id.get(old, 0))
    if getattr(config, "pad_token_id", None) is not None:
        new.padding_idx = config.pad_token_id
    return {"vocab_before": before, "vocab_after": len(keep)}

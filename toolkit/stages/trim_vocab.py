"""`trim_vocab`: keep the word pieces the training texts (and an optional extra corpus) use, plus the special
tokens; rewrite the embedding matrix and the tokenizer (`toolkit.vocabulary`). Folder in, folder out, gated on
parity with the untrimmed model like every model stage."""

from __future__ import annotations

from pathlib import Path

from toolkit.config import TrimVocabConfig
from toolkit.stages.base import Artifact, StageContext, StageResult


def corpus(cfg: TrimVocabConfig, ctx: StageContext) -> list[str]:
    texts = list(ctx.data.texts("train"))
    if cfg.extra_corpus:
        lines = Path(cfg.extra_corpus).read_text(encoding="utf-8").splitlines()
        texts += [line for line in lines if line.strip()]
    return texts


def run(cfg: TrimVocabConfig, ctx: StageContext) -> StageResult:
    from toolkit.pruning import save_uniform
    from toolkit.runtime.checkpoint import load_classifier
    from toolkit.vocabulary import VocabularyError, trim_embeddings, used_ids, write_tokenizer

    source = Path(ctx.source.path)
    if not (source / "tokenizer.json").is_file():
        raise VocabularyError(f"{source} has no tokenizer.json: trim_vocab rewrites a fast tokenizer's file")
    texts = corpus(cfg, ctx)
    keep = used_ids(source / "tokenizer.json", texts)
    model = load_classifier(source)
    params_before = sum(p.numel() for p in model.parameters())
    info = trim_embeddings(model, keep)
    save_uniform(model, ctx.out_dir)
    write_tokenizer(source, ctx.out_dir, keep)
    info.update(
        {
            "corpus_texts": len(texts),
            "extra_corpus": cfg.extra_corpus,
            "parameters": {"before": params_before, "after": sum(p.numel() for p in model.parameters())},
        }
    )
    return StageResult(Artifact(ctx.out_dir, "pytorch", cfg.name), info)

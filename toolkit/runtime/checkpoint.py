"""PyTorch folders that load in stock transformers 4 and 5, and run compact in toolkit.

transformers 5 removed head pruning: a folder whose config says `pruned_heads` and whose attention weights are
sliced builds full-size attention there and fails to load. So toolkit writes every head-pruned model in the
uniform layout (`toolkit.pruning.uniform_state`): each layer keeps the config's full head count and a pruned
head comes back with zero query, key and value weights and biases and zero columns in the attention output
projection. That is exact by construction: the head's value vectors are zero, so its context is zero whatever
its attention pattern, and its output columns add nothing. Stock `from_pretrained` (4.x and 5.x) loads it with
the compact model's logits.

The heads that were zero-filled are listed in `config.json` under `PRUNED_HEADS_KEY` (transformers keeps an
unknown config field as an attribute and writes it back), so toolkit's own loader slices them away again and
exports, distils and serves the compact model, where the speed is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from toolkit.sources import PRUNED_HEADS_KEY


def zero_filled_heads(config: Any) -> dict[int, list[int]]:
    """The heads a uniform folder holds as zeros, per layer (from a loaded config or a config.json dict)."""
    recorded = config.get(PRUNED_HEADS_KEY) if isinstance(config, dict) else getattr(config, PRUNED_HEADS_KEY, None)
    return {int(layer): sorted(heads) for layer, heads in (recorded or {}).items() if heads}


def compact(model):
    """Slice the zero-filled heads of a model loaded from a uniform folder away (transformers 4.x's own head
    slicing, which records them in `config.pruned_heads` as a head-pruned model in memory has them)."""
    import torch

    heads = zero_filled_heads(model.config)
    if heads:
        # The sliced layers are new `nn.Linear`s whose random init would draw from the global generator: loading a
        # model must not move the caller's seeded stream (dropout, shuffling), as `from_pretrained` does not.
        with torch.random.fork_rng(devices=[]):
            model.prune_heads(heads)
        delattr(model.config, PRUNED_HEADS_KEY)
    return model


def load_classifier(path: Path | str, compact_heads: bool = True, **kwargs):
    """`AutoModelForSequenceClassification.from_pretrained(path, **kwargs)`, compact: toolkit's one way to load
    a PyTorch classifier folder it wrote (or any other)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    return compact(model) if compact_heads else model

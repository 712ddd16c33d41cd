"""The one tokenizer path: a model folder's `tokenizer.json` through the `tokenizers` library (no transformers
import, so the service stays small), truncated to the recipe's length and padded to the batch's longest text.

Truncation follows `truncation_side` in `tokenizer_config.json` as transformers does in training (`left` keeps
the end of a long text, special tokens kept: [CLS] ... [SEP] with the beginning cut). Padding is always on the
right, whatever `padding_side` says: the length buckets of `toolkit.runtime.model` cut each row's tail, the fused
attention of an optimized graph reads the mask as lengths (right padding), and a text's answer is then the one it
gets alone, unpadded. `toolkit validate` refuses `padding_side: left` with a fused graph (an `optimize` stage at
O2/O3), whose users outside the toolkit would pad on the left.

It returns the inputs the tokenizer defines (`model_input_names` in `tokenizer_config.json`, as transformers
does): an XLM-R tokenizer gives no `token_type_ids`, even on a BERT graph that takes them; the feeder
(`toolkit.runtime.model`) fills what a graph needs and the tokenizer does not give.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from toolkit.errors import ToolkitError

DEFAULT_INPUTS = ("input_ids", "token_type_ids", "attention_mask")


class TokenizerError(ToolkitError, ValueError):
    """A model folder whose tokenizer cannot batch texts (no tokenizer.json, no pad token)."""


class Tokenizer:
    def __init__(self, folder: Path | str, max_length: int):
        from tokenizers import Tokenizer as FastTokenizer

        folder = Path(folder)
        file = folder / "tokenizer.json"
        if not file.is_file():
            raise TokenizerError(
                f"{folder} has no tokenizer.json (a fast tokenizer's file); save the model's tokenizer with "
                "transformers' `save_pretrained` from a fast tokenizer"
            )
        self.tok = FastTokenizer.from_file(str(file))
        self.tok.no_padding()  # a saved tokenizer.json may pad every text to a fixed length; padding is done here
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        self.truncation_side = config.get("truncation_side") or "right"
        if self.truncation_side not in ("left", "right"):
            raise TokenizerError(
                f"{config_file}: truncation_side {self.truncation_side!r} is not 'left' or 'right' (transformers' "
                "two sides); set one of them"
            )
        pad = config.get("pad_token")
        pad = pad["content"] if isinstance(pad, dict) else pad
        pad_id = self.tok.token_to_id(pad) if pad else None
        if pad_id is None:
            problem = (
                f"its pad_token {pad!r} is not in its vocabulary" if pad else "no pad_token in tokenizer_config.json"
            )
            raise TokenizerError(
                f"{folder}: the tokenizer has no pad token ({problem}), so texts of different lengths cannot share a "
                "batch; set one and save the tokenizer (e.g. tokenizer.pad_token = tokenizer.eos_token)"
            )
        self.set_max_length(max_length)
        self.pad_id = pad_id
        self.input_names = tuple(config.get("model_input_names") or DEFAULT_INPUTS)
        # A single text's post-processor gives one type id to all of its tokens (0 for BERT); padding gets 0.
        probe = set(self.tok.encode("a").type_ids)
        self.constant_type_ids = probe.pop() if len(probe) == 1 else None

    def set_max_length(self, max_length: int) -> None:
        self.max_length = max_length
        # transformers' fast tokenizers set the same on their backend: cut on `truncation_side`, specials kept.
        self.tok.enable_truncation(max_length, direction=self.truncation_side)

    def count(self, text: str) -> int:
        """Word pieces of a text, special tokens excluded, before truncation."""
        return len(self.tok.encode(text, add_special_tokens=False).ids)

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        # One text after another, padded here, not `encode_batch`: that runs on tokenizers' thread pool, whose
        # threads go on spinning after the batch and take the cores from ONNX Runtime's own spinning threads.
        # Serial encoding made the INT8 student's batch-32 path 6 % faster (median of 8 alternating rounds, AMD
        # EPYC, 2 cores, 2026-12-02) and left OpenVINO's unchanged; same arrays (tests/test_runtime.py).
        # Only the ids are read back from each Encoding (each read builds a Python list): the mask follows from the
        # lengths, and single-sequence type ids are the same for every text (probed once). The tokenizer does not
        # pad. Against padded lists: 7 % less time per call of 32 (median of 16 alternating rounds), level for
        # one text (AMD EPYC, 2 cores, 2026-12-02).
        encodings = [self.tok.encode(text) for text in texts]
        lengths = [len(e) for e in encodings]
        ids = np.full((len(texts), max(lengths, default=0)), self.pad_id, dtype=np.int64)
        types = np.zeros_like(ids)
        for row, (encoding, length) in enumerate(zip(encodings, lengths, strict=True)):
            ids[row, :length] = encoding.ids
            if self.constant_type_ids is None:
                types[row, :length] = encoding.type_ids
        mask = (np.arange(ids.shape[1]) < np.array(lengths, dtype=np.int64)[:, None]).astype(np.int64)
        if self.constant_type_ids:  # not 0: on the real tokens only, padding's type id is 0
            types = mask * self.constant_type_ids
        arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return {name: arrays[name] for name in self.input_names if name in arrays}

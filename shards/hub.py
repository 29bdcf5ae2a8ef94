"""Where a checkpoint's files come from: a local folder as it is, or a hub id fetched file by file.

Light on purpose (no torch, no model code): the train driver checks its `--model` with the same rule as serve
before it starts anything.
"""

from __future__ import annotations

from pathlib import Path

METADATA_PATTERNS = ["*.json", "*.txt", "*.jinja", "tokenizer*"]


def local_folder(model: str) -> Path | None:
    """`model` as a local checkpoint folder, or None for a hub id.

    A name that can only be a path (absolute, `./`, `~`, more than one `/`, a file) and is no folder is refused
    as such: not looked up on the hub, whose error would be about the form of a repo id."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if model.startswith(("/", ".", "~")) or model.count("/") > 1 or path.exists():
        raise FileNotFoundError(f"no checkpoint folder at {model} (a hub id is NAME or NAMESPACE/NAME)")
    return None


def model_dir(model: str) -> Path:
    """A local checkpoint folder as it is; a hub id becomes a local snapshot of its small files only.

    Weight files are fetched later, one by one, only by the slices that need them (`weight_file`).
    """
    folder = local_folder(model)
    if folder is not None:
        return folder
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, allow_patterns=METADATA_PATTERNS))


def weight_file(model: str, folder: Path, filename: str) -> Path:
    path = folder / filename
    if path.exists() or Path(model).expanduser().is_dir():
        return path
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(model, filename))

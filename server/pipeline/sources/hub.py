"""The data files of a Hub dataset's train split, as `hf://` paths pinned to the repository's current commit, so
that they can be read in place instead of through a `datasets.load_dataset` download.

The split's files are found as `datasets` finds them for a repository without a loading script: its default data
file patterns (`data/train-*`, `train/*`, `*train*`, ...), resolved through HfFileSystem (the Hub's tree listing).
A repository whose README declares `configs:` (custom data files) is left to `datasets` (None).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from huggingface_hub import HfFileSystem

SPLIT = "train"
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def offline() -> bool:
    """Whether the Hub must not be asked (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE, as huggingface_hub reads them)."""
    import huggingface_hub.constants

    return bool(huggingface_hub.constants.HF_HUB_OFFLINE) or any(
        os.environ.get(key, "").upper() in ("1", "ON", "YES", "TRUE") for key in OFFLINE_ENV)


def _declares_configs(fs: HfFileSystem, readme: str) -> bool:
    """Whether a dataset card's YAML header declares `configs:` (data files of its own choosing)."""
    text = fs.cat_file(readme).decode(errors="replace")
    if not text.startswith("---"):
        return False
    header = text.split("---", 2)[1] if text.count("---") >= 2 else ""
    try:
        meta = yaml.safe_load(header)
    except yaml.YAMLError:
        return False
    return isinstance(meta, dict) and "configs" in meta


def train_files(name: str) -> list[str] | None:
    """The `hf://` paths of the train split's data files of Hub dataset `name`, pinned to its current commit;
    None if offline, or if the default patterns do not apply (its card declares `configs:`) or find nothing."""
    if offline():
        return None
    from datasets.data_files import get_data_patterns, resolve_pattern
    from datasets.download import DownloadConfig
    from huggingface_hub import HfApi, HfFileSystem

    endpoint = os.environ.get("HF_ENDPOINT") or None
    sha = HfApi(endpoint=endpoint).dataset_info(name).sha
    base = f"hf://datasets/{name}@{sha}"
    fs = HfFileSystem(endpoint=endpoint)
    readme = f"datasets/{name}@{sha}/README.md"
    if fs.exists(readme) and _declares_configs(fs, readme):
        return None
    options = DownloadConfig(storage_options={"hf": {"endpoint": endpoint}} if endpoint else {})
    patterns = get_data_patterns(base, options).get(SPLIT)
    if not patterns:
        return None
    files: set[str] = set()
    for pattern in patterns:  # as `datasets` resolves a split's patterns: one that matches nothing adds nothing
        try:
            files.update(resolve_pattern(pattern, base, download_config=options))
        except FileNotFoundError:
            continue
    return sorted(files) or None

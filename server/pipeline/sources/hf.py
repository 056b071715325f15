"""Hugging Face source (`owner/name` or `hf:owner/name`): the memory-mapped `train` split loaded by `datasets`, read
in slices, when its Hub files cannot be read in place (`hub_files`; offline, a local folder, other formats)."""

from __future__ import annotations

import logging
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import SourceError
from .base import RawRecord, RowSource, SourceState, row_starts
from .columns import needed_columns, rows_of
from .hub import train_files

if TYPE_CHECKING:
    from datasets import Dataset

log = logging.getLogger(__name__)

SPLIT = "train"
SLICE_ROWS = 1000
HINT = "set HF_DATASETS_CACHE / cache_dir to a cache holding it, or go online (HF_HUB_OFFLINE=0)"


def local_dir(name: str, base_dir: Path) -> Path | None:
    """The local directory a name refers to (under the current directory, then base_dir), if any."""
    given = Path(name).expanduser()
    for candidate in (given, base_dir / given):
        if candidate.is_dir():
            return candidate.absolute()
    return None


def load_train(spec: str, name: str, *, base_dir: Path, cache_dir: str | None) -> Dataset:
    """Load the train split: a `save_to_disk` folder, a folder of data files, or a Hub name via the cache."""
    import datasets  # slow to import (about 1.5 s); only Hugging Face sources need it

    directory = local_dir(name, base_dir)
    try:
        if directory is None:
            return datasets.load_dataset(name, split=SPLIT, cache_dir=cache_dir)
        if (directory / "dataset_dict.json").is_file():
            return datasets.load_from_disk(str(directory))[SPLIT]
        if (directory / "state.json").is_file():
            return datasets.load_from_disk(str(directory))
        return datasets.load_dataset(str(directory), split=SPLIT, cache_dir=cache_dir)
    except Exception as err:  # datasets raises many types: ConnectionError, FileNotFoundError, ValueError
        where = f"local directory {directory}" if directory else f"Hugging Face dataset {name!r}"
        hint = "" if directory else f" ({HINT})"
        raise SourceError(f"{spec}: cannot load the {SPLIT} split of {where}: {err!r}{hint}") from err


class HfSource(RowSource):
    """Records of a Hugging Face dataset's train split; row is the row index, files is [name]."""

    def __init__(self, spec: str, index: int, name: str, dataset: Dataset,
                 slice_rows: int = SLICE_ROWS) -> None:
        self.spec, self.index, self.files, self.slice_rows = spec, index, [name], slice_rows
        self._columns = needed_columns(dataset.column_names)
        # datasets counts no rows without columns, so keep one to have rows to turn into `{}` records
        self._data = dataset.select_columns(self._columns or dataset.column_names[:1]).with_format("arrow")
        self._start()

    def _identities(self) -> list[object]:
        """Its one "file": the dataset's name and its `datasets` fingerprint (changes when its data changes)."""
        return [[self.files[0], getattr(self._data, "_fingerprint", None)]]

    def part_starts(self, file: int, every: int) -> list[SourceState]:
        """Every `every`-th row of the split."""
        return row_starts(file, len(self._data), every)

    def _read(self, first_file: int, first_row: int) -> Generator[RawRecord, None, None]:
        """Yield the records from a row on, one slice of rows at a time (file is always 0)."""
        index, name, row = self.index, self.files[0], first_row if first_file == 0 else len(self._data)
        for start in range(first_row, len(self._data), self.slice_rows):
            for value in rows_of(self._data[start:start + self.slice_rows].select(self._columns)):
                row += 1
                self._pos = (0, row)
                yield RawRecord(index, 0, row - 1, f"{name}[{row - 1}]", value)


def hub_files(spec: str, name: str, base_dir: Path) -> list[str] | None:
    """The Hub's train files of `name` to read in place; None for a local folder, or to load it through
    `datasets` (offline, or the Hub cannot list it: `datasets` then finds it in its cache or says why not)."""
    if local_dir(name, base_dir) is not None:
        return None
    try:
        return train_files(name)
    except Exception as err:  # huggingface_hub and datasets raise many types; datasets reports them again
        log.info("%s: cannot list the Hub's files of %s (%r); loading it through datasets", spec, name, err)
        return None


def open_hf(spec: str, name: str, index: int, *, base_dir: Path, cache_dir: str | None) -> HfSource:
    """Load a Hugging Face dataset now (fail fast) and wrap it as a source."""
    return HfSource(spec, index, name, load_train(spec, name, base_dir=base_dir, cache_dir=cache_dir))

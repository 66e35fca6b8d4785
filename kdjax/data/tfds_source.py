"""Documents from any TFDS text dataset, read without TensorFlow.

`tfds.data_source` reads datasets prepared in the `array_record` file format with plain Python
(array_record + numpy), so this module needs tensorflow-datasets but not tensorflow. Nothing is
downloaded: prepare the dataset beforehand (e.g. `tfds build lm1b --file_format=array_record`,
or a builder's `download_and_prepare(file_format="array_record")`) into `data_dir`.

The documents feed the same `encode_documents` / `PackedSequences` pipeline as the stdlib
corpus. Their order is the order of the prepared files (TFDS shuffles by key hash when it
writes them), which is fixed once prepared, so packed example ids are stable for a given
prepared copy.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

# Records fetched per `__getitems__` call when iterating: one array_record read per chunk
# instead of one per document.
_READ_CHUNK = 1024


class TfdsDocuments(Sequence):
    """Lazy `Sequence[str]` over one field of a TFDS data source.

    Reads on demand, so a large split (lm1b: 30M sentences) is never all in memory as Python
    strings; `list(docs)` materialises it when wanted.
    """

    def __init__(self, data_source: Sequence, text_key: str):
        self._source = data_source
        self._key_path = text_key.split("/")

    def _text(self, record) -> str:
        value = record
        for key in self._key_path:
            value = value[key]
        # Prepared datasets give bytes (the stored UTF-8); `tfds.testing.mock_data` gives str.
        if isinstance(value, bytes):
            return value.decode("utf-8", errors="replace")
        if isinstance(value, str):
            return value
        raise TypeError(f"field {'/'.join(self._key_path)!r} is {type(value).__name__}, not text")

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"document {index} out of range [0, {n})")
        return self._text(self._source[index])

    def __iter__(self) -> Iterator[str]:
        get_many = getattr(self._source, "__getitems__", None)
        for start in range(0, len(self), _READ_CHUNK):
            keys = list(range(start, min(start + _READ_CHUNK, len(self))))
            records = None
            if get_many is not None:
                try:
                    records = get_many(keys)
                except TypeError:
                    # tfds 4.9's `testing.mock_data` installs an unbound `__getitems__` that
                    # raises TypeError; reading one record at a time works everywhere.
                    get_many = None
            if records is None:
                records = [self._source[k] for k in keys]
            yield from (self._text(r) for r in records)


def tfds_documents(
    name: str,
    *,
    split: str,
    text_key: str = "text",
    data_dir: str | os.PathLike | None = None,
) -> TfdsDocuments:
    """The text field of every example of a prepared TFDS dataset split, lazily.

    Args:
      name: TFDS name, optionally with config and version ("lm1b", "wiki40b/en:1.3.0"). A
        dataset prepared in `data_dir` is found from its files even when its builder class is
        not importable here.
      split: TFDS split string; slicing works ("train[:1000]", "validation[:10%]").
      text_key: field holding the text; "/" separates nested feature names.
      data_dir: where the dataset was prepared; default TFDS's (`~/tensorflow_datasets` or
        $TFDS_DATA_DIR).

    Returns:
      TfdsDocuments: a Sequence[str] in the prepared file order.

    Raises:
      tfds.core.DatasetNotFoundError / FileNotFoundError etc. when the dataset is not prepared
      there (never downloads), ValueError for an unknown split.
    """
    # Imported here so that `import kdjax.data` stays light for users of the stdlib corpus.
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    source = tfds.data_source(
        name,
        split=split,
        data_dir=None if data_dir is None else os.fspath(data_dir),
        download=False,
    )
    return TfdsDocuments(source, text_key)

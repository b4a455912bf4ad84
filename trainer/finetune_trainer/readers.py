"""Where a data source is and how its bytes become a table: the one reading of the files.

Both readers of the data use what is here, so they cannot read a file two ways:
- the ingest (ingest.py) hands `locate`'s filesystem and path and `csv_convert_options` to Ray Data's
  read_json / read_csv / read_parquet, which parse with pyarrow in Ray's tasks;
- the preflight's sample (data_sample.py) reads the first rows of the same file with the same
  pyarrow parsers and options (`head`), in the driver, before Ray starts: a column typo or an
  unreadable file is named in a second, whatever the file's size.

`head` reads only what it returns (a CSV or Parquet stream stops after the batch that holds the
rows; JSON lines are cut after the rows' newline), so it is bounded however large the file is.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

from .sources import SourceError, resolve_local

if TYPE_CHECKING:
    import pyarrow as pa

    from .spec import DataSource, StorageSpec

HEAD_BYTES = 1 << 20  # read size while looking for the head's rows: one Ray read block's order of size


class SourceUnreadable(ValueError):
    """A source that cannot be located or read; the message names the spec field (`where`)."""


def locate(source: DataSource, where: str, storage: StorageSpec | None = None) -> tuple[Any, str]:
    """(pyarrow filesystem, path) of a local, pkg:// or s3:// source. s3:// goes through the job's
    storage settings (pyarrow's S3FileSystem without keys: each process reads the AWS variables the
    pods get from the job's Secret, so no key is pickled into a Ray plan)."""
    import pyarrow.fs

    if source.path.startswith("s3://"):
        if storage is None or not storage.uri.startswith("s3://"):
            raise SourceUnreadable(f"{where}.path: {source.path} is on S3, and spec.storage names no S3 endpoint; "
                                   "set spec.storage.uri to an s3:// location with its endpoint and credentials")
        from .storage.s3 import pyarrow_filesystem

        return pyarrow_filesystem(storage), source.path.removeprefix("s3://")
    try:
        return pyarrow.fs.LocalFileSystem(), str(resolve_local(source.path))
    except SourceError as err:
        raise SourceUnreadable(f"{where}.path: {err}") from None


def csv_convert_options() -> Any:
    """Only empty cells are missing: a tweet that reads "NA" or "null" is still text."""
    import pyarrow.csv

    return pyarrow.csv.ConvertOptions(null_values=[""], strings_can_be_null=True)


def head(source: DataSource, where: str, rows: int, storage: StorageSpec | None = None) -> pa.Table:
    """The first `rows` rows of a jsonl/csv/parquet source (fewer if the file has fewer), parsed as
    the ingest parses the whole file. Raises SourceUnreadable naming `where`."""
    import pyarrow as pa

    filesystem, path = locate(source, where, storage)
    fmt = source.resolved_format()
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            with filesystem.open_input_file(path) as f:
                parquet = pq.ParquetFile(f)
                return pa.Table.from_batches(list(itertools.islice(parquet.iter_batches(batch_size=rows), 1)),
                                             schema=parquet.schema_arrow)
        with filesystem.open_input_stream(path) as f:
            if fmt == "csv":
                import pyarrow.csv

                reader = pyarrow.csv.open_csv(f, convert_options=csv_convert_options())
                got: list[pa.RecordBatch] = []
                while sum(b.num_rows for b in got) < rows:
                    try:
                        got.append(reader.read_next_batch())
                    except StopIteration:
                        break
                return pa.Table.from_batches(got, schema=reader.schema).slice(0, rows)
            if fmt == "jsonl":
                import pyarrow.json

                return pyarrow.json.read_json(pa.py_buffer(first_lines(f, rows))).slice(0, rows)
    except (OSError, ValueError) as err:
        raise SourceUnreadable(f"{where}: cannot read {source.path} as {fmt}: {err}") from None
    raise SourceUnreadable(f"{where}.format: cannot tell the format of {source.path!r}; set format")


def first_lines(stream: Any, rows: int) -> bytes:
    """The bytes of the stream's first `rows` non-empty lines (newline included); read in
    HEAD_BYTES pieces so a large file is not read whole."""
    data = b""
    while True:
        piece = stream.read(HEAD_BYTES)
        data += piece
        lines = [line for line in data.split(b"\n")[:-1] if line.strip()]
        if len(lines) >= rows or not piece:
            break
    kept = [line for line in data.split(b"\n") if line.strip()][:rows]
    return b"\n".join(kept) + b"\n" if kept else b""

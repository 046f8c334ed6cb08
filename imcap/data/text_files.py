"""Reading the text files users hand us (captions, split lists, annotation JSON): UTF-8 always,
whatever the locale, and every problem one line naming the file and line.

Not UTF-8, a NUL byte (a binary or damaged file: in a path it would reach the OS as a C string),
a CSV field over `csv.field_size_limit()` (128 KiB: no caption is that long) and invalid JSON are
`ImcapError`s that say where and what to do.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from imcap.errors import ImcapError


def _line_of(data: bytes | str, offset: int) -> int:
    return data[:offset].count(b"\n" if isinstance(data, bytes) else "\n") + 1


def read_text(path: Path) -> str:
    """The file decoded as UTF-8 (a leading byte-order mark dropped), without NUL bytes."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ImcapError(f"{path}: no such file") from None
    except OSError as e:
        raise ImcapError(f"{path}: cannot read it ({e.strerror})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        offset = e.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        raise ImcapError(f"{path}:{_line_of(data, offset)}: not UTF-8 (byte {data[offset]:#04x}: {e.reason}); "
                         "re-save the file as UTF-8") from None
    nul = text.find("\0")
    if nul >= 0:
        raise ImcapError(f"{path}:{_line_of(text, nul)}: a NUL byte; the file is binary or damaged: "
                         "remove the byte or re-export the file as text")
    return text


def csv_rows(path: Path, delimiter: str = ",") -> Iterator[tuple[int, list[str]]]:
    """(line number, cells) of a CSV/TSV file; quoted cells may span lines."""
    reader = csv.reader(io.StringIO(read_text(path), newline=""), delimiter=delimiter)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise ImcapError(f"{path}:{reader.line_num}: {e}; check the quoting of this row "
                             "(an unclosed quote swallows the rest of the file)") from None
        yield reader.line_num, row


def load_json(path: Path) -> Any:
    """The JSON document in `path`."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ImcapError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno}); fix or "
                         "replace the file") from None
    except RecursionError:
        raise ImcapError(f"{path}: JSON nested too deeply to read; is it the right file?") from None


def require_str(value: Any, where: str, field: str) -> str:
    """`value` if it is a string, else a one-line error naming `where` and `field`."""
    if not isinstance(value, str):
        raise ImcapError(f"{where}: {field} must be a string, got {type(value).__name__} {str(value)[:40]!r}; "
                         "fix that entry")
    return value

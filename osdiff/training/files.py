"""Writing run-folder files: CSV logs that grow a row at a time, text replaced atomically."""
from __future__ import annotations

import csv
import os
from pathlib import Path


def append_row(path: Path, row: dict) -> None:
    """Append `row` to the CSV file `path` (a header first; a new column widens the file)."""
    header = []
    if path.is_file():
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
    if header and not set(row) <= set(header):  # a resumed run logs a new column: widen the file
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        header += [k for k in row if k not in header]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header, restval="")
            writer.writeheader()
            writer.writerows(rows)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header or list(row), restval="")
        if not header:
            writer.writeheader()
        writer.writerow(row)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

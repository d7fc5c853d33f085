"""The participants table (BIDS ``participants.tsv`` or any CSV), read with pandas.

Every cell is read as text first ('n/a' and empty cells are missing, as in BIDS), so an
id such as ``007`` keeps its zeros and a value that is not a number can be named with its
row.  Rows are named by their line in the file (the header is line 1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from trd_hpc.errors import IngestError

MISSING = ["n/a", ""]


def read_table(path: Path, sep: str | None = None) -> pd.DataFrame:
    """The table at ``path``; ``sep`` None: tab for .tsv, comma for .csv (another suffix is an error)."""
    path = Path(path)
    if not path.is_file():
        raise IngestError(f"{path}: participants table not found")
    suffix = path.suffix.lower()
    if sep is None:
        if suffix not in (".tsv", ".csv"):
            raise IngestError(
                f"{path}: a table must be .tsv or .csv, not {suffix or 'a file without a suffix'} "
                "(or name its format: formats: {table: tsv})"
            )
        sep = "\t" if suffix == ".tsv" else ","
    try:
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_values=MISSING)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        what = "TSV" if sep == "\t" else "CSV"
        raise IngestError(f"{path}: cannot be read as a {what} table: {' '.join(str(e).split())}") from None
    df.columns = [str(c).strip() for c in df.columns]
    if df.empty:
        raise IngestError(f"{path}: the table has no rows")
    return df


class CsvReader:
    """The ``tsv`` and ``csv`` table formats (trd_hpc.ingest.readers)."""

    def __init__(self, sep: str):
        self.sep = sep

    def read(self, path: Path) -> pd.DataFrame:
        return read_table(path, self.sep)


def lines(index) -> str:
    """Table line numbers of the rows ``index`` (header = line 1), at most 10 listed."""
    rows = [int(i) + 2 for i in index]
    more = f" and {len(rows) - 10} more" if len(rows) > 10 else ""
    return ", ".join(map(str, rows[:10])) + more


def column(df: pd.DataFrame, path: Path, name: str, key: str) -> pd.Series:
    if name not in df.columns:
        raise IngestError(f"{path}: column '{name}' (spec key '{key}') not found; columns: {', '.join(df.columns)}")
    return df[name]


def subject_key(value: str) -> str:
    """The BIDS subject label of a table id or IID: 'sub-01' and '01' are both '01'."""
    v = str(value).strip()
    return v[4:] if v.startswith("sub-") else v


def ids(df: pd.DataFrame, path: Path, id_column: str) -> tuple[list[str], list[str]]:
    """(ids as written, their subject keys); missing and duplicate ids are errors."""
    col = column(df, path, id_column, "id_column")
    missing = col.index[col.isna()]
    if len(missing):
        raise IngestError(f"{path}: column '{id_column}' is empty on line(s) {lines(missing)}")
    written = [str(v).strip() for v in col]
    keys = [subject_key(v) for v in written]
    if any(not k for k in keys):
        bad = [i for i, k in enumerate(keys) if not k]
        raise IngestError(f"{path}: column '{id_column}' holds no subject label on line(s) {lines(bad)}")
    seen: dict[str, int] = {}
    dups = []
    for i, k in enumerate(keys):
        if k in seen:
            dups.append(f"'{written[i]}' on lines {seen[k] + 2} and {i + 2}")
        else:
            seen[k] = i
    if dups:
        raise IngestError(f"{path}: column '{id_column}' has duplicate subjects: {'; '.join(dups[:10])}")
    return written, keys


def class_labels(df: pd.DataFrame, path: Path, name: str, values: list | None, n_classes: int, key: str) -> np.ndarray:
    """Class index per row (-1 where the cell is empty); an unknown value is an error."""
    col = column(df, path, name, key)
    if values is not None:
        mapping = {str(v).strip(): k for k, v in enumerate(values)}
        allowed = f"the values named in 'labels' ({', '.join(map(str, values))})"
    else:
        mapping = {str(k): k for k in range(n_classes)}
        mapping.update({f"{k}.0": k for k in range(n_classes)})
        allowed = f"0..{n_classes - 1} (or name the values with 'labels:')"
    out = np.full(len(col), -1, dtype=np.int64)
    bad = []
    for i, v in enumerate(col):
        if pd.isna(v):
            continue
        k = mapping.get(str(v).strip())
        if k is None:
            bad.append(i)
        else:
            out[i] = k
    if bad:
        shown = sorted({str(col.iloc[i]) for i in bad})[:5]
        raise IngestError(
            f"{path}: column '{name}' holds {', '.join(repr(s) for s in shown)} on line(s) {lines(bad)}; "
            f"allowed: {allowed}"
        )
    return out


def numbers(df: pd.DataFrame, path: Path, name: str, key: str) -> np.ndarray:
    """float64 per row, NaN where the cell is empty; text that is not a number is an error."""
    col = column(df, path, name, key)
    vals = pd.to_numeric(col, errors="coerce")
    bad = col.index[col.notna() & vals.isna()]
    if len(bad):
        shown = sorted({str(col.iloc[i]) for i in bad})[:5]
        raise IngestError(
            f"{path}: column '{name}' holds non-numbers {', '.join(repr(s) for s in shown)} on line(s) {lines(bad)}"
        )
    arr = vals.to_numpy(dtype=np.float64)
    if np.isinf(arr).any():
        raise IngestError(
            f"{path}: column '{name}' holds an infinite value on line(s) {lines(np.flatnonzero(np.isinf(arr)))}"
        )
    # Shards store these as float32: a finite value beyond its range would become inf there
    # (and NaN predictions after standardising).
    big = np.flatnonzero(np.abs(np.nan_to_num(arr)) > np.finfo(np.float32).max)
    if len(big):
        raise IngestError(
            f"{path}: column '{name}' holds {arr[big[0]]:g} on line(s) {lines(big)}: beyond float32's range "
            f"(|x| <= {np.finfo(np.float32).max:.3g}), the precision a cohort stores"
        )
    return arr

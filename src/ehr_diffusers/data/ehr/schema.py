"""The patient vector schema: which columns make up a record vector, how each is encoded and decoded.

One ``EHRSchema`` is fitted on the training split, saved as ``schema.json`` beside every dataset (and later every
model), and is the only place where the layout of a vector is known. A vector is the concatenation of:

==================  ===========  =====================================================================
group               kind         encoding
==================  ===========  =====================================================================
sex                 binary       1.0 = female ("F"), 0.0 = male ("M"), as MIMIC-IV ``gender``
age                 continuous   (age - min) / (max - min), min and max taken from the training split
death               binary       1.0 = a date of death is recorded (``dod``)
num_admissions      count        log1p(n) / log1p(max), max taken from the training split
marital_status      one_hot      fixed categories, ``MISSING`` for no value or no admission
race                one_hot      fixed categories, ``MISSING`` for no value or no admission
icd10_categories    multi_hot    sorted 3-character ICD-10-CM categories of the vocabulary
==================  ===========  =====================================================================

Category lists are sorted (or fixed) and stored, so a schema never depends on the order in which data arrived.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import pyarrow as pa

from ...errors import DataError

SCHEMA_NAME = "schema.json"
SCHEMA_VERSION = 1
MISSING = "MISSING"

GroupKind = Literal["binary", "continuous", "count", "one_hot", "multi_hot"]


@dataclass
class ColumnGroup:
    """A contiguous slice of the vector that encodes one record field."""

    name: str
    kind: GroupKind
    categories: list[Any] = field(default_factory=list)
    minimum: float | None = None
    maximum: float | None = None
    titles: list[str | None] | None = None

    @property
    def width(self) -> int:
        return len(self.categories) if self.kind in ("one_hot", "multi_hot") else 1

    def to_dict(self) -> dict:
        data: dict[str, Any] = {"name": self.name, "kind": self.kind, "width": self.width}
        if self.kind in ("binary", "one_hot", "multi_hot"):
            data["categories"] = self.categories  # for binary: [value at 0.0, value at 1.0]
        else:
            data.update(minimum=self.minimum, maximum=self.maximum)
            data["scaling"] = "minmax" if self.kind == "continuous" else "log1p_max"
        if self.titles is not None:
            data["titles"] = self.titles
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ColumnGroup:
        return cls(
            name=data["name"],
            kind=data["kind"],
            categories=list(data.get("categories", [])),
            minimum=data.get("minimum"),
            maximum=data.get("maximum"),
            titles=data.get("titles"),
        )


def _plain(values: Any) -> Any:
    """numpy arrays and torch tensors -> python lists, also when nested the way datasets returns ragged columns
    (an object array or a list of arrays)."""
    if hasattr(values, "tolist") and getattr(values, "dtype", None) != object:  # noqa: E721  (numpy dtype vs object: `is not` would be wrong)
        return values.tolist()
    if isinstance(values, (list, tuple, np.ndarray)):
        return [_plain(value) for value in values]
    return values


def _as_frame(records: Any) -> pl.DataFrame:
    if isinstance(records, pl.DataFrame):
        return records
    if isinstance(records, pa.Table):
        return pl.from_arrow(records)
    if isinstance(records, Mapping):
        return pl.DataFrame({name: _plain(values) for name, values in records.items()})
    return pl.DataFrame(list(records))


class EHRSchema:
    """Encodes patient records (columns) into float32 vectors and decodes vectors or logits back into records."""

    def __init__(self, groups: Sequence[ColumnGroup], metadata: Mapping[str, Any] | None = None):
        self.groups = list(groups)
        self.metadata = dict(metadata or {})
        names = [group.name for group in self.groups]
        if len(set(names)) != len(names):
            raise ValueError(f"schema group names must be unique, got {names}")
        self.slices: dict[str, slice] = {}
        start = 0
        for group in self.groups:
            self.slices[group.name] = slice(start, start + group.width)
            start += group.width
        self.dim = start

    def __getitem__(self, name: str) -> ColumnGroup:
        for group in self.groups:
            if group.name == name:
                return group
        raise KeyError(f"schema has no group {name!r}; groups: {[g.name for g in self.groups]}")

    def __repr__(self) -> str:
        parts = ", ".join(f"{g.name}:{g.kind}[{g.width}]" for g in self.groups)
        return f"EHRSchema(dim={self.dim}, {parts})"

    @property
    def codes(self) -> list[str]:
        """The ICD-10 category vocabulary, in vector order."""
        return list(self["icd10_categories"].categories)

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(
        cls,
        train: pl.DataFrame,
        codes: Sequence[str],
        marital_categories: Sequence[str],
        race_categories: Sequence[str],
        code_titles: Sequence[str | None] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> EHRSchema:
        """Builds the schema from the training split; scaling constants come from its data, never from constants."""
        if train.height == 0:
            raise ValueError("cannot fit a schema on an empty training split")
        ages = train["age"]
        admissions = train["num_admissions"]
        groups = [
            ColumnGroup("sex", "binary", categories=["M", "F"]),
            ColumnGroup("age", "continuous", minimum=float(ages.min()), maximum=float(ages.max())),
            ColumnGroup("death", "binary", categories=[False, True]),
            ColumnGroup("num_admissions", "count", minimum=0.0, maximum=float(max(int(admissions.max()), 1))),
            ColumnGroup("marital_status", "one_hot", categories=list(marital_categories)),
            ColumnGroup("race", "one_hot", categories=list(race_categories)),
            ColumnGroup(
                "icd10_categories",
                "multi_hot",
                categories=list(codes),
                titles=list(code_titles) if code_titles is not None else None,
            ),
        ]
        if list(codes) != sorted(codes):
            raise ValueError("the code vocabulary must be sorted so that it does not depend on data order")
        return cls(groups, metadata)

    # ------------------------------------------------------------------ encoding
    def encode(self, records: pl.DataFrame | Mapping[str, Sequence] | Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Records -> float32 array (n, dim).

        ``records`` is a polars frame, an Arrow table, a mapping of columns (a ``datasets`` batch in python, numpy
        or torch format) or a list of record dicts (what ``decode`` returns). The multi-hot group is read from
        ``code_indices`` (vocabulary indices) when present, else from the ``icd10_categories`` strings (codes outside
        the vocabulary are ignored).
        """
        frame = _as_frame(records)
        n = frame.height
        out = np.zeros((n, self.dim), dtype=np.float32)
        for group in self.groups:
            where = self.slices[group.name]
            if group.kind == "multi_hot":
                rows, cols = self._code_positions(frame, group)
                out[rows, where.start + cols] = 1.0
                continue
            values = self._column(frame, group.name)
            if group.kind == "binary":
                if isinstance(group.categories[1], bool) and values.dtype.is_integer():
                    values = values.cast(pl.Boolean)  # 0/1 for False/True
                unknown = ~values.is_in(group.categories) | values.is_null()
                if unknown.any():
                    raise ValueError(f"column {group.name} has value(s) outside {group.categories}: "
                                     f"{values.filter(unknown).unique().head(5).to_list()}")
                out[:, where.start] = (values == group.categories[1]).to_numpy().astype(np.float32)
            elif group.kind == "continuous":
                span = (group.maximum - group.minimum) or 1.0
                out[:, where.start] = (values.cast(pl.Float64).to_numpy() - group.minimum) / span
            elif group.kind == "count":
                scale = np.log1p(group.maximum)
                out[:, where.start] = np.log1p(np.clip(values.cast(pl.Float64).to_numpy(), 0, None)) / scale
            elif group.kind == "one_hot":
                index = {value: i for i, value in enumerate(group.categories)}
                filled = values.fill_null(MISSING).to_list()
                unknown = sorted({value for value in filled if value not in index})
                if unknown:
                    raise ValueError(f"column {group.name} has value(s) outside the schema categories: {unknown[:5]}")
                out[np.arange(n), where.start + np.fromiter((index[v] for v in filled), dtype=np.int64, count=n)] = 1.0
        return out

    @staticmethod
    def _column(frame: pl.DataFrame, name: str) -> pl.Series:
        if name not in frame.columns:
            raise ValueError(f"records lack column {name!r}; columns: {frame.columns}")
        return frame[name]

    def _code_positions(self, frame: pl.DataFrame, group: ColumnGroup) -> tuple[np.ndarray, np.ndarray]:
        if "code_indices" in frame.columns:
            exploded = frame.select(pl.int_range(pl.len()).alias("row"), "code_indices").explode("code_indices")
            exploded = exploded.drop_nulls("code_indices")
            cols = exploded["code_indices"].to_numpy().astype(np.int64)
            if len(cols) and (cols.min() < 0 or cols.max() >= group.width):
                raise ValueError(f"column code_indices has indices outside [0, {group.width})")
            return exploded["row"].to_numpy(), cols
        column = self._column(frame, group.name).cast(pl.List(pl.String))
        lookup = pl.DataFrame(
            {"code": pl.Series(group.categories, dtype=pl.String), "col": np.arange(group.width, dtype=np.int64)}
        )
        exploded = (
            pl.DataFrame({"row": np.arange(frame.height), "code": column})
            .explode("code")
            .join(lookup, on="code", how="inner")
        )
        return exploded["row"].to_numpy(), exploded["col"].to_numpy()

    # ------------------------------------------------------------------ decoding
    def decode(
        self,
        vectors: Any,
        from_logits: bool = False,
        code_threshold: float | np.ndarray = 0.5,
    ) -> list[dict[str, Any]]:
        """Vectors (values in [0, 1]) or logits -> records.

        One-hot groups take the argmax; binary fields and codes are thresholded on probabilities (``code_threshold``
        may be one number or one per code); counts are rounded and non-negative; age is clipped to the data range.
        With ``from_logits`` a sigmoid is applied to the binary and multi-hot groups only: continuous and count
        fields are regression outputs on the encoded scale either way.
        """
        array = np.asarray(vectors.detach().cpu().float() if hasattr(vectors, "detach") else vectors, dtype=np.float64)
        if array.ndim != 2 or array.shape[1] != self.dim:
            raise ValueError(f"expected vectors of shape (n, {self.dim}), got {array.shape}")
        if not np.isfinite(array).all():
            raise ValueError("vectors hold NaN or infinite values")
        columns: dict[str, list] = {}
        for group in self.groups:
            block = array[:, self.slices[group.name]]
            if group.kind in ("binary", "multi_hot") and from_logits:
                block = 1.0 / (1.0 + np.exp(-block))
            if group.kind == "binary":
                columns[group.name] = [group.categories[int(v)] for v in block[:, 0] >= 0.5]
            elif group.kind in ("continuous", "count"):
                columns[group.name] = self.decode_column(group.name, block[:, 0]).tolist()
            elif group.kind == "one_hot":
                columns[group.name] = [group.categories[i] for i in block.argmax(axis=1)]
            else:
                threshold = np.broadcast_to(np.asarray(code_threshold, dtype=np.float64), (group.width,))
                hits = block >= threshold
                names = np.asarray(group.categories, dtype=object)[np.nonzero(hits)[1]]
                columns[group.name] = [part.tolist() for part in np.split(names, np.cumsum(hits.sum(axis=1))[:-1])]
        n = array.shape[0]
        return [{name: values[i] for name, values in columns.items()} for i in range(n)]

    def decode_column(self, name: str, values: np.ndarray) -> np.ndarray:
        """A continuous or count field's encoded values -> whole numbers in the field's units (age in years,
        admissions), clipped to the data range."""
        group = self[name]
        values = np.asarray(values, dtype=np.float64)
        if group.kind == "continuous":
            value = group.minimum + values * (group.maximum - group.minimum)
            return np.rint(np.clip(value, group.minimum, group.maximum)).astype(int)
        if group.kind == "count":
            value = np.expm1(np.clip(values, 0.0, None) * np.log1p(group.maximum))
            return np.clip(np.rint(value), 0, group.maximum).astype(int)
        raise ValueError(f"group {name!r} is {group.kind}; decode_column reads continuous and count fields")

    # ------------------------------------------------------------------ persistence
    def fingerprint(self) -> str:
        """SHA-256 of the vector layout (groups, in order): recorded when the schema is written and checked whenever
        it is read, so that a schema edited by hand (a code or group removed, which shifts every vector) is refused."""
        groups = json.dumps([group.to_dict() for group in self.groups], sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(groups.encode()).hexdigest()

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "dim": self.dim,
            "sha256": self.fingerprint(),
            "groups": [group.to_dict() for group in self.groups],
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EHRSchema:
        """The schema of ``to_dict``; a DataError when it is not one, or when its groups do not match the ``sha256``
        recorded with them (schemas written before it was recorded are read unchecked)."""
        if data.get("schema_version") != SCHEMA_VERSION:
            raise DataError(f"unsupported schema_version {data.get('schema_version')!r} (expected {SCHEMA_VERSION})")
        schema = cls([ColumnGroup.from_dict(group) for group in data["groups"]], data.get("metadata"))
        if "dim" in data and data["dim"] != schema.dim:
            raise DataError(f"schema dim {data['dim']} does not match its groups ({schema.dim})")
        if "sha256" in data and data["sha256"] != schema.fingerprint():
            raise DataError(f"the schema's groups do not match its recorded sha256 {data['sha256'][:12]}...: it was "
                            "changed after `ehr-diffusers prepare` wrote it; prepare the dataset again")
        return schema

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / SCHEMA_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> EHRSchema:
        """Loads ``schema.json`` from a file or from a dataset/model folder."""
        path = Path(path)
        if path.is_dir() or path.suffix != ".json":
            path = path / SCHEMA_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: schema file not found")
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except DataError as error:
            raise DataError(f"{path}: {error}") from None
        except (KeyError, TypeError, AttributeError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DataError(f"{path}: not a valid ehr-diffusers schema ({error})") from error

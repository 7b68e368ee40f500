"""The run manifest: a CSV with one row per case.

Columns (header required, order free, names case-insensitive):

- ``image`` (required, unless the row names a PACS ``study``): path of the image (PNG/JPEG, DICOM, NIfTI,
  ``.npy``), relative to the manifest's folder or absolute; or one single-channel file per input channel, separated by ``|``
  (``case_0000.nii.gz|case_0001.nii.gz``: read as ``explain`` reads several files);
- ``mask`` (optional): path of a binary mask of the evidence on the image grid (voxels > 0 are inside);
  when given, the run scores each map with the pointing game (:func:`medexplain.metrics.hit_rate`);
- ``label`` (optional): the true class index, reported next to the prediction;
- ``target`` (optional): the class index to explain; empty or ``predicted`` = the default of the one
  target grammar (:func:`medexplain.engine.targets.resolve_target`: a classifier's top class, a segmenter's
  foreground class with the most predicted voxels);
- ``region`` (optional, segmenters): ``predicted`` (default), ``all``, or a mask file (resampled onto the
  image grid by its geometry) of the region to explain;
- ``spacing``, ``orientation``, ``spatial_size``, ``min_spatial_size``, ``divisible_by``, ``intensity``,
  ``transform`` (optional): the preprocessing of the case, as the command line's ``--spacing`` etc.
  (:class:`medexplain.models.transforms.Preprocessing`); the maps are put back on the image grid;
- ``series`` (optional): the SeriesInstanceUID to read when the image is a folder of several DICOM series, or
  the series of the row's PACS study;
- ``study`` (optional, with ``run --pacs URL``): a StudyInstanceUID on the PACS instead of an image file: the
  case's series (its only image series, or ``series``) is retrieved (WADO-RS), explained, and its DICOM objects
  stored back into the study (STOW-RS); a row gives an image or a study, not both;
- ``case_id`` (optional): a unique name of the case, kept as written (Unicode included: ``Müller`` stays
  ``Müller``); default ``<row>_<image stem>`` (the stem of :func:`medexplain.io.file_stem`; ``<row>_<study UID>``
  for a study). Its output folder
  is :func:`medexplain.io.safe_file_name` of it (only unsafe characters percent-encoded, reversibly); two ids
  that would share a folder on a case-insensitive file system (``Müller``, ``müller``) are refused by name.

Every problem is reported at once with its row number, before anything is computed or written.
"""
from __future__ import annotations

import csv
import difflib
import hashlib
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from medexplain.errors import FileFormatError
from medexplain.io import file_stem, safe_file_name

#: Separates the files of a case given as one file per input channel in the ``image`` cell.
IMAGE_SEPARATOR = "|"
PREPROCESSING_COLUMNS = ("spacing", "orientation", "spatial_size", "min_spatial_size", "divisible_by", "intensity",
                         "transform")
COLUMNS = ("image", "study", "mask", "label", "target", "case_id", "region", "series", *PREPROCESSING_COLUMNS)


class ManifestError(FileFormatError):
    """The manifest cannot be used: missing, not a CSV with an ``image`` column, or bad cells."""


@dataclass(frozen=True)
class Case:
    """One manifest row, paths resolved. ``index`` is the 0-based data-row number (the table's order).
    ``study``: a StudyInstanceUID on the run's PACS (``image`` is then empty until the series is retrieved)."""

    index: int
    case_id: str
    image: str
    mask: str | None = None
    label: int | None = None
    target: int | None = None
    region: str | None = None
    series: str | None = None
    preprocessing: tuple = ()   # (column, cell) pairs of the preprocessing columns that are set
    study: str | None = None

    @property
    def images(self) -> list[str]:
        """The case's image file(s): one, or one per input channel (the cell's ``|``-separated paths)."""
        return self.image.split(IMAGE_SEPARATOR)

    def preprocessing_spec(self):
        """The case's :class:`medexplain.models.transforms.Preprocessing`."""
        from medexplain.models.transforms import Preprocessing
        return Preprocessing(**dict(self.preprocessing))


def folder_key(case_id: str) -> str:
    """What decides whether two case ids share an output folder on a case-insensitive or Unicode-normalising
    file system (macOS, Windows): the folder name (:func:`medexplain.io.safe_file_name`) in NFC, case-folded."""
    return unicodedata.normalize("NFC", safe_file_name(case_id)).casefold()


def _int_cell(value: str, column: str, line: int) -> int | None:
    value = value.strip()
    if value == "":
        return None
    try:
        v = int(value)
    except ValueError:
        raise ManifestError(f"line {line}: {column} must be an integer class index or empty, got {value!r}") from None
    if v < 0:
        raise ManifestError(f"line {line}: {column} must be >= 0, got {v}")
    return v


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(path) -> list[Case]:
    """Parse and validate a manifest CSV into :class:`Case` rows (paths made absolute).

    Raises :class:`ManifestError` naming the line for: a missing or unreadable file, no header or no
    ``image`` column (close matches suggested), no data rows, an empty image cell, a non-integer or
    negative ``label`` / ``target``, or a repeated ``case_id``. Whether the image files exist is not
    checked here: a missing image becomes an error row of the run, and the other cases go on.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: no such manifest file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: cannot read the manifest as UTF-8 text ({type(e).__name__})") from e
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ManifestError(f"{path}: the manifest is empty; expected a CSV header with an 'image' column")
    try:
        dialect = csv.Sniffer().sniff(lines[0], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.reader(lines, dialect)
    header = [h.strip().lower() for h in next(reader)]
    if "image" not in header and "study" not in header:
        close = difflib.get_close_matches("image", header, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ManifestError(f"{path}: no 'image' column{hint}; found columns {header}; expected {list(COLUMNS)}")
    dup = sorted({h for h in header if header.count(h) > 1 and h})
    if dup:
        raise ManifestError(f"{path}: repeated column(s) {dup}")
    col = {name: header.index(name) for name in COLUMNS if name in header}
    base = path.resolve().parent
    rows = list(reader)
    if not rows:
        raise ManifestError(f"{path}: the manifest has a header but no cases")
    width = max(5, len(str(len(rows) - 1)))
    cases, seen, folders = [], {}, {}
    for i, row in enumerate(rows):
        line = i + 2
        if len(row) > len(header):
            raise ManifestError(f"line {line}: {len(row)} cells for {len(header)} columns "
                                "(a comma inside a path? quote it)")
        cells = {name: row[j].strip() if j < len(row) else "" for name, j in col.items()}
        case = _case(i, line, cells, base, width)
        if case.case_id in seen:
            raise ManifestError(f"line {line}: case_id {case.case_id!r} repeats line {seen[case.case_id]}")
        key = folder_key(case.case_id)
        if key in folders:
            other, other_line = folders[key]
            raise ManifestError(f"line {line}: case_id {case.case_id!r} and {other!r} (line {other_line}) would share "
                                "one output folder on case-insensitive or Unicode-normalising file systems; make "
                                "them differ by more than letter case or Unicode normalisation")
        seen[case.case_id], folders[key] = line, (case.case_id, line)
        cases.append(case)
    return cases


def _case(i: int, line: int, cells: dict[str, str], base: Path, width: int) -> Case:
    """One data row (its cells by column name) as a :class:`Case`; default id ``<row>_<file stem>``."""
    image, study = cells.get("image", ""), cells.get("study", "")
    if image and study:
        raise ManifestError(f"line {line}: give an image file or a PACS study, not both")
    if not image and not study:
        raise ManifestError(f"line {line}: the image cell is empty" + (" (and the study cell)" if "study" in cells else ""))
    mask = cells.get("mask") or None

    def resolve(p: str) -> str:
        return str(Path(p) if Path(p).is_absolute() else (base / p))

    files = [resolve(p.strip()) for p in image.split(IMAGE_SEPARATOR) if p.strip()]
    if image and not files:
        raise ManifestError(f"line {line}: the image cell names no file")
    if study and not all(part.isdigit() for part in study.split(".")) or len(study) > 64:
        raise ManifestError(f"line {line}: the study cell must be a StudyInstanceUID (digits and dots), got {study!r}")
    case_id = cells["case_id"] if cells.get("case_id") else f"{i:0{width}d}_{file_stem(files[0]) if files else study}"
    target = cells.get("target", "")
    region = cells.get("region") or None
    if region is not None:
        region = region.lower() if region.lower() in ("predicted", "all") else resolve(region)
    prep = tuple((c, cells[c]) for c in PREPROCESSING_COLUMNS if cells.get(c))
    if prep:
        from medexplain.errors import MedexplainError
        from medexplain.models.transforms import Preprocessing
        try:
            Preprocessing(**dict(prep))
        except MedexplainError as e:
            raise ManifestError(f"line {line}: {e}") from None
    return Case(index=i, case_id=case_id, image=IMAGE_SEPARATOR.join(files), mask=resolve(mask) if mask else None,
                label=_int_cell(cells.get("label", ""), "label", line),
                target=None if target.strip().lower() == "predicted" else _int_cell(target, "target", line),
                region=region, series=cells.get("series") or None,
                preprocessing=prep, study=study or None)

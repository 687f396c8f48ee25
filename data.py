"""NIfTI datasets, splits, 2D preprocessing and its exact inverse, and a synthetic cardiac phantom.

Imports only NumPy, nibabel and the standard library, so the file can be copied on its own.

Layouts (``detect_layout`` tries them in this order; ``layout=`` forces one):

- ``acdc``: ``patientXXX/patientXXX_frameYY.nii.gz`` + ``..._gt.nii.gz`` + ``Info.cfg``, in the folder itself or
  in its ``training/`` and ``testing/`` subfolders. ED/ES frame numbers come from Info.cfg (patient090's ED is
  frame04); ``_4d`` files are never read. Classes 0 background, 1 RV, 2 MYO, 3 LV. A frame without ``_gt`` is an
  unlabeled volume (the original testing release has none).
- ``mmwhs``: ``mr_train_XXXX_image.nii.gz`` + ``mr_train_XXXX_label.nii.gz`` in the folder or its ``mr_train/``
  subfolder; a missing label file is an error. Raw values 205, 420, 500, 550, 600, 820, 850 become classes 1-7
  (MYO, LA, LV, RA, RV, AA, PA) in ascending order.
- ``own``: ``imagesTr/NAME.nii.gz`` + ``labelsTr/NAME.nii.gz`` (an nnU-Net image ``NAME_0000`` also matches
  label ``NAME``; the id is then ``NAME``), optional unlabeled ``imagesUnlabeled/*.nii.gz``; ``.nii`` works too.
  An image without label, or a label without image, is an error. Raw label values are the classes (0-255).

Decisions (for the README's "Decisions and deviations"):

- Label map ``"RAW:CLASS,..."`` (e.g. ``"1:3,3:1"`` swaps two classes), same meaning for every layout: a raw
  value in the map becomes that class; any other raw value takes the layout's default (ACDC: 0-3 unchanged;
  MMWHS: 0 and the seven values above; own: unchanged if an integer 0-255). A raw value with neither is an error
  naming the file and the values. For ACDC and MMWHS a mapped class must be below the layout's class count.
  An empty or blank map is an error (leave the option out for none).
- ``frames``: ``ed`` (default) and ``es`` keep the patient id as volume id (``patient001``); ``both`` gives
  ``patient001_ED`` and ``patient001_ES``. Splits are made over cases (``Volume.case`` = patient id), so the two
  frames of a patient always share a split and a labeled/unlabeled status. Other layouts ignore ``frames``.
- Images are read as float32 with trailing length-1 axes beyond the third dropped and 2D images taken as one slice.
  Errors: zero-size, 4D, all voxels non-finite, and constant images (nothing to segment; also percentile scaling
  would be undefined). NaN/Inf voxels are replaced by the volume's minimum finite value with a ``DataWarning``
  naming the file (the CLI prints it as one ``warning:`` line on stderr).
- Image and label must have equal shapes and affines equal within 1e-3 (absolute, per element).
- Files are read in full: a gzipped file is decompressed to its end, so a CRC32 or length mismatch (one flipped byte)
  is an error instead of silently different voxels; a header claiming more voxels than the file holds is
  "truncated". Voxel sizes of the first 3 axes must be finite and positive as stored (nibabel would quietly turn
  0 into 1 and -2 into 2) and within ``VOXEL_RANGE``, the affine finite, the voxel type one real number (RGB,
  structured and complex types are errors). nibabel's own log lines and warnings never reach stderr.
- Info.cfg ``ED:``/``ES:`` must be positive integers (digits only). ``synth`` writes only to a new or empty folder,
  atomically: into a hidden sibling folder that is renamed into place at the end (removed if the write fails).
- Spacing is the header's zooms (pixdim), in array axis order; ACDC's sform has unit scale, its pixdim is right.
- Rounding is round-half-up, exact on the decimal percentage: ``labeled_count(p, n) = max(1, floor(p*n/100 + 1/2))``
  (ACDC 78 train: 1.25% -> 1, 2.5% -> 2, 10% -> 8, 100% -> 78; MMWHS 8 train: 10/20/40/100% -> 1/2/3/8).
- Labeled subset: the labeled training cases sorted by id, permuted by ``numpy.random.default_rng(seed)``, the
  first ``labeled_count`` taken; so for one seed a smaller percentage gives a subset of a larger one.
- ACDC split: test = Chaitanya et al.'s 20 patients (007-010, 027-030, 047-050, 067-070, 087-090), val = 011 and
  071, train = every other patient found (78 for the standard 001-100; extra testing/ patients join train).
- MMWHS split, by sorted id: the last round(n/2) cases are test, the round(n/10) before them val, the rest train
  (20 volumes 1001-1020: train 1001-1008, val 1009-1010, test 1011-1020).
- Own split: the labeled cases sorted by id are permuted by ``default_rng(split_seed)`` (default 0, independent of
  the run seed so every run shares one test set); the first round(0.2 n) are test, the next round(0.1 n) val, the
  rest train. Unlabeled images always go to train (unlabeled). Every split keeps at least one training case.
- ``stack_slices`` returns labels only when every volume is labeled (else None).
- Preprocessing and its inverse are one separable resampling per slice with the exact centre-aligned mapping in
  ``grid``; samples outside the native image are 0 (image) and background (label). The forward label path is
  nearest neighbour (as Chaitanya et al.); the inverse is bilinear on one-hot/probability maps, then argmax.
"""
import argparse
import contextlib
import csv
import dataclasses
import glob
import gzip
import json
import logging
import math
import os
import re
import shutil
import struct
import sys
import warnings
import zlib
from fractions import Fraction
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

LAYOUTS = ("acdc", "mmwhs", "own")
CLASS_NAMES = {"acdc": ("background", "RV", "MYO", "LV"),
               "mmwhs": ("background", "MYO", "LA", "LV", "RA", "RV", "AA", "PA")}
MMWHS_VALUES = (205, 420, 500, 550, 600, 820, 850)
ACDC_TEST = tuple(f"patient{i:03d}" for first in (7, 27, 47, 67, 87) for i in range(first, first + 4))
ACDC_VAL = ("patient011", "patient071")
ACDC_GROUPS = ("DCM", "HCM", "MINF", "NOR", "RV")  # ACDC order: 001-020 DCM, ..., 081-100 RV
SPLIT_KEYS = ("layout", "seed", "labeled_percent", "train", "val", "test", "labeled", "unlabeled")
AFFINE_TOL = 1e-3
VOXEL_RANGE = (1e-4, 1e4)  # mm: plausible voxel sizes; outside them a header is damaged (1e30 mm overflows volumes)
READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, ImageFileError, HeaderDataError)


class DataError(ValueError):
    """Bad input data; the message names the path and the problem on one line."""


class DataWarning(UserWarning):
    """Recoverable data problem (NaN/Inf voxels replaced)."""


@dataclasses.dataclass(eq=False)
class Volume:
    """One 3D image (slices along the last axis) with its optional label and native geometry.

    image: float32 (X, Y, Z); label: uint8 class indices (X, Y, Z) or None; spacing: header zooms in mm in array
    axis order; case: the id that splits group by (ACDC patient id; defaults to id).
    """
    id: str
    image: np.ndarray = dataclasses.field(repr=False)
    label: np.ndarray | None = dataclasses.field(repr=False)
    affine: np.ndarray = dataclasses.field(repr=False)
    header: nib.Nifti1Header = dataclasses.field(repr=False)
    spacing: tuple[float, float, float]
    path: str
    frame: str = ""
    group: str = ""
    case: str = ""

    def __post_init__(self):
        self.case = self.case or self.id


# ----------------------------------------------------------------------------------------------- reading


def parse_label_map(text: str | None) -> dict[int, int] | None:
    """``"1:3,3:1"`` -> ``{1: 3, 3: 1}`` (raw value -> class 0-255); None -> None; empty or blank text is an
    error (an option given with nothing in it is a mistake, not "no map")."""
    if text is None:
        return None
    if not text.strip():
        raise DataError(f"--label-map must not be empty (got {text!r}); leave the option out for no remapping")
    mapping = {}
    for item in text.split(","):
        match = re.fullmatch(r"\s*(-?\d+)\s*:\s*(\d+)\s*", item)
        if match is None:
            raise DataError(f"label map {text!r}: {item.strip()!r} is not RAW:CLASS with integers")
        raw, cls = int(match[1]), int(match[2])
        if raw in mapping or cls > 255:
            raise DataError(f"label map {text!r}: raw value {raw} given twice or class {cls} > 255")
        mapping[raw] = cls
    return mapping


def _label_table(layout: str, label_map: dict[int, int] | None) -> dict[int, int]:
    """Raw value -> class of the layout, overridden by label_map (own: identity is added in ``_to_classes``)."""
    default = {"acdc": {v: v for v in range(4)},
               "mmwhs": {0: 0, **{v: c for c, v in enumerate(MMWHS_VALUES, 1)}},
               "own": {}}[layout]
    return {**default, **(label_map or {})}


def _to_classes(raw: np.ndarray, table: dict[int, int], identity: bool, path) -> np.ndarray:
    """Integer-valued raw labels -> uint8 classes by ``table`` (and identity on 0-255 if ``identity``)."""
    values, inverse = np.unique(raw, return_inverse=True)
    classes = [table.get(v, int(v) if identity and float(v).is_integer() and 0 <= v <= 255 else None)
               for v in values.tolist()]
    unknown = [f"{v:g}" for v, c in zip(values.tolist(), classes) if c is None]
    if unknown:
        expected = "integers 0-255" if identity else ", ".join(map(str, sorted(table)))
        raise DataError(f"{path}: label values {', '.join(unknown[:10])} outside the expected set ({expected}); "
                        "pass a label map to remap them")
    return np.asarray(classes, np.uint8)[inverse.reshape(raw.shape)]


@contextlib.contextmanager
def _quiet_nibabel():
    """Keep nibabel's own log lines (logger ``nibabel.global``, e.g. header fixes) and warnings off stderr."""
    logger = logging.getLogger("nibabel.global")
    disabled, logger.disabled = logger.disabled, True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.disabled = disabled


def _file_bytes(path) -> bytes:
    """The bytes of a file, decompressed in full if it is gzipped (which checks every member's CRC32 and length,
    so a corrupted or cut ``.nii.gz`` raises instead of loading wrong voxels)."""
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
        f.seek(0)
        if not gzipped:
            return f.read()
        with gzip.GzipFile(fileobj=f) as stream:
            return stream.read()


def _nifti_image(raw: bytes, path) -> nib.Nifti1Image:
    """NIfTI-1/2 image from the bytes of a file; DataError naming ``path`` for no header, non-finite, zero or
    negative voxel sizes (first 3 axes, read before nibabel 'fixes' them) or ones outside VOXEL_RANGE, a
    non-finite affine, a voxel type that is not one real number (RGB, structured, complex), or fewer data bytes
    than the header claims."""
    klass = next((k for k in (nib.Nifti1Image, nib.Nifti2Image)
                  if k.header_class.may_contain_header(raw[:k.header_class.sizeof_hdr])), None)
    if klass is None:
        raise DataError(f"{path}: unreadable or truncated NIfTI (no NIfTI-1 or NIfTI-2 header)")
    stored = klass.header_class(raw[:klass.header_class.sizeof_hdr], check=False)
    zooms = stored["pixdim"][1:1 + min(3, max(int(stored["dim"][0]), 1))]
    if not np.all(np.isfinite(zooms) & (zooms > 0)):
        raise DataError(f"{path}: voxel sizes {', '.join(f'{z:g}' for z in zooms)} in the header must be finite "
                        "and positive")
    odd = [f"{z:g}" for z in zooms if not VOXEL_RANGE[0] <= z <= VOXEL_RANGE[1]]
    if odd:
        raise DataError(f"{path}: voxel sizes {', '.join(odd)} mm in the header are outside the plausible range "
                        f"{VOXEL_RANGE[0]:g}-{VOXEL_RANGE[1]:g} mm")
    img = klass.from_bytes(raw)
    if not np.isfinite(img.affine).all():
        raise DataError(f"{path}: the header's affine has non-finite values")
    if img.get_data_dtype().kind not in "biuf":
        raise DataError(f"{path}: structured/RGB or complex voxel type {img.get_data_dtype()} is not supported "
                        "(one real number per voxel is needed)")
    proxy = img.dataobj
    need = proxy.offset + math.prod(proxy.shape) * proxy.dtype.itemsize
    if len(raw) < need:
        raise DataError(f"{path}: unreadable or truncated NIfTI (header shape {proxy.shape} needs {need} bytes, "
                        f"the file holds {len(raw)})")
    return img


def _read_array(path, image: bool) -> tuple[np.ndarray, nib.spatialimages.SpatialImage]:
    """Read a NIfTI of any dimension -> (array as stored, nibabel image); float32 if ``image`` else the stored
    dtype. Gzipped files are checked in full (CRC32, length); nibabel prints nothing; zero-size is an error."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    try:
        with _quiet_nibabel():
            img = _nifti_image(_file_bytes(path), path)
            data = img.get_fdata(dtype=np.float32, caching="unchanged") if image else np.asarray(img.dataobj)
    except DataError:
        raise
    except READ_ERRORS as exc:
        raise DataError(f"{path}: unreadable or truncated NIfTI ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())})") from None
    if 0 in img.shape:
        raise DataError(f"{path}: empty volume of shape {img.shape}")
    return data, img


def _read_nifti(path, image: bool) -> tuple[np.ndarray, nib.spatialimages.SpatialImage]:
    """Read a 3D NIfTI -> (array (X, Y, Z), nibabel image); float32 if ``image`` else the stored dtype.

    Gzipped files are checked in full (CRC32, length); nibabel prints nothing. Trailing length-1 axes beyond the
    third are dropped; a 2D array becomes (X, Y, 1).
    """
    data, img = _read_array(path, image)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3:
        raise DataError(f"{path}: {len(img.shape)}D image of shape {img.shape} where 3D is expected")
    return data, img


def _clean_image(data: np.ndarray, path) -> np.ndarray:
    """Replace NaN/Inf by the minimum finite value (with a DataWarning); reject all-non-finite and constant images."""
    bad = ~np.isfinite(data)
    if bad.all():
        raise DataError(f"{path}: no finite voxel")
    if bad.any():
        low = data[~bad].min()
        data[bad] = low
        # line 0: Python's default formatter then prints no source line, so the warning stays one line
        warnings.warn_explicit(f"{path}: replaced {int(bad.sum())} NaN/Inf voxels by the volume's minimum finite "
                               f"value {low:g}", DataWarning, "data.py", 0)
    if data.min() == data.max():
        raise DataError(f"{path}: constant image (every voxel is {data.min():g}), nothing to segment")
    return data


def _volume(image_path, label_path, table, identity, vid, **meta) -> Volume:
    """Read one image (and its label if ``label_path``) into a Volume, checking shape and affine agreement."""
    image, img = _read_nifti(image_path, image=True)
    image = _clean_image(image, image_path)
    label = None
    if label_path is not None:
        raw, limg = _read_nifti(label_path, image=False)
        if raw.shape != image.shape:
            raise DataError(f"{label_path}: label shape {raw.shape} differs from image shape {image.shape} "
                            f"of {image_path}")
        gap = float(np.abs(limg.affine - img.affine).max())
        if gap > AFFINE_TOL:
            raise DataError(f"{label_path}: label affine differs from the affine of {image_path} by {gap:.3g} "
                            f"(tolerance {AFFINE_TOL:g})")
        label = _to_classes(raw, table, identity, label_path)
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    spacing = tuple(zooms + [1.0] * (3 - len(zooms)))
    return Volume(vid, image, label, np.asarray(img.affine, np.float64), img.header, spacing, str(image_path),
                  **meta)


def _acdc_patients(root: Path) -> list[Path]:
    """``patientXXX`` folders in root, root/training and root/testing, sorted by name."""
    bases = [b for b in (root, root / "training", root / "testing") if b.is_dir()]
    return sorted((d for b in bases for d in b.iterdir() if d.is_dir() and re.fullmatch(r"patient\d+", d.name)),
                  key=lambda d: d.name)


def _mmwhs_images(root: Path) -> list[Path]:
    """``mr_train_XXXX_image.nii.gz`` files in root and root/mr_train, sorted by name."""
    bases = [b for b in (root, root / "mr_train") if b.is_dir()]
    return sorted((p for b in bases for p in b.glob("mr_train_*_image.nii.gz")), key=lambda p: p.name)


def _nifti_files(folder: Path) -> list[Path]:
    """Visible ``.nii.gz``/``.nii`` files of folder (none if it is absent), sorted."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.endswith((".nii.gz", ".nii")) and not p.name.startswith("."))


def _stem(path: Path) -> str:
    return path.name.removesuffix(".gz").removesuffix(".nii")


def _read_info(folder: Path) -> dict[str, str]:
    """ACDC ``Info.cfg`` as {key: value} (``ED: 1`` lines)."""
    path = folder / "Info.cfg"
    if not path.is_file():
        raise DataError(f"{path}: missing Info.cfg")
    pairs = (line.split(":", 1) for line in path.read_text(errors="replace").splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def _frame_number(info: dict[str, str], phase: str, folder: Path) -> int:
    """The ``ED:``/``ES:`` frame number of an Info.cfg (digits only, >= 1); DataError naming the Info.cfg."""
    text = info.get(phase, "")
    if not re.fullmatch(r"\d+", text) or int(text) < 1:
        raise DataError(f"{folder / 'Info.cfg'}: '{phase}: {text}' is not a valid frame number (a positive integer)")
    return int(text)


def _load_acdc(root: Path, frames: str, table, identity) -> list[Volume]:
    """ACDC release layout: the Info.cfg ED and/or ES frame of every patient folder."""
    patients = _acdc_patients(root)
    if not patients:
        raise DataError(f"{root}: no ACDC patientXXX folders (in it or in training/, testing/)")
    phases = ("ED", "ES") if frames == "both" else (frames.upper(),)
    volumes = []
    for folder in patients:
        info = _read_info(folder)
        for phase in phases:
            number = _frame_number(info, phase, folder)
            stem = folder / f"{folder.name}_frame{number:02d}"
            image, label = Path(f"{stem}.nii.gz"), Path(f"{stem}_gt.nii.gz")
            if not image.is_file():
                raise DataError(f"{image}: missing frame file (Info.cfg {phase}: {info[phase]})")
            vid = f"{folder.name}_{phase}" if frames == "both" else folder.name
            volumes.append(_volume(image, label if label.is_file() else None, table, identity, vid,
                                   frame=phase, group=info.get("Group", ""), case=folder.name))
    return volumes


def _load_mmwhs(root: Path, table, identity) -> list[Volume]:
    """MMWHS MR layout: every image with its ``_label`` file."""
    images = _mmwhs_images(root)
    if not images:
        raise DataError(f"{root}: no MMWHS mr_train_XXXX_image.nii.gz files (in it or in mr_train/)")
    return [_volume(p, p.with_name(p.name.replace("_image.nii.gz", "_label.nii.gz")), table, identity,
                    p.name.removesuffix("_image.nii.gz")) for p in images]


def _load_own(root: Path, table, identity) -> list[Volume]:
    """imagesTr/ + labelsTr/ with matching names, plus unlabeled imagesUnlabeled/."""
    images = _nifti_files(root / "imagesTr")
    if not images:
        raise DataError(f"{root / 'imagesTr'}: no .nii or .nii.gz images")
    labels = {_stem(p): p for p in _nifti_files(root / "labelsTr")}
    volumes = []
    for path in images:
        name = _stem(path)
        name = name if name in labels else name.removesuffix("_0000")
        if name not in labels:
            raise DataError(f"{path}: no matching label {root / 'labelsTr' / (name + '.nii.gz')}")
        volumes.append(_volume(path, labels.pop(name), table, identity, name))
    if labels:
        raise DataError(f"{next(iter(labels.values()))}: label without a matching image in imagesTr/")
    return volumes + [_volume(p, None, table, identity, _stem(p)) for p in _nifti_files(root / "imagesUnlabeled")]


def _folder(root) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder" if not root.exists() else f"{root}: not a folder")
    return root


def detect_layout(root: str) -> str:
    """``"acdc"``, ``"mmwhs"`` or ``"own"`` from the folder's contents; DataError if none matches."""
    root = _folder(root)
    if _acdc_patients(root):
        return "acdc"
    if _mmwhs_images(root):
        return "mmwhs"
    if (root / "imagesTr").is_dir():
        return "own"
    raise DataError(f"{root}: no recognised layout (expected acdc: patientXXX/ folders with Info.cfg; mmwhs: "
                    "mr_train_XXXX_image.nii.gz + _label.nii.gz; own: imagesTr/ + labelsTr/)")


def load_volumes(root, layout="auto", frames="ed", label_map=None) -> tuple[str, list[Volume]]:
    """Read every volume of a dataset folder -> (layout, volumes in id order; ACDC "both": ED before ES).

    layout: "auto" | "acdc" | "mmwhs" | "own"; frames: "ed" | "es" | "both" (ACDC only);
    label_map: dict or ``"RAW:CLASS,..."`` text (see the module docstring).
    """
    root = _folder(root)
    layout = detect_layout(root) if layout == "auto" else layout
    if layout not in LAYOUTS or frames not in ("ed", "es", "both"):
        raise DataError(f"{root}: unknown layout {layout!r} or frames {frames!r} "
                        f"(layouts: {', '.join(LAYOUTS)}; frames: ed, es, both)")
    if isinstance(label_map, str):
        label_map = parse_label_map(label_map)
    if layout in CLASS_NAMES and label_map and max(label_map.values()) >= len(CLASS_NAMES[layout]):
        raise DataError(f"label map {label_map}: {layout} has classes 0-{len(CLASS_NAMES[layout]) - 1} only")
    table, identity = _label_table(layout, label_map), layout == "own"
    if layout == "acdc":
        volumes = _load_acdc(root, frames, table, identity)
    elif layout == "mmwhs":
        volumes = _load_mmwhs(root, table, identity)
    else:
        volumes = _load_own(root, table, identity)
    ids = [v.id for v in volumes]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise DataError(f"{root}: volume ids found twice: {', '.join(duplicates)}")
    return layout, volumes


def num_classes(layout: str, volumes) -> int:
    """Class count including background: fixed for ACDC (4) and MMWHS (8), 1 + the largest label (>= 2) for own."""
    if layout in CLASS_NAMES:
        return len(CLASS_NAMES[layout])
    return max([2] + [int(v.label.max()) + 1 for v in volumes if v.label is not None])


def read_scan(path, warn: bool = True) -> tuple[list[Volume], nib.spatialimages.SpatialImage]:
    """A 3D (X, Y, Z) or 4D cine (X, Y, Z, T) NIfTI image to segment -> (one unlabeled Volume per frame, the
    nibabel image whose header the outputs copy).

    The dataset readers' checks: readable, gzip CRC32 and length, finite positive voxel sizes, a finite affine,
    some finite voxel, not constant (NaN/Inf voxels replaced with a DataWarning). Trailing length-1 axes beyond
    the third are dropped and a 2D image is one slice, so the frames' voxels reshape back to ``img.shape``.
    Volume ids: the file name without .nii/.nii.gz, ``NAME_tK`` for frame K of a 4D image. ``warn=False`` keeps
    the NaN/Inf warning quiet (a second read of a file already checked).
    """
    image, img = _read_array(path, image=True)
    while image.ndim > 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim not in (3, 4):
        raise DataError(f"{path}: {len(img.shape)}D image of shape {img.shape} where 3D or 4D is expected")
    with warnings.catch_warnings():
        if not warn:
            warnings.simplefilter("ignore", DataWarning)
        frames = _clean_image(image, path).reshape(*image.shape[:3], -1)
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    spacing = tuple(zooms + [1.0] * (3 - len(zooms)))
    name, affine = _stem(Path(path)), np.asarray(img.affine, np.float64)
    ids = [name] if frames.shape[3] == 1 else [f"{name}_t{t}" for t in range(frames.shape[3])]
    return [Volume(vid, np.ascontiguousarray(frames[..., t]), None, affine, img.header, spacing, str(path))
            for t, vid in enumerate(ids)], img


# ------------------------------------------------------------------------------------------------ splits


def _round_half_up(x: Fraction) -> int:
    return math.floor(x + Fraction(1, 2))


def labeled_count(labeled_percent: float, n_train: int) -> int:
    """max(1, round-half-up(labeled_percent % of n_train)), exact on the decimal percentage."""
    if not 0 < labeled_percent <= 100:
        raise DataError(f"labeled percent {labeled_percent} is outside (0, 100]")
    return max(1, _round_half_up(Fraction(str(labeled_percent)) * n_train / 100))


def _sizes(n: int, test: Fraction, val: Fraction) -> tuple[int, int]:
    """(n_test, n_val) = round-half-up fractions of n, cut so that at least one case is left for training."""
    n_test = min(_round_half_up(test * n), n - 1)
    return n_test, min(_round_half_up(val * n), n - 1 - n_test)


def _partition(cases: dict[str, list[Volume]], layout: str, split_seed: int) -> tuple[list[str], list[str]]:
    """(test cases, val cases) by the layout's rule (module docstring)."""
    if layout == "acdc":
        return [c for c in cases if c in ACDC_TEST], [c for c in cases if c in ACDC_VAL]
    names = sorted(c for c, vols in cases.items() if all(v.label is not None for v in vols))
    if not names:
        raise DataError("no labeled volume to split")
    if layout == "mmwhs":
        n_test, n_val = _sizes(len(names), Fraction(1, 2), Fraction(1, 10))
        return names[len(names) - n_test:], names[len(names) - n_test - n_val:len(names) - n_test]
    n_test, n_val = _sizes(len(names), Fraction(1, 5), Fraction(1, 10))
    order = [names[i] for i in np.random.default_rng(split_seed).permutation(len(names))]
    return sorted(order[:n_test]), sorted(order[n_test:n_test + n_val])


def make_split(volumes, layout: str, labeled_percent: float, seed: int, split_seed: int = 0) -> dict:
    """Plain JSON-serialisable split: volume id lists train/val/test and labeled/unlabeled (train = their union).

    Cases (``Volume.case``) never straddle two lists. split_seed only affects the own layout's test/val draw.
    """
    cases: dict[str, list[Volume]] = {}
    for vol in sorted(volumes, key=lambda v: v.id):
        cases.setdefault(vol.case, []).append(vol)
    test, val = _partition(cases, layout, split_seed)
    unlabeled_eval = [v.id for c in test + val for v in cases[c] if v.label is None]
    if unlabeled_eval:
        raise DataError(f"val/test volumes without labels: {', '.join(unlabeled_eval[:10])}")
    train = [c for c in cases if c not in test and c not in val]
    pool = [c for c in train if all(v.label is not None for v in cases[c])]
    if not pool:
        raise DataError("no labeled training volume")
    order = np.random.default_rng(seed).permutation(len(pool))
    labeled = {pool[i] for i in order[:labeled_count(labeled_percent, len(pool))]}

    def ids(names):
        return sorted(v.id for c in names for v in cases[c])

    return {"layout": layout, "seed": seed, "labeled_percent": labeled_percent, "split_seed": split_seed,
            "train": ids(train), "val": ids(val), "test": ids(test),
            "labeled": ids(c for c in train if c in labeled), "unlabeled": ids(c for c in train if c not in labeled)}


def _check_split(split, where, volumes=None) -> None:
    """DataError naming ``where`` unless split has every key, string id lists, disjoint train/val/test,
    labeled + unlabeled = train (disjoint, labeled non-empty) and, if volumes are given, only their ids."""
    if not isinstance(split, dict) or any(k not in split for k in SPLIT_KEYS):
        missing = [k for k in SPLIT_KEYS if not isinstance(split, dict) or k not in split]
        raise DataError(f"{where}: split misses keys {', '.join(missing)}")
    lists = {k: split[k] for k in ("train", "val", "test", "labeled", "unlabeled")}
    for key, ids in lists.items():
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids) or len(set(ids)) < len(ids):
            raise DataError(f"{where}: split {key!r} is not a list of distinct id strings")
    train, val, test = (set(lists[k]) for k in ("train", "val", "test"))
    overlap = sorted((train & val) | (train & test) | (val & test))
    if overlap:
        raise DataError(f"{where}: ids in more than one of train/val/test: {', '.join(overlap[:10])}")
    labeled, unlabeled = set(lists["labeled"]), set(lists["unlabeled"])
    if not labeled or labeled & unlabeled or labeled | unlabeled != train:
        raise DataError(f"{where}: labeled and unlabeled must split train in two (labeled non-empty)")
    if volumes is not None:
        known = {v.id: v for v in volumes}
        unknown = sorted((train | val | test) - set(known))
        if unknown:
            raise DataError(f"{where}: ids not among the volumes: {', '.join(unknown[:10])}")
        missing = sorted(i for i in labeled | val | test if known[i].label is None)
        if missing:
            raise DataError(f"{where}: labeled/val/test ids without labels: {', '.join(missing[:10])}")


def save_split(split: dict, path) -> None:
    """Validate and write split as JSON (temporary file + os.replace; none is left if the write fails)."""
    _check_split(split, path)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(split, indent=1) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_split(path, volumes=None) -> dict:
    """Read and validate a split JSON file (against ``volumes`` if given); DataError naming the file."""
    try:
        split = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad UTF-8 or JSON, ints over 4300 digits
        raise DataError(f"{path}: unreadable split file ({' '.join(str(exc).split())[:160]})") from None
    _check_split(split, path, volumes)
    return split


def _case_of(vid: str) -> str:
    """The ACDC patient of a volume id: ``patient001_ED`` -> ``patient001`` (ids of --frames ed|es are the patient)."""
    return vid.removesuffix("_ED").removesuffix("_ES")


def select(volumes, ids, where) -> list[Volume]:
    """The volumes that a split list names, in ``volumes`` order: by id, and ACDC frames (``Volume.frame`` set) also
    by patient, so a split made with one --frames setting selects the same patients' frames under another
    (``patient007`` -> ``patient007_ED`` and ``_ES`` under ``both``, and back). DataError naming ``where`` for an id
    that matches no volume."""
    wanted = set(ids)
    cases = {_case_of(i) for i in ids}
    chosen = [v for v in volumes if v.id in wanted or (v.frame and v.case in cases)]
    found = {v.id for v in chosen} | {v.case for v in chosen if v.frame}
    missing = [i for i in ids if i not in found and _case_of(i) not in found]
    if missing:
        raise DataError(f"{where}: ids not among the volumes: {', '.join(missing[:10])}")
    return chosen


# ----------------------------------------------------------------------------------------- preprocessing


def grid(n_out: int, n_in: int, step: float) -> np.ndarray:
    """Centre-aligned sample positions (n_out,) in input index units: x_j = (j - (n_out-1)/2) * step + (n_in-1)/2.

    Forward (native -> preprocessed): step = target spacing / native spacing; inverse: native / target.
    """
    return (np.arange(n_out) - (n_out - 1) / 2) * step + (n_in - 1) / 2


def _linear(a: np.ndarray, axis: int, x: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``a`` along ``axis`` at positions x (n_out,); samples outside the array are 0."""
    n = a.shape[axis]
    i0 = np.floor(x).astype(np.int64)
    w1 = (x - i0).astype(np.float32)
    w0 = np.where((i0 >= 0) & (i0 < n), 1 - w1, 0).astype(np.float32)
    w1 = np.where((i0 + 1 >= 0) & (i0 + 1 < n), w1, 0).astype(np.float32)
    shape = [1] * a.ndim
    shape[axis] = -1
    return (np.take(a, np.clip(i0, 0, n - 1), axis) * w0.reshape(shape)
            + np.take(a, np.clip(i0 + 1, 0, n - 1), axis) * w1.reshape(shape))


def _nearest(a: np.ndarray, axis: int, x: np.ndarray) -> np.ndarray:
    """Nearest-neighbour sampling (ties round up) of ``a`` along ``axis`` at x (n_out,); outside the array -> 0."""
    n = a.shape[axis]
    i = np.floor(x + 0.5).astype(np.int64)
    shape = [1] * a.ndim
    shape[axis] = -1
    inside = ((i >= 0) & (i < n)).reshape(shape)
    return np.where(inside, np.take(a, np.clip(i, 0, n - 1), axis), 0).astype(a.dtype, copy=False)


def normalise(image: np.ndarray) -> np.ndarray:
    """Clip a volume to its 1st-99th percentile and scale to [0, 1] (float32, same shape); constant -> 0."""
    lo, hi = np.percentile(image, (1, 99))
    if hi <= lo:
        return np.zeros(image.shape, np.float32)
    return ((np.clip(image, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def preprocess(vol: Volume, spacing: float = 1.367, size: int = 192) -> tuple[np.ndarray, np.ndarray | None]:
    """Volume -> (image (Z, size, size) float32 in [0, 1], label (Z, size, size) uint8 or None).

    Per volume percentile normalisation, then per slice one separable resampling to ``spacing`` mm centred in a
    ``size`` x ``size`` grid (bilinear image, nearest label; outside the native image 0 / background).
    Axis 1 of the output runs along native axis 0, axis 2 along native axis 1 (no flips or transposes).
    """
    (nx, ny, _), (sx, sy, _) = vol.image.shape, vol.spacing
    x, y = grid(size, nx, spacing / sx), grid(size, ny, spacing / sy)
    image = _linear(_linear(normalise(vol.image), 0, x), 1, y)
    label = None if vol.label is None else _nearest(_nearest(vol.label, 0, x), 1, y)
    return (np.ascontiguousarray(image.transpose(2, 0, 1)),
            None if label is None else np.ascontiguousarray(label.transpose(2, 0, 1)))


def stack_slices(volumes, spacing: float = 1.367, size: int = 192):
    """Preprocess volumes into contiguous slice arrays -> (images (N, size, size) float32,
    labels (N, size, size) uint8 or None unless every volume is labeled, owner (N,) int64 volume index)."""
    depths = [v.image.shape[2] for v in volumes]
    images = np.empty((sum(depths), size, size), np.float32)
    labels = np.empty(images.shape, np.uint8) if all(v.label is not None for v in volumes) else None
    start = 0
    for vol, depth in zip(volumes, depths):
        image, label = preprocess(vol, spacing, size)
        images[start:start + depth] = image
        if labels is not None:
            labels[start:start + depth] = label
        start += depth
    return images, labels, np.repeat(np.arange(len(volumes), dtype=np.int64), depths)


def to_native(probs_or_labels, vol: Volume, spacing: float = 1.367, size: int = 192) -> np.ndarray:
    """Per-slice class probabilities (Z, C, size, size), or labels (Z, size, size) taken one-hot, on the
    preprocessed grid -> uint8 labels (X, Y, Z) on the native grid of ``vol``.

    Each class map is sampled bilinearly at native pixel x -> j = (x - (n-1)/2) * s / t + (size-1)/2 (outside the
    crop: background 1, other classes 0), then argmax over classes (ties -> lowest class).
    """
    a = np.asarray(probs_or_labels)
    (nx, ny, nz), (sx, sy, _) = vol.image.shape, vol.spacing
    shape_ok = a.ndim in (3, 4) and (a.shape[0], *a.shape[-2:]) == (nz, size, size)
    if not shape_ok or (a.ndim == 3 and a.dtype.kind not in "iub"):
        raise DataError(f"{vol.path}: to_native expects ({nz}, C, {size}, {size}) probabilities or ({nz}, {size}, "
                        f"{size}) integer labels, got {a.shape} {a.dtype}")
    n_classes = a.shape[1] if a.ndim == 4 else int(a.max()) + 1
    x, y = grid(nx, size, sx / spacing), grid(ny, size, sy / spacing)
    best = np.full((nz, nx, ny), -np.inf, np.float32)
    labels = np.zeros((nz, nx, ny), np.uint8)
    for c in range(n_classes):
        fill = 1.0 if c == 0 else 0.0
        p = (a[:, c] if a.ndim == 4 else a == c).astype(np.float32)
        p = _linear(_linear(p - fill, 1, x), 2, y) + fill
        labels[p > best] = c
        np.maximum(best, p, out=best)
    return np.ascontiguousarray(labels.transpose(1, 2, 0))


def save_label_nifti(labels: np.ndarray, vol: Volume, path) -> None:
    """Write uint8 labels (X, Y, Z) with the native affine and a copy of the native header."""
    labels = np.asarray(labels)
    if labels.shape != vol.image.shape:
        raise DataError(f"{path}: labels of shape {labels.shape} for a volume of shape {vol.image.shape}")
    header = vol.header.copy()
    header.set_data_dtype(np.uint8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(labels.astype(np.uint8), vol.affine, header)
    img.header.set_slope_inter(None, None)
    nib.save(img, str(path))


def native_probabilities(probs: np.ndarray, vol: Volume, spacing: float = 1.367, size: int = 192) -> np.ndarray:
    """Per-slice class probabilities (Z, C, size, size) on the preprocessed grid -> float32 (X, Y, Z, C) on the
    native grid of ``vol``, sampled exactly as ``to_native`` samples them (outside the crop: background 1, other
    classes 0), so their argmax over C (ties -> lowest class) is ``to_native``'s labels."""
    (nx, ny, nz), (sx, sy, _) = vol.image.shape, vol.spacing
    if probs.ndim != 4 or (probs.shape[0], *probs.shape[2:]) != (nz, size, size):
        raise DataError(f"{vol.path}: native_probabilities expects ({nz}, C, {size}, {size}), got {probs.shape}")
    x, y = grid(nx, size, sx / spacing), grid(ny, size, sy / spacing)
    out = np.empty((nx, ny, nz, probs.shape[1]), np.float32)
    for c in range(probs.shape[1]):
        fill = 1.0 if c == 0 else 0.0
        out[..., c] = (_linear(_linear(probs[:, c].astype(np.float32) - fill, 1, x), 2, y) + fill).transpose(1, 2, 0)
    return out


def save_like(array: np.ndarray, img, path) -> None:
    """Write ``array`` (its own shape and dtype, no intensity scaling) with the header of the nibabel image ``img``:
    affine, qform and sform with their codes, voxel sizes and units kept; NIfTI-1 or -2 as ``img``; gzipped if
    ``path`` ends in .gz. The caller chooses ``path`` (write to a temporary name and os.replace for atomicity)."""
    header = img.header.copy()
    header.set_data_dtype(array.dtype)
    out = type(img)(array, None, header)
    out.header.set_slope_inter(None, None)
    with _quiet_nibabel():
        nib.save(out, str(path))


# ------------------------------------------------------------------------------------------------ phantom

RV_WALL, FAT_WIDTH = 3.0, 3.0  # mm: septal gap between LV epicardium and RV cavity; epicardial fat band


def _dome(u: np.ndarray) -> np.ndarray:
    """Half-ellipsoid radius profile: 0 at u = 0 (apex), 1 at u = 1 (base), 0 outside [0, 1]."""
    return np.where((u >= 0) & (u <= 1), np.sqrt(np.clip(u * (2 - u), 0, 1)), 0.0).astype(np.float32)


def _soft(s, eps):
    """Partial-volume inside fraction of a signed distance s (mm, negative inside) for edge width eps (mm)."""
    return 0.5 - 0.5 * np.tanh(s / (2 * eps))


def _mix(a, value, weight):
    return a + (value - a) * weight


def _angle(a: np.ndarray) -> np.ndarray:
    """Angle wrapped to [-pi, pi)."""
    return (a + np.pi) % (2 * np.pi) - np.pi


def _smooth_noise(rng, shape, cells: int) -> np.ndarray:
    """Smooth random field (X, Y, Z) float32: a cells x cells unit Gaussian grid per slice, bilinearly upsampled."""
    coarse = rng.standard_normal((cells, cells, shape[2]), dtype=np.float32)
    return _linear(_linear(coarse, 0, np.linspace(0, cells - 1, shape[0])), 1, np.linspace(0, cells - 1, shape[1]))


def _phantom_case(rng, group: str) -> dict:
    """Anatomy, contrast and acquisition of one phantom patient (scalars in mm, radians, relative intensities)."""
    s, dz, fov = rng.uniform(1.2, 2.0), rng.uniform(5.0, 10.0), rng.uniform(240, 320)
    scale = {"DCM": 1.3, "HCM": 0.85}.get(group, 1.0) * rng.uniform(0.85, 1.15)
    length, apex = rng.uniform(70, 95) * min(scale, 1.1), rng.uniform(0, 12)
    contraction = {"NOR": (0.6, 0.7), "RV": (0.6, 0.72), "HCM": (0.45, 0.6), "MINF": (0.78, 0.9), "DCM": (0.85, 0.95)}
    myo = rng.uniform(0.2, 0.35)
    return dict(
        spacing=(s, s, dz), shape=(int(fov / s), int(fov * rng.uniform(0.85, 1.0) / s),
                                   int(np.ceil((apex + length + rng.uniform(0, 15)) / dz)) + 1),
        centre=(fov / 2 + rng.uniform(-25, 25, 2)).astype(np.float32), tilt=rng.uniform(-0.25, 0.25, 2),
        theta=rng.uniform(1.4, 3.4), r=24 * scale, length=length, apex=apex,  # theta: direction of the RV
        wall=rng.uniform(7, 10) * {"HCM": 1.6, "DCM": 0.8}.get(group, 1.0),
        k_es=rng.uniform(*contraction[group]), shorten=rng.uniform(0.04, 0.14),
        rv=rng.uniform(0.85, 1.15) * (1.4 if group == "RV" else 1.0),
        k_rv=rng.uniform(0.85, 0.95) if group == "RV" else rng.uniform(0.6, 0.8),
        infarct=rng.uniform(3, 6) if group == "MINF" else 0.0, phi_inf=rng.uniform(-np.pi, np.pi),
        harmonics=rng.uniform(0, [0.08, 0.04]), phases=rng.uniform(-np.pi, np.pi, 2), eps=rng.uniform(0.6, 1.3),
        blood=rng.uniform(0.85, 1.0), rv_blood=rng.uniform(0.75, 1.0), myo=myo,
        fat=rng.uniform(0.6, 0.8), phi_fat=rng.uniform(-np.pi, np.pi),
        tissue=myo + rng.uniform(-0.03, 0.12) if rng.random() < 0.5 else rng.uniform(0.4, 0.6),
        lung=rng.uniform(0.03, 0.1), lung_size=rng.uniform(30, 45), aorta=rng.uniform(8, 14),
        gamma=rng.uniform(0.8, 1.25), bias=rng.uniform(-0.35, 0.35, 4), sigma=rng.uniform(0.02, 0.06),
        gain=rng.uniform(200, 1500))


def _phase(case: dict, phase: str | float) -> dict:
    """Cavity radius, epicardial radius, LV length, RV scale, papillary (position, size) of ED, ES or a contraction
    weight w in [0, 1] between them (0 = ED, 1 = ES; the scales go geometrically, so w = 1 is ES exactly).

    ES: cavity contracted, wall area kept by thickening, long axis shortened from the base.
    """
    w = {"ED": 0.0, "ES": 1.0}.get(phase, phase)
    r, epi = case["r"], case["r"] + case["wall"]
    if w == 0:
        return dict(r=r, epi=epi, length=case["length"], rv=case["rv"], pap=(0.62, 0.17))
    length, r_es = case["length"] * (1 - case["shorten"]) ** w, r * case["k_es"] ** w
    return dict(r=r_es, epi=np.sqrt(r_es ** 2 + (epi ** 2 - r ** 2) * case["length"] / length), length=length,
                rv=case["rv"] * case["k_rv"] ** w, pap=(0.62 * (1 - w) + 0.68 * w, 0.17 * (1 - w) + 0.25 * w))


def _radii(case: dict, ph: dict, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Endocardial and epicardial radius (Z,) in mm at heights z (mm) of the slices; 0 above the base."""
    h, wall = z - case["apex"], ph["epi"] - ph["r"]
    endo = ph["r"] * _dome(h / ph["length"])
    epi = np.where(h <= ph["length"], ph["epi"] * _dome((h + wall) / (ph["length"] + wall)), 0)
    return endo, np.where(endo > 0, np.maximum(epi, endo + 0.6 * wall), epi).astype(np.float32)


def _slices(case: dict, ph: dict) -> dict:
    """Per-slice geometry: radii (Z,), edge width (Z,) (blur + through-plane partial volume), centre (2, Z),
    height h (Z,) relative to the LV length (0 apex, 1 base)."""
    z = np.arange(case["shape"][2], dtype=np.float32) * case["spacing"][2]
    endo, epi = _radii(case, ph, z)
    (endo_up, epi_up), (endo_dn, epi_dn) = (_radii(case, ph, z + sign * case["spacing"][2] / 2) for sign in (1, -1))
    eps = case["eps"] + np.minimum(0.2 * np.maximum(np.abs(endo_up - endo_dn), np.abs(epi_up - epi_dn)), 3.0)
    centre = case["centre"][:, None] + (case["tilt"][:, None] * (z - z.mean())).astype(np.float32)
    return dict(endo=endo, epi=epi, eps=eps.astype(np.float32), centre=centre, h=(z - case["apex"]) / ph["length"])


def _papillary(ph: dict, sl: dict, theta: float, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Signed distance (X, Y, Z) in mm to two papillary muscles inside the LV cavity, opposite the RV (theta),
    in the mid-ventricular slices (0.25 < h < 0.8); dx, dy: offsets from the LV centre in mm."""
    at, size = ph["pap"][0] * sl["endo"], ph["pap"][1] * sl["endo"]
    absent = np.where((sl["h"] > 0.25) & (sl["h"] < 0.8), 0, np.inf).astype(np.float32)
    return np.minimum(*(np.hypot(dx - at * np.cos(a), dy - at * np.sin(a)) - size + absent
                        for a in theta + np.pi + np.array([-0.75, 0.75])))


def _rv(case: dict, ph: dict, sl: dict, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Approximate signed distance (X, Y, Z) in mm to the RV ellipse: centred beside the LV in direction theta,
    wide across it, shrinking towards the apex (none below h = 0.15)."""
    extent = (ph["rv"] * case["r"] + case["wall"]) * _dome((sl["h"] - 0.15) / 0.9) + 1e-3
    cos, sin = np.cos(case["theta"]), np.sin(case["theta"])
    along = dx * cos + dy * sin - 0.85 * (case["r"] + case["wall"])
    across = -dx * sin + dy * cos
    return (np.hypot(along / (0.75 * extent), across / (1.5 * extent)) - 1) * 0.75 * extent


def _heart(case: dict, ph: dict, sl: dict, x: np.ndarray, y: np.ndarray) -> dict:
    """Signed distances (X, Y, Z) in mm, negative inside: LV cavity, epicardium, papillary muscles, RV ellipse,
    atrium (slices above the base); plus the angle map. x (X, 1, 1), y (1, Y, 1) in mm."""
    dx, dy = x - sl["centre"][0], y - sl["centre"][1]
    d, phi = np.hypot(dx, dy), np.arctan2(dy, dx)
    shape = 1 + sum(a * np.cos(k * (phi - p)) for k, a, p in zip((2, 3), case["harmonics"], case["phases"]))
    thin = case["infarct"] * np.exp(-(_angle(phi - case["phi_inf"]) / 0.5) ** 2) * (sl["endo"] > 0)
    return dict(endo=d - (sl["endo"] * shape + thin), epi=d - sl["epi"] * shape, phi=phi,
                pap=_papillary(ph, sl, case["theta"], dx, dy), rv=_rv(case, ph, sl, dx, dy),
                atrium=np.where(sl["h"] > 1, d - 0.8 * ph["r"], np.inf))


def _tissue(case: dict, rng) -> np.ndarray:
    """Static surroundings (X, Y, Z) float32: textured body ellipse, two dark lungs and a bright descending aorta
    beside the heart, air outside."""
    (nx, ny, _), s = case["shape"], case["spacing"][0]
    x, y = np.arange(nx, dtype=np.float32)[:, None, None] * s, np.arange(ny, dtype=np.float32)[None, :, None] * s
    width, height = nx * s, ny * s
    body = _soft(np.hypot((x - width / 2) / (0.46 * width), (y - height / 2) / (0.4 * height)) - 1, 0.03)
    texture = 0.3 * _smooth_noise(rng, case["shape"], 6) + 0.15 * _smooth_noise(rng, case["shape"], 24)
    image = case["tissue"] * body * (1 + texture)
    epi, lung = case["r"] + case["wall"], case["lung_size"]
    blobs = ((case["theta"] - 1.9, 12 + lung, lung, case["lung"]), (case["theta"] + 1.9, 12 + lung, lung, case["lung"]),
             (case["theta"] + np.pi, 15 + case["aorta"], case["aorta"], case["blood"]))  # lungs, descending aorta
    for angle, reach, radius, value in blobs:
        cx, cy = case["centre"] + (epi + reach) * np.array([np.cos(angle), np.sin(angle)])
        image = _mix(image, value, _soft(np.hypot(x - cx, y - cy) - radius, 1.5))
    return image.astype(np.float32)


def _render(case: dict, phase: str | float, tissue: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Clean image (X, Y, Z) float32 and ACDC labels (X, Y, Z) uint8 of one phase (``_phase``); papillary muscles
    are LV."""
    ph, s = _phase(case, phase), case["spacing"][0]
    sl = _slices(case, ph)
    x = np.arange(case["shape"][0], dtype=np.float32)[:, None, None] * s
    f = _heart(case, ph, sl, x, np.arange(case["shape"][1], dtype=np.float32)[None, :, None] * s)
    label = np.zeros(tissue.shape, np.uint8)
    label[(f["rv"] < 0) & (f["epi"] >= RV_WALL)] = 1
    label[f["epi"] < 0] = 2
    label[f["endo"] < 0] = 3
    eps = sl["eps"]
    m_epi = _soft(f["epi"], eps)
    fat = _soft(f["epi"] - FAT_WIDTH, eps) * (1 - m_epi) * np.exp(-(_angle(f["phi"] - case["phi_fat"]) / 0.8) ** 2)
    image = _mix(tissue, case["fat"], fat)
    image = _mix(image, case["myo"], np.maximum(m_epi, _soft(f["rv"] - RV_WALL, eps)))
    image = _mix(image, case["rv_blood"], _soft(f["rv"], eps) * _soft(RV_WALL - f["epi"], eps))
    image = _mix(image, case["blood"], _soft(f["endo"], eps) * (1 - _soft(f["pap"], eps)))
    return _mix(image, case["blood"], _soft(f["atrium"], eps)).astype(np.float32), label


def _acquire(case: dict, clean: np.ndarray, rng) -> np.ndarray:
    """Scanner model on a clean image (X, Y, Z): gamma, smooth bias field, Rician noise, gain -> int16."""
    u, v, w = (np.linspace(-1, 1, n, dtype=np.float32) for n in clean.shape)
    b = case["bias"]
    bias = np.exp(b[0] * u[:, None, None] + b[1] * v[None, :, None] + b[2] * u[:, None, None] * v[None, :, None]
                  + b[3] * w)
    signal = np.clip(clean, 0, None) ** case["gamma"] * bias
    noise = rng.standard_normal((2, *clean.shape), dtype=np.float32) * case["sigma"]
    return np.clip(np.rint(np.hypot(signal + noise[0], noise[1]) * case["gain"]), 0, 32767).astype(np.int16)


def _save_nifti(data: np.ndarray, spacing, path) -> None:
    img = nib.Nifti1Image(data, np.diag([*spacing, 1.0]))
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))


def _write_patient(folder: Path, rng, group: str) -> None:
    """One phantom patient in the ACDC layout: ED and ES frames with _gt and an Info.cfg."""
    case = _phantom_case(rng, group)
    tissue = _tissue(case, rng)
    frames = int(rng.integers(12, 31))
    ed = 1 if rng.random() < 0.9 else int(rng.integers(2, 5))
    es = ed + round(rng.uniform(0.3, 0.45) * frames)
    folder.mkdir(parents=True, exist_ok=True)
    for phase, number in (("ED", ed), ("ES", es)):
        clean, label = _render(case, phase, tissue)
        stem = folder / f"{folder.name}_frame{number:02d}"
        _save_nifti(_acquire(case, clean, rng), case["spacing"], f"{stem}.nii.gz")
        _save_nifti(label, case["spacing"], f"{stem}_gt.nii.gz")
    (folder / "Info.cfg").write_text(f"ED: {ed}\nES: {es}\nGroup: {group}\nHeight: {rng.uniform(150, 195):.1f}\n"
                                     f"NbFrame: {frames}\nWeight: {rng.uniform(50, 110):.1f}\n")


def write_phantom(out, n: int = 100, seed: int = 0) -> None:
    """Write ``n`` synthetic short-axis patients ``patient001``... in the ACDC layout under ``out``.

    Patient i uses ``default_rng([seed, i])`` (the same patient for any n) and ACDC's group order
    (001-020 DCM, 021-040 HCM, 041-060 MINF, 061-080 NOR, 081-100 RV, then repeating). Atomic: written into a
    hidden sibling ``.NAME.tmpPID`` that is renamed onto ``out`` at the end (an empty ``out`` folder is replaced)
    and removed if anything fails, so ``out`` is never half-written; one a killed write left is removed next time.
    """
    out = Path(out)
    if n < 1 or seed < 0:
        raise DataError(f"{out}: need n >= 1 and seed >= 0, got n={n}, seed={seed}")
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise DataError(f"{out}: folder exists and is not empty; the phantom is only written to a new or empty folder")
    target = Path(os.path.abspath(out))
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")  # hidden sibling: same file system, so rename works
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp*"):                # left by a killed write
        pid = stale.name.rsplit(".tmp", 1)[1]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    try:
        for i in range(1, n + 1):
            _write_patient(tmp / f"patient{i:03d}", np.random.default_rng([seed, i]), ACDC_GROUPS[(i - 1) // 20 % 5])
        os.replace(tmp, target)  # rename(2) also replaces an empty folder; a non-empty one (a race) is an OSError
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached_phantom(folder, say=print):
    """folder, holding the synthetic phantom (100 patients, seed 0), written there once if missing; say() tells."""
    if os.path.isdir(folder):
        say(f"no --data: using the synthetic phantom in {folder} (not real data)")
        return folder
    say(f"no --data: writing the synthetic phantom to {folder} (not real data)")
    try:
        write_phantom(folder, n=100, seed=0)
    except (OSError, DataError) as e:           # fine if another process has just written the same phantom
        if not os.path.isdir(folder):
            raise DataError(f"{folder}: cannot write the synthetic phantom ({e})") from None
    return folder


def write_cine(path, frames: int = 12, seed: int = 0, group: str = "NOR") -> dict:
    """Write a beating phantom cine: a 4D short-axis image (X, Y, Z, T) int16 at ``path`` and its ACDC labels
    (1 RV, 2 MYO, 3 LV; uint8, same affine) as ``<name>_gt.nii.gz`` beside it.

    One phantom heart of ``group`` from ``default_rng(seed)`` (anatomy and surroundings fixed, new noise per frame)
    contracts with the weight w(t) = (1 - cos(2 pi t / T)) / 2 between its ED (w = 0) and ES (w = 1) shapes:
    ED is frame 0, ES frame T // 2 (frames t and T - t are equal; for odd T the two around T / 2 tie).
    Returns the true volumes counted in the labels (ml = voxels x product of voxel sizes in mm / 1000):
    ``{"lv_ml": [...], "rv_ml": [...], "myo_ml": [...], "ed": frame of largest LV, "es": frame of smallest LV}``
    (0-based frames; ties -> the first).
    """
    if frames < 2 or seed < 0 or group not in ACDC_GROUPS:
        raise DataError(f"{path}: need frames >= 2, seed >= 0 and a group of {', '.join(ACDC_GROUPS)}, got "
                        f"frames={frames}, seed={seed}, group={group!r}")
    rng = np.random.default_rng(seed)
    case = _phantom_case(rng, group)
    tissue = _tissue(case, rng)
    images, labels = [], []
    for t in range(frames):
        clean, label = _render(case, 0.5 * (1 - math.cos(2 * math.pi * t / frames)), tissue)
        images.append(_acquire(case, clean, rng))
        labels.append(label)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_nifti(np.stack(images, -1), case["spacing"], path)
    _save_nifti(np.stack(labels, -1), case["spacing"], path.with_name(f"{_stem(path)}_gt.nii.gz"))
    voxel = math.prod(np.float32(case["spacing"]).tolist())  # mm^3 of the zooms as the header stores them
    volumes = {f"{name}_ml": [int(np.count_nonzero(lab == c)) * voxel / 1000 for lab in labels]
               for c, name in ((3, "lv"), (1, "rv"), (2, "myo"))}
    lv = volumes["lv_ml"]
    return {**volumes, "ed": int(np.argmax(lv)), "es": int(np.argmin(lv))}


# ---------------------------------------------------------------------------------------- writing files
def write_atomic(path, write):
    """write(tmp) to a hidden temporary file beside path, then os.replace: never a half-written file. A failed write
    (full disk, read-only folder) removes the temporary file and is a DataError naming path."""
    folder, base = os.path.split(path)
    tmp = os.path.join(folder, f".tmp{os.getpid()}-{base}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise DataError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temporaries(folder):
    """Remove write_atomic's temporary files in folder left by processes that no longer run (a killed write)."""
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        pid = re.match(r"\.tmp(\d+)-", name)
        if pid and not process_alive(int(pid.group(1))):
            os.remove(os.path.join(folder, name))


def process_alive(pid):
    """Whether a process with this id runs (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid < 2 ** 31                          # another user's process (or an absurd number: none)
    return True


def make_folder(path):
    """os.makedirs(path, exist_ok=True); DataError naming path if it cannot be made (under a file, read-only)."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise DataError(f"{path}: cannot create this folder ({e.strerror or e})") from None


@contextlib.contextmanager
def locked_folder(out):
    """Hold an exclusive lock (flock on the folder itself, Unix) on folder `out`, made if missing, while the block
    runs: a second process stops at once. Killed writes' temporary files go; a folder made here and left empty too."""
    created = not os.path.isdir(out)
    try:
        os.makedirs(out, exist_ok=True)
        fd = os.open(out, os.O_RDONLY)
    except OSError as e:
        raise DataError(f"{out}: cannot create the run folder there ({e.strerror or e})") from None
    try:
        import fcntl                                 # Unix only, so imported where used
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:
        pass
    except OSError:
        os.close(fd)
        raise DataError(f"{out}: another process is running in this folder") from None
    try:
        remove_stale_temporaries(out)
        yield
    finally:
        os.close(fd)
        if created and not os.listdir(out):
            os.rmdir(out)


def write_text(path, text):
    """text written atomically."""
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def write_json(obj, path):
    """obj as indented JSON, written atomically."""
    write_text(path, json.dumps(obj, indent=1))


def write_csv(rows, path):
    """A list of dicts (the first one's keys as the header) as CSV, written atomically."""
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    write_atomic(path, write)


def read_json(path):
    """A JSON file; DataError naming it if it cannot be read or parsed."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise DataError(f"{path}: not readable JSON ({' '.join(str(e).split())[:160]})") from None


def claim_results(out, identity):
    """Make the results folder out for the evaluation `identity` (written to evaluation.json); DataError if it holds
    files of another evaluation, so that a folder never mixes two."""
    identity_file = os.path.join(out, "evaluation.json")
    if os.path.isdir(out) and os.listdir(out):
        stored = read_json(identity_file) if os.path.exists(identity_file) else {}
        differ = [k for k in identity if stored.get(k) != identity[k]]
        if differ:
            what = ", ".join(f"{k} {stored.get(k)}" for k in differ)[:200]
            raise DataError(f"{out}: holds another evaluation ({what}); remove it or pass --out")
    make_folder(out)
    remove_stale_temporaries(out)
    write_json(identity, identity_file)


COLOURS = np.array([[0, 0, 0], [230, 60, 60], [60, 200, 60], [60, 120, 240], [240, 200, 40], [200, 80, 220],
                    [40, 220, 220], [250, 140, 40]], dtype=np.float32)


def write_png(path, rgb):
    """A minimal PNG writer (8-bit RGB, zlib from the standard library): rgb (H, W, 3) uint8."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[i].tobytes() for i in range(h))        # filter type 0 per row

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) +
                chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def overlay_png(path, vol, pred, n_slices=3):
    """Image | ground truth | prediction for a few mid slices of a native volume (like the paper's Fig. 3); image |
    prediction when vol has no label. vol.image (X, Y, Z), pred (X, Y, Z) class indices."""
    z = vol.image.shape[2]
    rows = []
    for k in np.linspace(z * 0.3, z * 0.7, n_slices).astype(int):
        img = vol.image[:, :, k].T
        img = (img - img.min()) / max(float(np.ptp(img)), 1e-6) * 255
        grey = np.repeat(img[..., None], 3, -1)
        panels = [grey]
        for lab in ([] if vol.label is None else [vol.label]) + [pred]:
            lab_k = lab[:, :, k].T.astype(int)
            alpha = (lab_k > 0)[..., None] * 0.5
            panels.append(grey * (1 - alpha) + COLOURS[lab_k % len(COLOURS)] * alpha)
        rows.append(np.concatenate(panels, 1))
    write_png(path, np.concatenate(rows, 0).clip(0, 255).astype(np.uint8))


def nifti_name(path):
    """NAME of a NAME.nii.gz / NAME.nii file, else None."""
    base = os.path.basename(path)
    ext = next((e for e in (".nii.gz", ".nii") if base.endswith(e) and len(base) > len(e)), None)
    return base[:-len(ext)] if ext else None


def walk_nifti(folder, out):
    """Sorted .nii/.nii.gz files below folder, following symlinked folders (each real folder once); hidden files and
    folders, and the --out folder, are skipped."""
    files, seen = [], {os.path.realpath(out)}
    for root, dirs, names in os.walk(folder, followlinks=True):
        seen.add(os.path.realpath(root))
        dirs[:] = sorted(d for d in dirs
                         if not d.startswith(".") and os.path.realpath(os.path.join(root, d)) not in seen)
        files += [os.path.join(root, n) for n in sorted(names) if not n.startswith(".") and nifti_name(n)]
    return files


def find_inputs(paths, out):
    """[(NAME, path)] of --input: files as given, folders searched recursively, each path once (a symlink and its
    target are two inputs, segmented under their own names). DataError for a missing path, a file that is not
    .nii/.nii.gz, a folder without one, or an input inside --out."""
    found = {}
    for path in paths:
        if os.path.isdir(path):
            files = walk_nifti(path, out)
        elif os.path.isfile(path):
            files = [path] if nifti_name(path) else []
        else:
            raise DataError(f"{path}: no such file or folder")
        if not files:
            raise DataError(f"{path}: not a .nii or .nii.gz file, nor a folder holding one")
        for file in files:
            if os.path.commonpath([os.path.realpath(file), os.path.realpath(out)]) == os.path.realpath(out):
                raise DataError(f"{file}: input inside --out {out}; choose another --out")
            found.setdefault(os.path.abspath(file), file)
    return [(nifti_name(file), file) for file in found.values()]


def plan_outputs(inputs, out, probabilities=False, png=False, overwrite=False):
    """[(NAME, path, {kind: file})] of the outputs still to write for inputs [(NAME, path)]: "labels" OUT/NAME.nii.gz,
    "volumes" OUT/NAME_volumes.csv, "prob" OUT/NAME_prob.nii.gz, "png" OUT/NAME.png; existing files only with
    overwrite, inputs with none left out. DataError naming both inputs when two would write one file."""
    owner, todo = {}, []
    for name, path in inputs:
        files = {"labels": f"{name}.nii.gz", "volumes": f"{name}_volumes.csv",
                 "prob": f"{name}_prob.nii.gz" if probabilities else None, "png": f"{name}.png" if png else None}
        files = {k: os.path.join(out, v) for k, v in files.items() if v}
        for file in files.values():
            if file in owner:
                raise DataError(f"{path} and {owner[file]}: both would write {file}; inputs need distinct names")
            owner[file] = path
        missing = {k: v for k, v in files.items() if overwrite or not os.path.exists(v)}
        if missing:
            todo.append((name, path, missing))
    return todo


# ----------------------------------------------------------------------------------- run folders (ideal.py report)
def read_summary(path, metric_names):
    """An eval summary.json holding a number for the mean and std of each of metric_names; DataError else."""
    record = read_json(path)
    means = record.get("mean") if isinstance(record, dict) else None
    if not isinstance(means, dict) or not all(isinstance(means.get(m), dict) and all(
            isinstance(means[m].get(k), (int, float)) for k in ("mean", "std")) for m in metric_names):
        raise DataError(f"{path}: not an eval summary (no numeric mean and std of {', '.join(metric_names)})")
    return record


def validation_curve(run):
    """The validation Dice of a fine-tuning run: best, spread (max - min) and mean over the last 10 epochs."""
    path = os.path.join(run, "log.jsonl")
    try:
        with open(path) as f:
            dice = [float(json.loads(line)["val_dice"]) for line in f if line.strip()]
        last = dice[-10:]
        return {"best": max(dice), "spread": max(last) - min(last), "last10": float(np.mean(last))}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a fine-tuning log ({' '.join(str(e).split())[:160]})") from None


def collect_runs(runs, split, metric_names, rows=None, order=()):
    """{row: {fraction: [record of each seed]}} of RUNS/<row>/L<fraction>/seed<k>/eval-SPLIT/summary.json (with
    "final_dsc" of eval-SPLIT-final, "validation" and "seed"), for `rows` in their order (default: all, in `order`)."""
    table = {}
    for path in sorted(p for r in runs for p in glob.glob(os.path.join(r, "*", "L*", "seed*", f"eval-{split}",
                                                                          "summary.json"))):
        row, frac = path.split(os.sep)[-5:-3]
        if (rows is None or row in rows) and re.fullmatch(r"L\d+(\.\d+)?", frac):
            run = os.path.dirname(os.path.dirname(path))
            record = read_summary(path, metric_names)
            final_path = os.path.join(run, f"eval-{split}-final", "summary.json")
            final = read_summary(final_path, metric_names) if os.path.exists(final_path) else None
            record["final_dsc"] = final["mean"]["dsc"]["mean"] if final else None
            record["validation"] = validation_curve(run)
            record["seed"] = path.split(os.sep)[-3].removeprefix("seed")
            table.setdefault(row, {}).setdefault(frac[1:], []).append(record)
    order = rows or list(order)
    return {row: dict(sorted(table[row].items(), key=lambda kv: float(kv[0])))
            for row in sorted(table, key=lambda r: order.index(r) if r in order else len(order))}


def collect_clinical(runs, metric_names, rows=None):
    """{label: {fraction: [summary of each seed]}}: every run's evaluation on both ACDC frames of the test patients,
    eval-test of a run trained on both frames (labelled ROW), eval-test-both of one trained on ED (ROW, ED only)."""
    table = {}
    for path in sorted(p for r in runs for p in glob.glob(os.path.join(r, "*", "L*", "seed*", "config.json"))):
        run = os.path.dirname(path)
        row, frac = run.split(os.sep)[-3:-1]
        both = read_json(path).get("frames") == "both"
        summary = os.path.join(run, "eval-test" if both else "eval-test-both", "summary.json")
        if (rows and row not in rows) or not os.path.exists(summary):
            continue
        record = read_summary(summary, metric_names)
        if "clinical" not in record or "frames" not in record:
            raise DataError(f"{summary}: not an evaluation of ED and ES frames (eval --frames both)")
        with open(os.path.join(os.path.dirname(summary), "clinical.csv"), newline="") as f:
            record["rows"] = list(csv.DictReader(f))
        table.setdefault(row if both else f"{row}, ED only", {}).setdefault(frac[1:], []).append(record)
    return {k: dict(sorted(v.items(), key=lambda kv: float(kv[0]))) for k, v in table.items()}


# ---------------------------------------------------------------------------------------------------- CLI


def _range(values) -> str:
    return f"{min(values):.3g}-{max(values):.3g}"


def _problems(layout: str, volumes, split: dict, presence: dict[str, np.ndarray], n_classes: int) -> list[str]:
    """Human-readable issues of a dataset and its split (empty list if none); presence: id -> (256,) bool of the
    class values found in each labeled volume."""
    problems = []
    cases = {v.case for v in volumes}
    standard = {f"patient{i:03d}" for i in range(1, 101)}
    if layout == "acdc" and cases != standard:
        problems.append(f"ACDC split expects patient001-patient100: {len(standard - cases)} missing, "
                        f"{len(cases - standard)} extra (extra patients join train)")
    problems += [f"{key} set is empty" for key in ("val", "test") if not split[key]]
    lacking = [vid for vid, present in presence.items() if not present[:n_classes].all()]
    if lacking:
        problems.append(f"{len(lacking)} labeled volumes lack a class: {', '.join(lacking[:10])}")
    return problems


def describe(root, layout="auto", frames="ed", label_map=None, labeled_percent=10.0, seed=0) -> str:
    """Multi-line summary of a dataset folder and the split ``make_split`` would make from it."""
    layout, volumes = load_volumes(root, layout, frames, label_map)
    split = make_split(volumes, layout, labeled_percent, seed)
    n_classes = num_classes(layout, volumes)
    names = CLASS_NAMES.get(layout, tuple(map(str, range(n_classes))))
    presence = {v.id: np.bincount(v.label.ravel(), minlength=256) > 0 for v in volumes if v.label is not None}
    present = np.flatnonzero(np.any(list(presence.values()), axis=0)) if presence else []
    groups = {g: sum(v.group == g for v in volumes) for g in sorted({v.group for v in volumes} - {""})}
    n_labeled = sum(v.label is not None for v in volumes)
    lines = [
        f"folder:   {root}",
        f"layout:   {layout}" + (f" (frames: {frames})" if layout == "acdc" else ""),
        f"volumes:  {len(volumes)} (labeled {n_labeled}, unlabeled {len(volumes) - n_labeled})",
        f"classes:  {n_classes}: {', '.join(f'{i} {n}' for i, n in enumerate(names))}; "
        f"present in labels: {' '.join(map(str, present)) or '-'}",
        "spacing:  " + " x ".join(_range([v.spacing[a] for v in volumes]) for a in range(3)) + " mm",
        "shape:    " + " x ".join(_range([v.image.shape[a] for v in volumes]) for a in range(3)),
        f"groups:   {', '.join(f'{g} {k}' for g, k in groups.items()) or '-'}",
        f"split:    train {len(split['train'])} (labeled {len(split['labeled'])}, unlabeled "
        f"{len(split['unlabeled'])}), val {len(split['val'])}, test {len(split['test'])} "
        f"(labeled {labeled_percent:g}%, seed {seed})",
        f"val ids:  {' '.join(split['val']) or '-'}",
        f"test ids: {' '.join(split['test']) or '-'}",
    ]
    problems = _problems(layout, volumes, split, presence, n_classes)
    return "\n".join(lines + [f"problems: {'; '.join(problems) or 'none'}"])


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Print a warning as one ``warning: MESSAGE`` line on stderr."""
    print(f"warning: {' '.join(str(message).split())}", file=sys.stderr)


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad option in one line on stderr (exit 2) instead of usage + error."""

    def error(self, message):
        print(f"{self.prog}: error: {' '.join(message.split())}", file=sys.stderr)
        sys.exit(2)


def _int_at_least(low: int):
    """argparse type: an integer >= low."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return value
    return parse


def main(argv=None) -> int:
    """CLI: ``synth --out DIR [--n --seed]`` and ``info DIR [--layout --frames --label-map --labeled --seed]``."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = Parser(description="IDEAL datasets: synthetic phantom and dataset summary", formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True)
    synth = sub.add_parser("synth", help="write the synthetic phantom in the ACDC layout", formatter_class=fmt)
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--n", type=_int_at_least(1), default=100, help="number of patients")
    synth.add_argument("--seed", type=_int_at_least(0), default=0, help="random seed")
    info = sub.add_parser("info", help="describe a dataset folder and the split it would make", formatter_class=fmt)
    info.add_argument("root", help="dataset folder")
    info.add_argument("--layout", default="auto", choices=("auto",) + LAYOUTS, help="dataset layout")
    info.add_argument("--frames", default="ed", choices=("ed", "es", "both"), help="ACDC frames")
    info.add_argument("--label-map", default=None, help="raw label remapping RAW:CLASS,... e.g. 1:3,3:1")
    info.add_argument("--labeled", type=float, default=10.0, help="labeled percent of the training cases")
    info.add_argument("--seed", type=_int_at_least(0), default=0, help="seed of the labeled subset")
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("always", DataWarning)
        warnings.showwarning = _show_warning
        try:
            if args.command == "synth":
                write_phantom(args.out, args.n, args.seed)
                print(f"wrote {args.n} phantom patients to {args.out}")
            else:
                print(describe(args.root, args.layout, args.frames, args.label_map, args.labeled, args.seed))
        except (DataError, OSError) as exc:
            print(f"error: {str(exc).replace(chr(10), ' ')}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

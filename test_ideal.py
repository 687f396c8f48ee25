"""Tests of the IDEAL reference implementation (CPU, tiny sizes): data.py readers, splits, preprocessing, its
inverse, the phantom and bad input; metrics.py against hand-computed cases, naive loops and medpy where installed;
ideal.py losses against naive loops, exact view correspondence, Eq. 3 by hand, gradient flow, short training runs
and the command lines on a tiny phantom. Tests that need ../shared/data skip with a reason when it is absent."""
import csv
import gzip
import io
import itertools
import fcntl
import json
import math
import os
import pickle
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import warnings
import zipfile
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import ideal
import metrics
from data import DataError

HERE = Path(__file__).resolve().parent
ACDC = HERE.parent / "shared" / "data" / "ACDC-training"
needs_acdc = pytest.mark.skipif(not ACDC.is_dir(), reason=f"real ACDC data not present at {ACDC}")


def run_cli(script, *args, cwd=HERE):
    """Run one of the project's scripts (data.py, metrics.py, ideal.py); returns (returncode, stdout, stderr)."""
    p = subprocess.run([sys.executable, str(HERE / script), *map(str, args)], capture_output=True, text=True,
                       cwd=cwd, timeout=600)
    return p.returncode, p.stdout, p.stderr


# ==========================================================================================================
# data.py
# ==========================================================================================================
SHAPE = (8, 8, 3)
ACDC_IDS = [f"patient{i:03d}" for i in range(1, 101)]
CHAITANYA_TEST = ["patient007", "patient008", "patient009", "patient010", "patient027", "patient028", "patient029",
                  "patient030", "patient047", "patient048", "patient049", "patient050", "patient067", "patient068",
                  "patient069", "patient070", "patient087", "patient088", "patient089", "patient090"]


def nii(path, array, spacing=(1.5, 1.5, 8.0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.diag([*spacing, 1.0])), str(path))
    return path


def noise(shape=SHAPE, seed=0):
    return np.random.default_rng(seed).normal(100, 20, shape).astype(np.float32)


def labels(shape=SHAPE):
    lab = np.zeros(shape, np.uint8)
    lab[2:6, 2:6], lab[3:5, 3:5], lab[0] = 2, 3, 1
    return lab


def acdc_patient(root, pid="patient001", ed=1, es=2, gt=True, group="NOR"):
    folder = root / pid
    for number in (ed, es):
        nii(folder / f"{pid}_frame{number:02d}.nii.gz", noise())
        if gt:
            nii(folder / f"{pid}_frame{number:02d}_gt.nii.gz", labels())
    (folder / "Info.cfg").write_text(f"ED: {ed}\nES: {es}\nGroup: {group}\nNbFrame: 20\n")
    return folder


def volume(image, label=None, spacing=(1.0, 1.0, 1.0), vid="v", case=""):
    return data.Volume(vid, np.asarray(image, np.float32), label, np.diag([*spacing, 1.0]), nib.Nifti1Header(),
                       spacing, f"{vid}.nii.gz", case=case)


def fake(ids, labeled=True):
    lab = np.zeros((2, 2, 1), np.uint8) if labeled else None
    return [volume(np.zeros((2, 2, 1)), lab, vid=i, case=i.split("_ES")[0].split("_ED")[0]) for i in ids]


def dice(a, b, c):
    return 2 * np.sum((a == c) & (b == c)) / (np.sum(a == c) + np.sum(b == c))


def test_acdc_reader_takes_frames_from_info_cfg_and_skips_4d(tmp_path):
    acdc_patient(tmp_path, "patient001", ed=1, es=12, group="DCM")
    acdc_patient(tmp_path, "patient090", ed=4, es=11, group="RV")
    (tmp_path / "patient090" / "patient090_4d.nii.gz").write_bytes(b"never read")
    layout, vols = data.load_volumes(tmp_path)
    assert layout == "acdc" and [v.id for v in vols] == ["patient001", "patient090"]
    p1, p90 = vols
    assert p90.path.endswith("patient090_frame04.nii.gz") and (p90.frame, p90.group) == ("ED", "RV")
    assert p1.image.dtype == np.float32 and p1.image.shape == SHAPE and p1.label.dtype == np.uint8
    assert p1.spacing == (1.5, 1.5, 8.0) and p1.affine.dtype == np.float64 and p1.header.get_data_shape() == SHAPE
    np.testing.assert_array_equal(p1.label, labels())
    _, es = data.load_volumes(tmp_path, frames="es")
    assert es[1].path.endswith("patient090_frame11.nii.gz") and es[1].id == "patient090" and es[1].frame == "ES"
    _, both = data.load_volumes(tmp_path, frames="both")
    assert [v.id for v in both] == ["patient001_ED", "patient001_ES", "patient090_ED", "patient090_ES"]
    assert [v.case for v in both] == ["patient001", "patient001", "patient090", "patient090"]


def test_acdc_reader_training_and_testing_subfolders(tmp_path):
    acdc_patient(tmp_path / "training", "patient001")
    acdc_patient(tmp_path / "testing", "patient101", gt=False)
    layout, vols = data.load_volumes(tmp_path)
    assert layout == "acdc" and [v.id for v in vols] == ["patient001", "patient101"]
    assert vols[0].label is not None and vols[1].label is None


def test_mmwhs_reader_maps_raw_values_and_rejects_others(tmp_path):
    raw = np.zeros(SHAPE, np.int16)
    for row, value in enumerate(data.MMWHS_VALUES, 1):
        raw[row] = value
    nii(tmp_path / "mr_train_1001_image.nii.gz", noise())
    nii(tmp_path / "mr_train_1001_label.nii.gz", raw)
    layout, vols = data.load_volumes(tmp_path)
    assert layout == "mmwhs" and vols[0].id == "mr_train_1001" and data.num_classes(layout, vols) == 8
    np.testing.assert_array_equal(vols[0].label[:, 0, 0], np.arange(8))
    raw[7] = 421
    label_path = nii(tmp_path / "mr_train_1001_label.nii.gz", raw)
    with pytest.raises(DataError, match="421") as err:
        data.load_volumes(tmp_path)
    assert str(label_path) in str(err.value)
    _, vols = data.load_volumes(tmp_path, label_map="421:7")
    assert vols[0].label[7, 0, 0] == 7


def test_own_reader_with_unlabeled_images(tmp_path):
    lab = labels()
    lab[0, 0] = 4
    nii(tmp_path / "imagesTr" / "a.nii.gz", noise())
    nii(tmp_path / "labelsTr" / "a.nii.gz", lab)
    nii(tmp_path / "imagesTr" / "b_0000.nii.gz", noise(seed=1))
    nii(tmp_path / "labelsTr" / "b.nii.gz", labels())
    nii(tmp_path / "imagesUnlabeled" / "u.nii.gz", noise(seed=2))
    layout, vols = data.load_volumes(tmp_path)
    assert layout == "own" and [v.id for v in vols] == ["a", "b", "u"] and vols[2].label is None
    assert data.num_classes(layout, vols) == 5


def test_parse_label_map():
    assert data.parse_label_map("1:3,3:1") == {1: 3, 3: 1}
    assert data.parse_label_map(" 205 : 1 ") == {205: 1}
    assert data.parse_label_map(None) is None
    for bad in ("1-3", "1:3,1:2", "a:b", "1:300"):
        with pytest.raises(DataError, match="label map"):
            data.parse_label_map(bad)


def test_label_map_remaps_acdc_labels(tmp_path):
    acdc_patient(tmp_path)
    _, vols = data.load_volumes(tmp_path, label_map="1:3,3:1")
    expected = labels()
    expected[labels() == 1], expected[labels() == 3] = 3, 1
    np.testing.assert_array_equal(vols[0].label, expected)
    with pytest.raises(DataError, match="classes 0-3"):
        data.load_volumes(tmp_path, label_map="1:4")


def test_forced_layout(tmp_path):
    acdc_patient(tmp_path)
    assert data.load_volumes(tmp_path, layout="acdc")[0] == "acdc"
    with pytest.raises(DataError, match="no MMWHS"):
        data.load_volumes(tmp_path, layout="mmwhs")


def test_acdc_split_uses_chaitanya_test_set():
    split = data.make_split(fake(ACDC_IDS), "acdc", 10, seed=0)
    assert split["test"] == CHAITANYA_TEST and split["val"] == ["patient011", "patient071"]
    assert len(split["train"]) == 78 and not set(split["train"]) & set(CHAITANYA_TEST + split["val"])
    assert sorted(split["labeled"] + split["unlabeled"]) == split["train"]
    for percent, count in ((1.25, 1), (2.5, 2), (10, 8), (100, 78)):
        assert len(data.make_split(fake(ACDC_IDS), "acdc", percent, seed=0)["labeled"]) == count
    json.dumps(split)


def test_labeled_count_rounds_half_up():
    assert data.labeled_count(25, 10) == 3  # 2.5 -> 3 (Python's round gives 2)
    assert [data.labeled_count(p, 8) for p in (10, 20, 40, 100)] == [1, 2, 3, 8]
    assert data.labeled_count(0.1, 78) == 1
    for bad in (0, 101):
        with pytest.raises(DataError):
            data.labeled_count(bad, 78)


def test_split_seed_determinism_and_nesting():
    vols = fake(ACDC_IDS)
    a, b, c = (data.make_split(vols, "acdc", 10, seed) for seed in (0, 0, 1))
    assert a == b and a["labeled"] != c["labeled"] and a["test"] == c["test"]
    assert set(data.make_split(vols, "acdc", 2.5, 0)["labeled"]) <= set(a["labeled"])


def test_split_keeps_both_frames_of_a_patient_together():
    vols = fake([f"{p}_{f}" for p in ACDC_IDS for f in ("ED", "ES")])
    split = data.make_split(vols, "acdc", 10, seed=0)
    assert len(split["test"]) == 40 and "patient007_ES" in split["test"] and len(split["labeled"]) == 16
    assert {i[:-3] for i in split["labeled"]} & {i[:-3] for i in split["unlabeled"]} == set()


def test_mmwhs_split_by_sorted_id():
    vols = fake([f"mr_train_{1001 + i}" for i in range(20)][::-1])
    split = data.make_split(vols, "mmwhs", 10, seed=0)
    assert split["train"] == [f"mr_train_{i}" for i in range(1001, 1009)]
    assert split["val"] == ["mr_train_1009", "mr_train_1010"]
    assert split["test"] == [f"mr_train_{i}" for i in range(1011, 1021)]
    assert [len(data.make_split(vols, "mmwhs", p, 0)["labeled"]) for p in (10, 20, 40, 100)] == [1, 2, 3, 8]


def test_own_split_rule():
    vols = fake([f"case{i:02d}" for i in range(10)]) + fake(["u1", "u2", "u3"], labeled=False)
    a, b = (data.make_split(vols, "own", 10, seed) for seed in (0, 1))
    assert (len(a["test"]), len(a["val"]), len(a["train"])) == (2, 1, 10)
    assert {"u1", "u2", "u3"} <= set(a["unlabeled"]) and len(a["labeled"]) == 1
    assert a["test"] == b["test"] and a["val"] == b["val"]
    assert data.make_split(vols, "own", 10, 0, split_seed=5)["test"] != a["test"]


def test_split_json_round_trip(tmp_path):
    vols = fake(ACDC_IDS)
    split = data.make_split(vols, "acdc", 2.5, seed=3)
    data.save_split(split, tmp_path / "run" / "split.json")
    assert data.load_split(tmp_path / "run" / "split.json", vols) == split


def test_save_split_leaves_no_temporary_file_when_the_write_fails(tmp_path, monkeypatch):
    def full(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(data.os, "replace", full)
    with pytest.raises(OSError):
        data.save_split(data.make_split(fake(ACDC_IDS), "acdc", 2.5, seed=3), tmp_path / "split.json")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("edit", ["missing key", "overlap", "unknown id", "labeled outside train", "not json"])
def test_invalid_split_file(tmp_path, edit):
    vols = fake(ACDC_IDS)
    split = data.make_split(vols, "acdc", 10, seed=0)
    if edit == "missing key":
        del split["val"]
    elif edit == "overlap":
        split["val"].append(split["test"][0])
    elif edit == "unknown id":
        split["test"].append("patient999")
    elif edit == "labeled outside train":
        split["labeled"].append(split["test"][0])
    path = tmp_path / "split.json"
    path.write_text("{not json" if edit == "not json" else json.dumps(split))
    with pytest.raises(DataError, match=str(path)):
        data.load_split(path, vols)


def test_preprocess_shapes_and_intensity_range():
    vol = volume(noise((30, 20, 4)) * 5, labels((30, 20, 4)), spacing=(2.0, 1.0, 8.0))
    image, label = data.preprocess(vol, spacing=1.5, size=24)
    assert image.shape == label.shape == (4, 24, 24) and image.dtype == np.float32 and label.dtype == np.uint8
    assert image.flags.c_contiguous and 0 <= image.min() and image.max() <= 1
    same = volume(noise((24, 24, 2)))
    norm = data.normalise(same.image)
    assert norm.min() == 0 and norm.max() == 1 and np.mean(norm == 1) == pytest.approx(0.01, abs=0.005)
    np.testing.assert_allclose(data.preprocess(same, 1.0, 24)[0], norm.transpose(2, 0, 1), atol=1e-6)
    assert set(np.unique(label)) <= {0, 1, 2, 3}


@pytest.mark.parametrize("native, target", [(1.0, 1.0), (1.0, 0.5), (0.7, 1.367), (1.9, 1.367)])
def test_bright_centre_pixel_stays_at_centre(native, target):
    image = np.zeros((9, 9, 1))
    image[4, 4] = 1
    out = data.preprocess(volume(image, spacing=(native, native, 5.0)), spacing=target, size=15)[0][0]
    assert np.unravel_index(out.argmax(), out.shape) == (7, 7)
    np.testing.assert_allclose(out, out[::-1, ::-1], atol=1e-6)


def test_checkerboard_2x_downsample():
    ij = np.indices((8, 8))
    fine, blocks = ij.sum(0) % 2, (ij // 2).sum(0) % 2
    vol = volume(blocks[..., None], blocks[..., None].astype(np.uint8))
    image, label = data.preprocess(vol, spacing=2.0, size=4)
    np.testing.assert_allclose(image[0], np.indices((4, 4)).sum(0) % 2, atol=1e-6)
    np.testing.assert_array_equal(label[0], np.indices((4, 4)).sum(0) % 2)
    image, _ = data.preprocess(volume(fine[..., None]), spacing=2.0, size=4)
    np.testing.assert_allclose(image[0], 0.5, atol=1e-6)


def test_stack_slices():
    a = volume(noise((10, 12, 3)), labels((10, 12, 3)))
    b = volume(noise((14, 9, 2)), labels((14, 9, 2)))
    images, labs, owner = data.stack_slices([a, b], spacing=1.0, size=16)
    assert images.shape == labs.shape == (5, 16, 16) and images.flags.c_contiguous
    np.testing.assert_array_equal(owner, [0, 0, 0, 1, 1])
    assert owner.dtype == np.int64 and data.stack_slices([a, volume(noise((4, 4, 1)))], 1.0, 16)[1] is None


@pytest.mark.parametrize("native, target, size", [(1.0, 1.0, 24), (1.0, 0.5, 48), (1.4, 0.7, 40)])
def test_inverse_round_trip_is_exact(native, target, size):
    rng = np.random.default_rng(0)
    label = np.kron(rng.integers(0, 4, (10, 8, 3)), np.ones((2, 2, 1))).astype(np.uint8)  # (20, 16, 3)
    vol = volume(noise(label.shape), label, spacing=(native, native, 8.0))
    _, pre = data.preprocess(vol, target, size)
    back = data.to_native(pre, vol, target, size)
    assert back.shape == label.shape and back.dtype == np.uint8
    np.testing.assert_array_equal(back, label)
    probs = np.eye(4, dtype=np.float32)[pre].transpose(0, 3, 1, 2)  # (Z, C, size, size)
    np.testing.assert_array_equal(data.to_native(probs, vol, target, size), label)


def test_to_native_outside_the_crop_is_background():
    vol = volume(noise((40, 30, 2)), np.full((40, 30, 2), 3, np.uint8))
    _, pre = data.preprocess(vol, 1.0, 10)
    back = data.to_native(pre, vol, 1.0, 10)
    expected = np.zeros((40, 30, 2), np.uint8)
    expected[15:25, 10:20] = 3
    np.testing.assert_array_equal(back, expected)
    with pytest.raises(DataError, match="to_native"):
        data.to_native(pre[:1], vol, 1.0, 10)


def test_save_label_nifti_keeps_native_geometry(tmp_path):
    acdc_patient(tmp_path)
    vol = data.load_volumes(tmp_path)[1][0]
    data.save_label_nifti(vol.label, vol, tmp_path / "out" / "pred.nii.gz")
    saved = nib.load(tmp_path / "out" / "pred.nii.gz")
    assert saved.get_data_dtype() == np.uint8 and saved.header.get_zooms() == vol.header.get_zooms()
    np.testing.assert_allclose(saved.affine, vol.affine)
    np.testing.assert_array_equal(np.asarray(saved.dataobj), vol.label)


def test_phantom_is_readable_and_anatomical(tmp_path):
    data.write_phantom(tmp_path / "a", n=2, seed=3)
    layout, ed = data.load_volumes(tmp_path / "a")
    _, es = data.load_volumes(tmp_path / "a", frames="es")
    assert layout == "acdc" and [v.id for v in ed] == ["patient001", "patient002"]
    for a, b in zip(ed, es):
        assert set(np.unique(a.label)) == set(np.unique(b.label)) == {0, 1, 2, 3}
        assert np.sum(a.label == 3) > np.sum(b.label == 3)
        assert 1.2 <= a.spacing[0] == a.spacing[1] <= 2.0 and 5.0 <= a.spacing[2] <= 10.0
    info = data._read_info(tmp_path / "a" / "patient001")
    assert {"ED", "ES", "Group", "NbFrame", "Height", "Weight"} <= set(info)
    data.write_phantom(tmp_path / "b", n=1, seed=3)
    again = data.load_volumes(tmp_path / "b")[1][0]
    np.testing.assert_array_equal(again.image, ed[0].image)


def test_cli_synth_and_info(tmp_path):
    rc, out, err = run_cli("data.py", "synth", "--out", tmp_path / "ph", "--n", 1)
    assert rc == 0 and (tmp_path / "ph" / "patient001" / "Info.cfg").is_file()
    rc, out, err = run_cli("data.py", "info", tmp_path / "ph")
    assert rc == 0 and "layout:   acdc" in out and "volumes:  1" in out


def _with_gt(root, gt, spacing=(1.5, 1.5, 8.0)):
    folder = acdc_patient(root)
    return nii(folder / "patient001_frame01_gt.nii.gz", gt, spacing)


def _with_image(root, image):
    folder = acdc_patient(root)
    return nii(folder / "patient001_frame01.nii.gz", image)


def _truncated(root):
    path = acdc_patient(root) / "patient001_frame01.nii.gz"
    path.write_bytes(path.read_bytes()[:-10])  # header intact, voxel data cut short
    return path


def _garbage(root):
    path = acdc_patient(root) / "patient001_frame01.nii.gz"
    path.write_bytes(b"this is not a nifti file")
    return path


def _no_info(root):
    (acdc_patient(root) / "Info.cfg").unlink()
    return root / "patient001" / "Info.cfg"


def _missing_frame(root):
    (acdc_patient(root) / "Info.cfg").write_text("ED: 5\nES: 2\n")
    return root / "patient001" / "patient001_frame05.nii.gz"


def _mmwhs_value(root):
    nii(root / "mr_train_1001_image.nii.gz", noise())
    raw = np.zeros(SHAPE, np.int16)
    raw[1], raw[2] = 205, 333
    return nii(root / "mr_train_1001_label.nii.gz", raw)


def _own_unmatched(root):
    nii(root / "labelsTr" / "a.nii.gz", labels())
    return nii(root / "imagesTr" / "b.nii.gz", noise())


def _no_layout(root):
    (root / "notes.txt").write_text("no dataset here")
    return root


def _nan_only(root):
    return _with_image(root, np.full(SHAPE, np.nan, np.float32))
BAD = {  # name: (make(root) -> path named in the message, problem in the message)
    "missing folder": (lambda root: root / "nope", "no such folder"),
    "no layout": (_no_layout, "no recognised layout (expected acdc"),
    "shape mismatch": (lambda root: _with_gt(root, np.zeros((8, 8, 4), np.uint8)), "differs from image shape"),
    "affine mismatch": (lambda root: _with_gt(root, labels(), (1.5, 1.6, 8.0)), "label affine differs"),
    "truncated": (_truncated, "unreadable or truncated"),
    "unreadable": (_garbage, "unreadable or truncated"),
    "label value": (lambda root: _with_gt(root, labels() * 3), "label values 6, 9 outside"),
    "mmwhs value": (_mmwhs_value, "label values 333 outside"),
    "4D": (lambda root: _with_image(root, noise((8, 8, 3, 2))), "4D image"),
    "zero size": (lambda root: _with_image(root, np.zeros((8, 8, 0), np.float32)), "empty volume"),
    "constant": (lambda root: _with_image(root, np.full(SHAPE, 5.0, np.float32)), "constant image"),
    "all NaN": (_nan_only, "no finite voxel"),
    "no Info.cfg": (_no_info, "missing Info.cfg"),
    "missing frame": (_missing_frame, "missing frame file"),
    "own unmatched": (_own_unmatched, "no matching label"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_input(tmp_path, name):
    make, problem = BAD[name]
    root = tmp_path / "data"
    root.mkdir()
    path = make(root)
    root = path if name == "missing folder" else root
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(DataError) as err:
        data.load_volumes(root)
    assert str(path) in str(err.value) and problem in str(err.value)
    rc, out, err = run_cli("data.py", "info", root)
    lines = err.splitlines()
    assert rc == 2 and out == "" and "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0] and problem in lines[0]
    assert sorted(tmp_path.rglob("*")) == before


def test_cli_bad_options_exit_2(tmp_path):
    acdc_patient(tmp_path)
    for args in (("--label-map", "1-3"), ("--layout", "own"), ("--labeled", "0")):
        rc, out, err = run_cli("data.py", "info", tmp_path, *args)
        assert rc == 2 and err.startswith("error: ") and len(err.splitlines()) == 1


def test_nan_voxels_replaced_with_warning(tmp_path):
    image = noise()
    image[0, 0, 0], image[1, 1, 1] = np.nan, np.inf
    path = _with_image(tmp_path, image)
    with pytest.warns(data.DataWarning, match="2 NaN/Inf voxels") as record:
        vol = data.load_volumes(tmp_path)[1][0]
    assert str(path) in str(record[0].message)
    low = image[np.isfinite(image)].min()
    assert np.isfinite(vol.image).all() and vol.image[0, 0, 0] == vol.image[1, 1, 1] == low
    rc, out, err = run_cli("data.py", "info", tmp_path)
    assert rc == 0 and err.splitlines() == [
        f"warning: {path}: replaced 2 NaN/Inf voxels by the volume's minimum finite value {low:g}"]


@pytest.fixture(scope="module")
def acdc_ed():
    return data.load_volumes(ACDC)


@needs_acdc
def test_real_acdc_found_and_split(acdc_ed):
    layout, vols = acdc_ed
    assert layout == "acdc" and [v.id for v in vols] == ACDC_IDS
    split = data.make_split(vols, layout, 10, seed=0)
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (78, 2, 20)
    assert split["test"] == CHAITANYA_TEST and len(split["labeled"]) == 8
    assert vols[0].spacing == pytest.approx((1.5625, 1.5625, 10.0)) and vols[0].image.shape == (216, 256, 10)
    assert vols[89].path.endswith("patient090_frame04.nii.gz")
    assert sorted(v.group for v in vols) == sorted(data.ACDC_GROUPS * 20)


@needs_acdc
def test_real_acdc_round_trip_dice(acdc_ed):
    """Preprocess -> one-hot -> to_native on real ground truths (incl. the two worst of all 100: 038, 100)."""
    vols = {v.id: v for v in acdc_ed[1]}
    scores = []
    for pid in ("patient001", "patient038", "patient057", "patient090", "patient100"):
        vol = vols[pid]
        back = data.to_native(data.preprocess(vol)[1], vol)
        assert back.shape == vol.label.shape
        scores.append([dice(back, vol.label, c) for c in (1, 2, 3)])
    scores = np.array(scores)
    assert scores.mean(0).min() > 0.98 and scores.min() > 0.96


# ==========================================================================================================
# metrics.py
# ==========================================================================================================
SQRT5 = math.sqrt(5.0)


def all_metrics(a, b, spacing=None):
    return metrics.dice(a, b), metrics.assd(a, b, spacing), metrics.hd(a, b, spacing), metrics.hd95(a, b, spacing)


# ----------------------------------------------------------------------------------------------------------
# Hand-computed cases
# ----------------------------------------------------------------------------------------------------------
def test_dice_hand_counts():
    a = np.array([1, 1, 0, 0, 1])
    b = np.array([0, 1, 1, 0, 1])
    assert metrics.dice(a, b) == pytest.approx(2 * 2 / (3 + 3))
    square = np.zeros((6, 6), bool)
    square[1:4, 1:4] = True  # 9 voxels
    shifted = np.roll(square, 1, axis=1)  # overlaps in 6
    assert metrics.dice(square, shifted) == pytest.approx(12 / 18)
    assert metrics.dice(square, square) == 1.0
    assert metrics.dice(square, np.roll(square, 3, axis=0)) == 0.0


@pytest.mark.parametrize("shift", [(0, 0, 2), (1, 2, 0), (3, 1, 1)])
def test_single_voxel_against_shifted_voxel(shift):
    spacing = (2.0, 3.0, 0.5)
    a = np.zeros((7, 7, 7), bool)
    a[2, 2, 2] = True
    b = np.roll(a, shift, axis=(0, 1, 2))
    expected = math.sqrt(sum((d * s) ** 2 for d, s in zip(shift, spacing)))
    _, assd, hd, hd95 = all_metrics(a, b, spacing)
    assert (assd, hd, hd95) == pytest.approx((expected,) * 3, rel=1e-12)
    np.testing.assert_allclose(metrics.directed_distances(a, b, spacing), [expected], rtol=1e-12)


def test_square_inside_bigger_square_anisotropic_by_hand():
    # rows 2 mm apart, columns 1 mm apart; A = 3x3 square, B = the 5x5 square around it
    a, b = np.zeros((9, 9), bool), np.zeros((9, 9), bool)
    a[3:6, 3:6] = True
    b[2:7, 2:7] = True
    spacing = (2.0, 1.0)
    # A's 8 border voxels: the 4 corners and the left/right middles are 1 mm (one column) from B's
    # border, the top/bottom middles 2 mm (one row, or two columns).
    d_ab = metrics.directed_distances(a, b, spacing)
    assert sorted(d_ab) == pytest.approx([1, 1, 1, 1, 1, 1, 2, 2])
    # B's 16 border voxels: 6 on the left/right columns at 1 mm, 6 on the top/bottom rows at 2 mm,
    # the 4 corners at sqrt(2^2 + 1^2) mm.
    d_ba = metrics.directed_distances(b, a, spacing)
    assert sorted(d_ba) == pytest.approx([1] * 6 + [2] * 6 + [SQRT5] * 4)
    assert metrics.hd(a, b, spacing) == pytest.approx(SQRT5)
    assert metrics.assd(a, b, spacing) == pytest.approx((10 + 18 + 4 * SQRT5) / 24)
    assert metrics.hd95(a, b, spacing) == pytest.approx(SQRT5)  # sorted[21] and [22] are both sqrt(5)
    assert metrics.dice(a, b) == pytest.approx(2 * 9 / (9 + 25))


def test_assd_pools_both_directions_and_hd95_interpolates_linearly():
    # 1D: A = one voxel, B = a segment starting there; D_AB = [0], D_BA = [0, 10 voxels]
    a, b = np.zeros(30, bool), np.zeros(30, bool)
    a[10] = True
    b[10:21] = True
    spacing = (0.5,)
    pooled = [0.0, 0.0, 5.0]
    assert metrics.assd(a, b, spacing) == pytest.approx(5.0 / 3)  # pooled mean, as medpy 0.5.2
    assert metrics.assd(a, b, spacing) != pytest.approx((0.0 + 2.5) / 2)  # not the mean of the two means
    assert metrics.hd95(a, b, spacing) == pytest.approx(4.5)  # index 0.95 * 2 = 1.9: 0 + 0.9 * 5
    assert metrics.hd95(a, b, spacing) == pytest.approx(np.percentile(pooled, 95))
    assert metrics.hd(a, b, spacing) == pytest.approx(5.0)
    assert metrics.assd(a, b, spacing) == metrics.assd(b, a, spacing)


def test_objects_touching_the_array_edge():
    full = np.ones((4, 4), bool)  # the array edge is surface, as if the outside were background
    ring = full.copy()
    ring[1:3, 1:3] = False
    np.testing.assert_array_equal(metrics.surface(full), ring)
    cube = np.ones((3, 3, 3), bool)
    expected = cube.copy()
    expected[1, 1, 1] = False
    np.testing.assert_array_equal(metrics.surface(cube), expected)
    # B = the left 4x3 block of A: A's right column is 1 voxel from B's; B's two inner right voxels 1 from A's
    left = full.copy()
    left[:, 3] = False
    assert sorted(metrics.directed_distances(full, left)) == [0] * 8 + [1] * 4
    assert sorted(metrics.directed_distances(left, full)) == [0] * 8 + [1] * 2
    assert metrics.assd(full, left) == pytest.approx(6 / 22)
    assert metrics.hd(full, left) == 1.0


def test_one_voxel_thin_structures_are_all_surface():
    a, b = np.zeros((7, 8), bool), np.zeros((7, 8), bool)
    a[2, 1:6] = True
    b[4, 1:6] = True
    np.testing.assert_array_equal(metrics.surface(a), a)
    _, assd, hd, hd95 = all_metrics(a, b, (1.5, 0.7))
    assert (assd, hd, hd95) == pytest.approx((3.0, 3.0, 3.0))
    plane = np.zeros((5, 6, 6), bool)
    plane[2] = True
    np.testing.assert_array_equal(metrics.surface(plane), plane)
    assert metrics.hd(plane, np.roll(plane, 2, axis=0), (4.0, 1.0, 1.0)) == pytest.approx(8.0)


def test_empty_conventions():
    empty, one = np.zeros((5, 5), bool), np.zeros((5, 5), bool)
    one[2, 2] = True
    assert all_metrics(empty, empty) == (1.0, 0.0, 0.0, 0.0)
    for a, b in ((one, empty), (empty, one)):
        dsc, *distances = all_metrics(a, b)
        assert dsc == 0.0 and all(math.isnan(d) for d in distances)
    assert metrics.directed_distances(empty, one).shape == (0,)
    assert np.all(np.isinf(metrics.directed_distances(one, empty)))


# ----------------------------------------------------------------------------------------------------------
# Against a naive reference on random masks
# ----------------------------------------------------------------------------------------------------------
def naive_surface(mask):
    """Surface voxel by voxel: foreground with a face neighbour that is background or outside the array."""
    out = np.zeros_like(mask)
    for p in np.ndindex(mask.shape):
        if not mask[p]:
            continue
        for axis, step in itertools.product(range(mask.ndim), (-1, 1)):
            q = list(p)
            q[axis] += step
            if not 0 <= q[axis] < mask.shape[axis] or not mask[tuple(q)]:
                out[p] = True
    return out


def naive_directed(a, b, spacing):
    """For every surface voxel of a (C order), the smallest distance to any surface voxel of b, pair by pair."""
    pa, pb = np.argwhere(naive_surface(a)), np.argwhere(naive_surface(b))
    return np.array([min(math.sqrt(sum(((p - q) * spacing) ** 2)) for q in pb) for p in pa])


def random_pair(rng, ndim):
    shape = tuple(rng.integers(1, 9 if ndim < 4 else 5, ndim))
    a = rng.random(shape) < rng.uniform(0.05, 0.6)
    b = np.roll(a, 1, axis=0) ^ (rng.random(shape) < 0.1) if rng.random() < 0.5 else rng.random(shape) < 0.2
    a.flat[rng.integers(a.size)] = b.flat[rng.integers(b.size)] = True  # neither empty
    return a, b, rng.uniform(0.3, 4.0, ndim)


@pytest.fixture(params=["default", "tiny blocks and ball"])
def search_sizes(request, monkeypatch):
    """Default sizes, and sizes so small that the far-query search, its leaves and every block loop run."""
    if request.param != "default":
        monkeypatch.setattr(metrics, "BALL_SIZE", 2)
        monkeypatch.setattr(metrics, "BLOCK_ELEMENTS", 7)
        monkeypatch.setattr(metrics, "LEAF_SIZE", 3)
    metrics._ball.cache_clear()
    yield
    metrics._ball.cache_clear()


def test_surface_matches_naive_loops():
    rng = np.random.default_rng(0)
    for ndim in (1, 2, 3, 4):
        for _ in range(10):
            a, _, _ = random_pair(rng, ndim)
            np.testing.assert_array_equal(metrics.surface(a), naive_surface(a))


def test_distances_match_naive_pairwise_reference(search_sizes):
    rng = np.random.default_rng(1)
    for ndim in (1, 2, 3, 4):
        for _ in range(12):
            a, b, spacing = random_pair(rng, ndim)
            d_ab, d_ba = naive_directed(a, b, spacing), naive_directed(b, a, spacing)
            np.testing.assert_allclose(metrics.directed_distances(a, b, spacing), d_ab, rtol=1e-12, atol=1e-12)
            pooled = np.concatenate((d_ab, d_ba))
            expected = (pooled.mean(), pooled.max(), np.percentile(pooled, 95))
            assert all_metrics(a, b, spacing)[1:] == pytest.approx(expected, rel=1e-12)


def test_far_queries_are_exact_on_a_larger_case(search_sizes):
    # a blob and scattered specks far from it, so that many queries leave the probing ball
    rng = np.random.default_rng(2)
    a = np.zeros((6, 40, 40), bool)
    a[2:5, 5:15, 5:15] = True
    b = rng.random(a.shape) < 0.01
    b[3, 30:33, 28:36] = True
    spacing = np.array([5.0, 0.8, 1.1])
    for x, y in ((a, b), (b, a)):
        pa, pb = np.argwhere(metrics.surface(x)), np.argwhere(metrics.surface(y))
        expected = np.sqrt((((pa[:, None] - pb[None]) * spacing) ** 2).sum(-1).min(1))
        np.testing.assert_allclose(metrics.directed_distances(x, y, spacing), expected, rtol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# Against medpy 0.5.2
# ----------------------------------------------------------------------------------------------------------
def test_matches_medpy_on_random_masks(search_sizes):
    binary = pytest.importorskip("medpy.metric.binary", reason="medpy is not installed; pip install medpy==0.5.2")
    surface_distances = getattr(binary, "__surface_distances")
    rng = np.random.default_rng(3)
    for ndim, shape in [(2, (23, 17)), (3, (7, 15, 12))] * 6:
        a = rng.random(shape) < rng.uniform(0.1, 0.7)
        b = rng.random(shape) < rng.uniform(0.05, 0.5)
        a[0] = True  # touches the array edge
        spacing = tuple(rng.uniform(0.5, 8.0, ndim))
        np.testing.assert_allclose(metrics.directed_distances(a, b, spacing),
                                   surface_distances(a, b, spacing), rtol=1e-9)
        ours = all_metrics(a, b, spacing)
        theirs = (binary.dc(a, b), binary.assd(a, b, spacing), binary.hd(a, b, spacing), binary.hd95(a, b, spacing))
        assert ours == pytest.approx(theirs, rel=1e-6)


def test_evaluate_matches_medpy_on_the_bench_phantom():
    binary = pytest.importorskip("medpy.metric.binary", reason="medpy is not installed; pip install medpy==0.5.2")
    pred, gt = metrics._phantom((6, 64, 64))
    spacing = (10.0, 1.5, 1.5)
    for label, scores in metrics.evaluate(pred, gt, spacing).items():
        a, b = pred == label, gt == label
        theirs = {"dsc": binary.dc(a, b), "assd": binary.assd(a, b, spacing), "hd": binary.hd(a, b, spacing),
                  "hd95": binary.hd95(a, b, spacing)}
        assert scores == pytest.approx(theirs, rel=1e-6)


# ----------------------------------------------------------------------------------------------------------
# evaluate and summarize
# ----------------------------------------------------------------------------------------------------------
def test_evaluate_agrees_with_the_binary_functions_and_crops_exactly():
    gt = np.zeros((4, 10, 12), np.int16)
    gt[:, 0:4, 0:5] = 1  # touches three array faces
    gt[1:3, 5:9, 6:11] = 2
    pred = gt.copy()
    pred[:, 0:4, 5] = 1
    pred[2, 5:9, 6:8] = 0
    pred[3, 9, 11] = 4  # a label only the prediction has
    spacing = (3.0, 1.0, 0.5)
    result = metrics.evaluate(pred, gt, spacing)
    assert list(result) == [1, 2, 4]
    for label in (1, 2):
        a, b = pred == label, gt == label
        expected = dict(zip(("dsc", "assd", "hd", "hd95"), all_metrics(a, b, spacing)))
        assert result[label] == pytest.approx(expected, rel=1e-12)
    assert result[4]["dsc"] == 0.0 and math.isnan(result[4]["hd"])
    absent = metrics.evaluate(pred, gt, spacing, labels=[7])[7]
    assert absent == {"dsc": 1.0, "assd": 0.0, "hd": 0.0, "hd95": 0.0}
    floats = metrics.evaluate(pred.astype(np.float32), gt.astype(np.float64), spacing, labels=[1, 2])
    assert floats == {k: result[k] for k in (1, 2)}


def test_summarize_means_stds_and_nan_counts():
    rows = [
        {1: {"dsc": 0.8, "assd": 1.0, "hd": 4.0, "hd95": 3.0}, 2: {"dsc": 0.0, "assd": math.nan, "hd": math.nan,
                                                                  "hd95": math.nan}},
        {1: {"dsc": 0.6, "assd": 3.0, "hd": 8.0, "hd95": 5.0}, 2: {"dsc": 1.0, "assd": 2.0, "hd": 6.0, "hd95": 4.0}},
    ]
    summary = metrics.summarize(rows)
    assert set(summary) == {1, 2, "mean"}
    assert summary[1]["dsc"] == pytest.approx({"mean": 0.7, "std": 0.1, "n_nan": 0})
    assert summary[1]["hd"] == pytest.approx({"mean": 6.0, "std": 2.0, "n_nan": 0})
    assert summary[2]["hd"] == pytest.approx({"mean": 6.0, "std": 0.0, "n_nan": 1})
    # per volume the class mean is a nanmean: volume 1's hd is 4 (class 2 left out), volume 2's is 7
    assert summary["mean"]["hd"] == pytest.approx({"mean": 5.5, "std": 1.5, "n_nan": 0})
    assert summary["mean"]["dsc"] == pytest.approx({"mean": 0.6, "std": 0.2, "n_nan": 0})
    all_nan = metrics.summarize([{1: {"dsc": 0.0, "assd": math.nan, "hd": math.nan, "hd95": math.nan}}])
    assert all_nan["mean"]["hd"]["n_nan"] == 1 and math.isnan(all_nan["mean"]["hd"]["mean"])


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call, message", [
    (lambda: metrics.hd(np.ones((3, 3)), np.ones((3, 4))), "shape"),
    (lambda: metrics.dice(np.ones((3, 3)), np.ones((3, 4))), "shape"),
    (lambda: metrics.hd(np.ones((3, 3)), np.ones((3, 3)), (1.0,)), "per array axis"),
    (lambda: metrics.assd(np.ones((3, 3)), np.ones((3, 3)), (1.0, 0.0)), "positive"),
    (lambda: metrics.hd95(np.ones((3, 3)), np.ones((3, 3)), (1.0, -2.0)), "positive"),
    (lambda: metrics.hd95(np.ones((3, 3)), np.ones((3, 3)), (1.0, math.nan)), "positive"),
    (lambda: metrics.hd(np.ones((3, 3)), np.ones((3, 3)), 1.0), "per array axis"),
    (lambda: metrics.hd(np.ones((3, 3)), np.ones((3, 3)), "ab"), "per array axis"),
    (lambda: metrics.hd(np.full((3, 3), 2), np.ones((3, 3))), "binary"),
    (lambda: metrics.dice(np.full((3, 3), 0.5), np.ones((3, 3))), "binary"),
    (lambda: metrics.surface(np.array([0, 1, math.nan])), "binary"),
    (lambda: metrics.surface(np.array(["a", "b"])), "binary"),
    (lambda: metrics.surface(np.array(True)), "dimension"),
    (lambda: metrics.directed_distances(np.ones(3), np.ones(3), (1.0, 1.0)), "per array axis"),
    (lambda: metrics.evaluate(np.ones((2, 2), int), np.ones((2, 3), int)), "shape"),
    (lambda: metrics.evaluate(np.int64(1), np.int64(1)), "dimension"),
    (lambda: metrics.evaluate(np.full((2, 2), 0.5), np.ones((2, 2), int)), "integer labels"),
    (lambda: metrics.evaluate(np.ones((2, 2), int), np.ones((2, 2), int), (1.0, 1.0, 1.0)), "per array axis"),
    (lambda: metrics.evaluate(np.ones((2, 2), int), np.ones((2, 2), int), labels=[1.5]), "labels"),
    (lambda: metrics.summarize([]), "at least one"),
    (lambda: metrics.summarize([{1: {}}, {2: {}}]), "same labels"),
])
def test_bad_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------
def save_labels(path, labels, zooms):
    image = nib.Nifti1Image(labels.astype(np.uint8), np.diag([*zooms, 1.0]))
    image.header.set_zooms(zooms)
    nib.save(image, path)
    return path


def assert_one_error_line(result, *words):
    rc, _, err = result
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_cli_prints_a_table_with_the_ground_truth_spacing(tmp_path):
    gt = np.zeros((6, 6, 3), np.uint8)
    gt[1:3, 1:3, 1] = 1
    pred = np.roll(gt, 2, axis=0)  # shifted by two voxels along the first axis
    gt_path = save_labels(tmp_path / "gt.nii.gz", gt, (1.5, 1.0, 4.0))
    pred_path = save_labels(tmp_path / "pred.nii.gz", pred, (1.5, 1.0, 4.0))
    rc, out, err = run_cli("metrics.py", pred_path, gt_path)
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split() == ["class", "DSC", "ASD", "mm", "HD", "mm", "HD95", "mm"]
    row = lines[1].split()
    assert row[0] == "1" and float(row[1]) == 0.0 and float(row[3]) == pytest.approx(3.0)  # 2 voxels x 1.5 mm
    rc, out, err = run_cli("metrics.py", pred_path, gt_path, "--labels", "1", "2")
    assert rc == 0 and [line.split()[0] for line in out.strip().splitlines()[1:]] == ["1", "2", "mean"]
    coarse_pred = save_labels(tmp_path / "coarse.nii.gz", pred, (3.0, 1.0, 4.0))
    rc, out, err = run_cli("metrics.py", coarse_pred, gt_path)
    assert rc == 0 and "warning" in err and "coarse.nii.gz" in err
    assert float(out.strip().splitlines()[1].split()[3]) == pytest.approx(3.0)  # the ground truth's zooms


def test_cli_errors_are_one_line_naming_the_file(tmp_path):
    labels = np.zeros((5, 5, 3), np.uint8)
    labels[1:3, 1:3, 1] = 1
    good = save_labels(tmp_path / "good.nii.gz", labels, (1.0, 1.0, 1.0))
    assert_one_error_line(run_cli("metrics.py", tmp_path / "missing.nii.gz", good), "missing.nii.gz", "no such file")
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[:-40])
    assert_one_error_line(run_cli("metrics.py", truncated, good), "truncated.nii.gz")
    header_only = tmp_path / "header.nii.gz"
    header_only.write_bytes(gzip.compress(gzip.decompress(good.read_bytes())[:200]))
    assert_one_error_line(run_cli("metrics.py", header_only, good), "header.nii.gz")
    other = save_labels(tmp_path / "other.nii.gz", np.zeros((5, 4, 3)), (1.0, 1.0, 1.0))
    assert_one_error_line(run_cli("metrics.py", other, good), "other.nii.gz", "shape")
    text = tmp_path / "notes.nii.gz"
    text.write_text("not an image")
    assert_one_error_line(run_cli("metrics.py", good, text), "notes.nii.gz")


def test_bench_runs_on_a_tiny_volume():
    rc, out, err = run_cli("metrics.py", "--bench", "--bench-shape", "5", "32", "32")
    assert rc == 0, err
    assert "metrics.py" in out and "s/volume" in out


# ==========================================================================================================
# ideal.py
# ==========================================================================================================
# ----------------------------------------------------------------------------------------------------------
# Eq. 1 and Eq. 2 against naive loops
# ----------------------------------------------------------------------------------------------------------
LOSS = {k: ideal.DEFAULTS[k] for k in ideal.LOSS_KEYS}                       # pretrain_step's settings


def naive_local_infonce(q, k, valid, tau, negatives):
    """Eq. 2 written location by location."""
    b, c, h, w = q.shape
    q, k, valid = q.reshape(b, c, -1), k.reshape(b, c, -1), valid.reshape(b, -1)
    total, count = 0.0, 0
    for i in range(b):
        for loc in range(h * w):
            if not valid[i, loc]:
                continue
            pos = math.exp(float(q[i, :, loc] @ k[i, :, loc]) / tau)
            neg = 0.0
            for j in range(b):
                if j == i:
                    continue
                locs = [loc] if negatives == "same" else range(h * w)
                for m in locs:
                    if valid[j, m]:
                        neg += math.exp(float(q[i, :, loc] @ k[j, :, m]) / tau)
            total += -math.log(pos / (pos + neg))
            count += 1
    return total / count


@pytest.mark.parametrize("negatives", ["same", "all"])
def test_local_infonce_equals_naive_loop(negatives):
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(3, 5, 2, 3, generator=g, dtype=torch.float64), dim=1)
    k = F.normalize(torch.randn(3, 5, 2, 3, generator=g, dtype=torch.float64), dim=1)
    valid = torch.rand(3, 2, 3, generator=g) > 0.3
    got = ideal.local_infonce(q, k, valid, tau=0.2, negatives=negatives).item()
    assert got == pytest.approx(naive_local_infonce(q, k, valid, 0.2, negatives), rel=1e-6)


@pytest.mark.parametrize("negatives", ["same", "all"])
def test_both_directions_in_one_product(negatives):
    """pretrain_loss's L_loc, both directions of Eq. 2 aligned and scored in one batched product, is the mean of
    the two directions aligned one by one and scored by the naive loop."""
    g = torch.Generator().manual_seed(2)
    b = 3
    dense = torch.randn(2 * b, 5, 3, 3, generator=g, dtype=torch.float64)
    thetas = ideal.random_affine(2 * b, g, torch.device("cpu"))
    model = lambda views: (None, dense)                                      # noqa: E731 (global, dense)
    _, parts = ideal.pretrain_loss(model, None, thetas, loss="local", tau=0.2, lambda_loc=1.0, negatives=negatives)
    (q, k), (t_q, t_k) = F.normalize(dense, dim=1).chunk(2), thetas.chunk(2)
    want = 0.0
    for mine, other, t_mine, t_other in ((q, k, t_q, t_k), (k, q, t_k, t_q)):
        on_mine, valid = ideal.align(other, t_mine, t_other)
        want += naive_local_infonce(mine, F.normalize(on_mine, dim=1), valid, 0.2, negatives) / 2
    assert parts["local"].item() == pytest.approx(want, rel=1e-6)


def test_local_infonce_minimum_and_shuffled():
    g = torch.Generator().manual_seed(1)
    b, c, h, w = 4, 40, 3, 3
    feats = F.normalize(torch.randn(b, c, h, w, generator=g), dim=1)
    valid = torch.ones(b, h, w, dtype=torch.bool)
    identical = ideal.local_infonce(feats, feats, valid, 0.05, "same").item()
    shuffled = ideal.local_infonce(feats, feats.flatten(2)[..., torch.randperm(h * w, generator=g)]
                                   .reshape(b, c, h, w), valid, 0.05, "same").item()
    orthogonal = torch.eye(c)[: b * h * w].reshape(b, h, w, c).permute(0, 3, 1, 2)
    best = ideal.local_infonce(orthogonal, orthogonal, valid, 0.05, "same").item()
    assert best < 1e-6                        # well separated: -log(e^20 / (e^20 + 3)) ~ 6e-9
    assert identical < 0.5 < shuffled


def naive_global_infonce(q, k, tau):
    z = F.normalize(torch.cat([q, k]), dim=1)
    n, b = len(z), len(q)
    total = 0.0
    for i in range(n):
        j = (i + b) % n
        den = sum(math.exp(float(z[i] @ z[m]) / tau) for m in range(n) if m != i)
        total += -math.log(math.exp(float(z[i] @ z[j]) / tau) / den)
    return total / n


def test_global_infonce_equals_naive_loop():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)
    assert ideal.global_infonce(q, k, 0.3).item() == pytest.approx(naive_global_infonce(q, k, 0.3), rel=1e-9)


# ----------------------------------------------------------------------------------------------------------
# Exact correspondence between the two views
# ----------------------------------------------------------------------------------------------------------
def affine(angle, scale, flip, tx, ty):
    c, s = math.cos(angle) * scale, math.sin(angle) * scale
    return torch.tensor([[[c * flip, -s, tx], [s * flip, c, ty]]], dtype=torch.float32)


@pytest.mark.parametrize("shape", [(32, 128, 128), (16, 4, 4), (3, 7, 5)])
def test_separable_affine_grid_is_torchs(shape):
    """ideal.affine_grid: F.affine_grid's pixel centres and product, to float rounding (two units in the last place
    at 1: the sum is taken in another order)."""
    b, h, w = shape
    g = torch.Generator().manual_seed(h)
    thetas = [ideal.random_affine(b, g, torch.device("cpu")) for _ in range(2)]
    for theta in thetas + [ideal.relative_affine(*thetas)]:
        want = F.affine_grid(theta, [b, 1, h, w], align_corners=False)
        torch.testing.assert_close(ideal.affine_grid(theta, h, w), want, rtol=0, atol=2.4e-7)


def test_relative_affine_is_the_matrix_inverse_composition():
    """relative_affine's adjugate form equals inv(M_k) @ M_q by torch.linalg.inv, and maps the key view back onto
    the query view (M_k @ rel = M_q)."""
    g = torch.Generator().manual_seed(3)
    theta_q, theta_k = (ideal.random_affine(64, g, torch.device("cpu")).double() for _ in range(2))
    last = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).expand(64, 1, 3)
    m_q, m_k = torch.cat([theta_q, last], 1), torch.cat([theta_k, last], 1)
    rel = ideal.relative_affine(theta_q, theta_k)
    torch.testing.assert_close(rel, (torch.linalg.inv(m_k) @ m_q)[:, :2], rtol=0, atol=1e-12)
    torch.testing.assert_close((m_k @ torch.cat([rel, last], 1))[:, :2], theta_q, rtol=0, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_pretraining_step_on_cuda_never_waits_for_the_device():
    """No host synchronisation inside pretrain_step (views, both losses, backward, Adam): torch's sync debug mode
    raises on the first one (7468e7c removed three: torch.linalg.inv and two host-made constants)."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = ideal.to_device(ideal.PretrainNet(18, 8, 16), device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(4, 1, 64, 64, device=device)
    ideal.pretrain_step(model, opt, x, g, **LOSS)                           # warm-up: lazy initialisation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ideal.pretrain_step(model, opt, x, g, **LOSS)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_alignment_is_exact_on_a_coordinate_ramp():
    """Features = the image coordinates themselves: after alignment the key map must equal the query map."""
    n = 96
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, n), torch.linspace(-1, 1, n), indexing="ij")
    ramp = torch.stack([xs, ys])[None]                                       # (1, 2, n, n)
    theta_q, theta_k = affine(0.4, 0.7, 1, 0.1, -0.05), affine(-0.3, 0.8, -1, -0.1, 0.1)
    fq = F.avg_pool2d(ideal.warp(ramp, theta_q), 8)                          # (1, 2, 12, 12)
    fk = F.avg_pool2d(ideal.warp(ramp, theta_k), 8)
    k_on_q, valid = ideal.align(fk, theta_q, theta_k)
    grid = F.affine_grid(ideal.relative_affine(theta_q, theta_k), list(fk.shape), align_corners=False)
    interior = valid & (grid.abs() <= 1 - 1 / 12).all(-1)
    assert interior.sum() > 40 and (~valid).sum() > 0
    err = (k_on_q - fq).abs().amax(1)[interior]
    assert err.max() < 2 / n                                                 # well under one pixel


def test_alignment_single_bright_pixel():
    """A single bright pixel seen through two known affines lands on the same feature cell."""
    n, cell = 128, 8
    x = torch.zeros(1, 1, n, n)
    x[0, 0, 70, 50] = 1.0
    theta_q, theta_k = affine(0.5, 0.8, 1, 0.05, 0.05), affine(-0.4, 0.9, -1, 0.0, -0.05)
    fq = F.avg_pool2d(ideal.warp(x, theta_q), cell)
    fk = F.avg_pool2d(ideal.warp(x, theta_k), cell)
    k_on_q, valid = ideal.align(fk, theta_q, theta_k)
    w = fq.shape[-1]
    iq, ik = divmod(int(fq.flatten().argmax()), w), divmod(int(k_on_q.flatten().argmax()), w)
    assert valid[0, iq[0], iq[1]]
    assert abs(iq[0] - ik[0]) < 1 and abs(iq[1] - ik[1]) < 1


def test_out_of_view_locations_are_invalid():
    """A key view covering only the right half of the image: query cells on the left are invalid."""
    theta_q = affine(0.0, 1.0, 1, 0.0, 0.0)                                  # the whole image
    theta_k = torch.tensor([[[0.5, 0.0, 0.5], [0.0, 1.0, 0.0]]])             # x in [0, 1] only
    _, valid = ideal.align(torch.zeros(1, 3, 8, 8), theta_q, theta_k)
    assert valid[0, :, 4:].all() and not valid[0, :, :4].any()


def test_intensity_jitter_is_the_formula_and_leaves_its_input_alone():
    """jitter_intensity works in place on its own copy: the same values as gamma, contrast, brightness and noise
    written out, drawn from the generator in the same order, and the caller's images unchanged."""
    x = torch.rand(4, 1, 16, 16) * 1.2 - 0.1
    before = x.clone()
    out = ideal.jitter_intensity(x, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    u = torch.rand(4, 4, 1, 1, 1, generator=g)
    want = x.clamp(min=0) ** (0.7 + 0.8 * u[:, 0]) * (0.8 + 0.4 * u[:, 1]) + 0.1 * (2 * u[:, 2] - 1)
    want = want + 0.05 * u[:, 3] * torch.randn(x.shape, generator=g)
    assert torch.equal(x, before)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Eq. 3
# ----------------------------------------------------------------------------------------------------------
def test_cross_consistency_loss_by_hand():
    l1 = torch.tensor([[[[2.0]], [[0.0]]]])                                  # (1, 2, 1, 1): p1 favours class 0
    l2 = torch.tensor([[[[0.0]], [[1.0]]]])                                  # p2 favours class 1
    mask = torch.tensor([[[1]]])
    y1, y2 = ideal.pseudo_label(l1, 0), ideal.pseudo_label(l2, 0)
    loss, sup, unsup = ideal.cross_consistency_loss(l1, l2, mask, l1, l2, y1, y2, weight=0.5, dice=False)
    ce = lambda z, c: -math.log(math.exp(z[c]) / (math.exp(z[0]) + math.exp(z[1])))
    want_sup = ce([2.0, 0.0], 1) + ce([0.0, 1.0], 1)
    want_unsup = ce([2.0, 0.0], 1) + ce([0.0, 1.0], 0)                       # p1 vs y2 = 1, p2 vs y1 = 0
    assert sup.item() == pytest.approx(want_sup)
    assert unsup.item() == pytest.approx(want_unsup)
    assert loss.item() == pytest.approx(want_sup + 0.5 * want_unsup)


def test_soft_dice_loss_by_hand_and_added_to_the_labeled_term_only():
    """--sup-loss dice-ce: 1 - mean foreground soft Dice over the batch, added to each decoder's labeled CE."""
    mask = torch.tensor([[[1, 0]]])                                           # (1, 1, 2): one class-1 pixel
    logits = torch.log(torch.tensor([[[[0.5, 0.8]], [[0.5, 0.2]]]]))         # (1, 2, 1, 2): p1 = (0.5, 0.2)
    want = 1 - (2 * 0.5 + 1e-5) / (0.5 + 0.2 + 1 + 1e-5)
    assert ideal.soft_dice_loss(logits, mask).item() == pytest.approx(want)
    assert ideal.soft_dice_loss(torch.tensor([[[[-20.0, 20.0]], [[20.0, -20.0]]]]), mask).item() < 1e-6
    y = torch.tensor([[[0, 1]]])
    plain, dice = (ideal.cross_consistency_loss(logits, logits, mask, logits, logits, y, y, 0.5, d) for d in (0, 1))
    assert dice[1].item() == pytest.approx(plain[1].item() + 2 * want)
    assert dice[2].item() == plain[2].item() and dice[0].item() == pytest.approx(plain[0].item() + 2 * want)


def test_confidence_threshold_ignores_pixels_and_keeps_the_mean_over_all():
    logits = torch.tensor([[[[3.0, 0.1]], [[0.0, 0.0]]]])                    # (1, 2, 1, 2): confident, unsure
    y = ideal.pseudo_label(logits, threshold=0.9)
    assert y.tolist() == [[[0, ideal.IGNORE]]]
    other = torch.zeros(1, 2, 1, 2)
    _, _, unsup = ideal.cross_consistency_loss(other, other, torch.zeros(1, 1, 2, dtype=torch.long), other, other,
                                               y, y, 1.0, False)
    assert unsup.item() == pytest.approx(2 * math.log(2) / 2)               # one pixel of two counts, twice


def test_unlabeled_gradients_reach_both_decoders_and_encoder_not_pseudo_labels():
    torch.manual_seed(0)
    model = ideal.IDEALSegmenter(3, depth=10, width=8)
    l1, l2 = model(torch.rand(2, 1, 32, 32))
    y1, y2 = ideal.pseudo_label(l1, 0), ideal.pseudo_label(l2, 0)
    assert not y2.requires_grad
    _, _, unsup = ideal.cross_consistency_loss(l1[:0], l2[:0], torch.zeros(0, 32, 32, dtype=torch.long), l1, l2,
                                               y1, y2, 1.0, False)
    unsup.backward()
    for part in (model.encoder, model.d1, model.d2):
        assert sum(p.grad.abs().sum() for p in part.parameters() if p.grad is not None) > 0


def labeled_gradients(forward, with_unlabeled):
    """Gradients of one fine-tuning step at unlabeled weight 0, with or without an unlabeled batch present."""
    torch.manual_seed(0)
    model = ideal.IDEALSegmenter(3, depth=10, width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    g = torch.Generator().manual_seed(0)
    xl, ml = blob_batch(4, 32, g)
    xu = torch.rand(4, 1, 32, 32, generator=g) * 3 if with_unlabeled else None
    parts = ideal.finetune_step(model, opt, xl, ml, xu, None, 0.0, forward, 0.0, False)
    return parts["sup"], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_separate_forward_keeps_the_labeled_loss_free_of_the_unlabeled_batch():
    """The mechanism behind the one-volume collapse (README, "Decisions"): in one joint forward pass BatchNorm
    normalises the labeled slices with statistics of the labeled + unlabeled mix, so the unlabeled batch changes
    the labeled loss and its gradients even at weight 0; separate passes leave them exactly as without it."""
    sup0, grads0 = labeled_gradients("separate", with_unlabeled=False)
    sup1, grads1 = labeled_gradients("separate", with_unlabeled=True)
    assert sup1.item() == sup0.item() and grads0.keys() == grads1.keys()
    assert all(torch.equal(grads0[k], grads1[k]) for k in grads0)
    sup2, grads2 = labeled_gradients("joint", with_unlabeled=True)
    assert sup2.item() != pytest.approx(sup0.item(), rel=1e-3)
    assert not torch.allclose(grads0["encoder.stem.0.weight"], grads2["encoder.stem.0.weight"], rtol=1e-2)


def test_unlabeled_stream_does_not_change_the_labeled_batches():
    """Labeled batches come from RNG stream 0, unlabeled ones from stream 1: E0 and E2 of the ablation see the
    same labeled sequence."""
    cpu = torch.device("cpu")
    draw = lambda stream: torch.rand(4, generator=ideal.generators(3, 5, cpu, stream)[1])
    assert torch.equal(draw(0), draw(0)) and not torch.equal(draw(0), draw(1))


def test_decoders_differ_and_give_input_size():
    model = ideal.IDEALSegmenter(4, depth=10, width=8)
    assert isinstance(model.d1.final.up.up, torch.nn.ConvTranspose2d)
    assert isinstance(model.d2.final.up.up[0], torch.nn.Upsample)
    l1, l2 = model(torch.rand(2, 1, 64, 64))
    assert l1.shape == l2.shape == (2, 4, 64, 64)
    assert not torch.allclose(l1, l2)
    same = ideal.IDEALSegmenter(4, depth=10, width=8, same_decoders=True)
    assert isinstance(same.d2.final.up.up, torch.nn.ConvTranspose2d)


def test_rampup():
    assert ideal.rampup(0, 100, 1.0) == pytest.approx(math.exp(-5))
    assert ideal.rampup(50, 100, 1.0) == pytest.approx(math.exp(-1.25)) and ideal.rampup(100, 100, 1.0) == 1.0
    assert ideal.rampup(20, 100, 0.4) == pytest.approx(math.exp(-1.25))
    assert ideal.rampup(40, 100, 0.4) == 1.0 and ideal.rampup(99, 100, 0.4) == 1.0
    assert ideal.rampup(0, 100, 0) == 1.0


@pytest.mark.parametrize("depth, params", [(18, 11_170_240), (50, 23_501_760)])
def test_resnet_builds_exactly_the_standard_layout(depth, params):
    """torchvision's ResNet-18/50 (11,689,512 / 25,557,032 parameters) without fc (513,000 / 2,049,000) and with a
    1-channel stem (3,136 instead of 9,408 weights): every module built is used."""
    assert sum(p.numel() for p in ideal.ResNetEncoder(depth, width=64).parameters()) == params


@pytest.mark.parametrize("depth", [10, 50])
def test_encoder_strides(depth):
    enc = ideal.ResNetEncoder(depth, width=8)
    feats = enc(torch.rand(1, 1, 64, 64))
    assert [f.shape[-1] for f in feats] == [32, 16, 8, 4, 2]
    assert [f.shape[1] for f in feats] == enc.channels


# ----------------------------------------------------------------------------------------------------------
# Short training runs
# ----------------------------------------------------------------------------------------------------------
def blob_batch(n, size, g):
    """Slices with a bright disc (class 2) inside a ring (class 1) at random places."""
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    c = torch.rand(n, 2, generator=g) * size / 2 + size / 4
    r = torch.sqrt((ys - c[:, 0, None, None]) ** 2 + (xs - c[:, 1, None, None]) ** 2)
    mask = (r < size / 6).long() + (r < size / 10).long()
    x = mask.float() / 2 + 0.05 * torch.randn(n, size, size, generator=g)
    return x[:, None], mask


def test_pretraining_steps_reduce_loss():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = ideal.PretrainNet(depth=10, width=8, proj_dim=16)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, _ = blob_batch(8, 64, g)
    losses = []
    for _ in range(25):
        losses.append(ideal.pretrain_step(model, opt, x, torch.Generator().manual_seed(len(losses)),
                                          **dict(LOSS, tau=0.5))["loss"].item())
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_overfitting_a_few_slices_reaches_high_dice():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = ideal.IDEALSegmenter(3, depth=10, width=8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, m = blob_batch(4, 64, g)
    for i in range(150):                                                     # both pseudo-label sources
        ideal.finetune_step(model, opt, x, m, x, x if i % 2 else None, 0.5, "separate", 0.5 * (i % 2), False)
    model.eval()
    pred = ideal.predict(model, x).argmax(1)
    dice = [2 * ((pred == c) & (m == c)).sum() / ((pred == c).sum() + (m == c).sum()) for c in (1, 2)]
    assert min(dice) > 0.9


# ----------------------------------------------------------------------------------------------------------
# Command lines on a tiny phantom
# ----------------------------------------------------------------------------------------------------------
TINY = ["--size", "64", "--spacing", "5", "--depth", "10", "--width", "8", "--batch-size", "4", "--quiet"]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    data.write_phantom(root, n=12, seed=3)
    return root


@pytest.fixture(scope="module")
def pretrained(phantom, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "pre"
    rc, _, err = run_cli("ideal.py", "pretrain", "--data", phantom, "--out", out, "--epochs", "2", *TINY)
    assert rc == 0, err
    return out


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_pretrain_cli_writes_a_complete_run_folder(pretrained):
    for name in ("config.json", "split.json", "log.jsonl", "last.pt", "encoder.pt", "done.json"):
        assert (pretrained / name).is_file(), name
    log = [json.loads(line) for line in (pretrained / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and all(math.isfinite(r["loss"]) for r in log)
    cfg = json.loads((pretrained / "config.json").read_text())
    assert cfg["depth"] == 10 and cfg["epochs"] == 2 and cfg["loss"] == "both"
    split = json.loads((pretrained / "split.json").read_text())
    assert not set(split["test"]) & set(split["train"] + split["val"])


def test_killed_pretraining_resumes_to_the_same_weights(phantom, pretrained, tmp_path, capsys):
    """SIGKILL once epoch 1 is logged, then --resume: the same weights as the uninterrupted 2-epoch run."""
    out = tmp_path / "killed"
    args = ["pretrain", "--data", phantom, "--out", out, "--epochs", "2", *TINY]
    proc = subprocess.Popen([sys.executable, str(HERE / "ideal.py"), *map(str, args)], cwd=HERE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = out / "log.jsonl"
    while proc.poll() is None and not (log.is_file() and log.read_text().count("\n") >= 1):
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    rc, _, err = run_main(capsys, "pretrain", "--out", out, "--resume", *TINY)
    assert rc == 0, err
    a, b = weights(pretrained / "last.pt"), weights(out / "last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_extends_a_finished_run(phantom, pretrained, tmp_path, capsys):
    out = tmp_path / "short"
    rc, _, err = run_main(capsys, "pretrain", "--data", phantom, "--out", out, "--epochs", "1", *TINY)
    assert rc == 0, err
    rc, _, err = run_main(capsys, "pretrain", "--out", out, "--resume", "--epochs", "2", *TINY)
    assert rc == 0, err
    a, b = weights(pretrained / "last.pt"), weights(out / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_same_numbers(phantom, pretrained, tmp_path, capsys):
    rc, _, err = run_main(capsys, "pretrain", "--data", phantom, "--out", tmp_path / "again", "--epochs", "2", *TINY)
    assert rc == 0, err
    assert (pretrained / "log.jsonl").read_text().split("images_per_s")[0] == \
        (tmp_path / "again" / "log.jsonl").read_text().split("images_per_s")[0]


def test_recomputed_bn_holds_the_mean_of_the_batch_statistics_and_puts_the_running_ones_back():
    """Inside recomputed_bn the running mean is the mean of the batches' means (the running variance the mean of
    their unbiased variances) over `limit` shuffled slices; on exit the running statistics and the momentum are
    what they were."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3)).eval()
    bn = model[1]
    bn.running_mean.fill_(5.0)
    before = {k: v.clone() for k, v in bn.named_buffers()}
    x = torch.randn(10, 1, 8, 8) * torch.arange(1, 11).view(10, 1, 1, 1)
    with ideal.recomputed_bn(model, x, 4, seed=1, limit=8):
        order = torch.randperm(10, generator=torch.Generator().manual_seed(1))[:8]
        feats = [model[0](x[i]) for i in order.split(4)]
        assert torch.allclose(bn.running_mean, torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0), atol=1e-6)
        assert torch.allclose(bn.running_var, torch.stack([f.var((0, 2, 3)) for f in feats]).mean(0), atol=1e-5)
        assert not model.training
    assert bn.momentum == 0.1 and all(torch.equal(v, before[k]) for k, v in bn.named_buffers())


def test_foreground_dice_by_hand():
    y = torch.tensor([[0, 1, 1, 2], [3, 3, 0, 0]])
    m = torch.tensor([[0, 1, 2, 2], [3, 0, 0, 0]])
    # class 1: 2*1/(2+1); class 2: 2*1/(1+2); class 3: 2*1/(2+1)
    assert ideal.foreground_dice(y, m, 4) == pytest.approx(2 / 3)
    where = torch.tensor([[True, True, False, True], [True, False, True, True]])
    # class 1: 2*1/(1+1) = 1; class 2: 2*1/(1+1) = 1; class 3: 2*1/(1+1) = 1
    assert ideal.foreground_dice(y, m, 4, where) == pytest.approx(1.0)
    assert ideal.foreground_dice(torch.zeros(3, 3, dtype=torch.long), torch.zeros(3, 3, dtype=torch.long), 4) == 1.0


def test_pseudo_label_quality_scores_the_validation_slices_and_leaves_training_alone():
    torch.manual_seed(0)
    model = ideal.IDEALSegmenter(4, depth=10, width=8)
    x, m = torch.rand(6, 1, 64, 64), torch.randint(0, 4, (6, 64, 64))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    cfg = {"batch_size": 4, "num_classes": 4, "threshold": 0.0}
    everything = ideal.pseudo_label_quality(model, x, m, cfg, torch.Generator().manual_seed(1))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())
    assert everything["pl_kept"] == 1.0 and everything["pl_dice_kept"] == everything["pl_dice"]
    assert 0 <= everything["pl_dice"] <= 1 and 0 <= everything["pl_disagree"] <= 1 and everything["pl_fg_ratio"] > 0
    sure = ideal.pseudo_label_quality(model, x, m, dict(cfg, threshold=0.99), torch.Generator().manual_seed(1))
    assert sure["pl_kept"] < 1 and sure["pl_fg_ratio"] < everything["pl_fg_ratio"]
    assert sure["pl_disagree"] == everything["pl_disagree"] and sure["pl_dice"] == everything["pl_dice"]


def test_finetune_logs_pseudo_label_quality_and_keeps_best_and_final_judged_networks(phantom, pretrained, tmp_path,
                                                                                     capsys):
    """log.jsonl holds the pseudo-label diagnostics every epoch; best.pt and final.pt are the trained network with
    BatchNorm statistics recomputed on the labeled slices (the Dice under the running ones logged beside it), and
    eval --checkpoint best final scores both, each into its own folder."""
    out = tmp_path / "run"
    assert ideal.main(["finetune", "--data", str(phantom), "--pretrained", str(pretrained / "encoder.pt"),
                       "--labeled", "20", "--epochs", "2", "--steps-per-epoch", "3", "--out", str(out), *TINY]) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    for record in log:
        assert {"pl_dice", "pl_dice_kept", "pl_kept", "pl_fg_ratio", "pl_disagree", "kept"} <= set(record)
        assert 0 <= record["kept"] <= 1 and 0 <= record["pl_kept"] <= 1 and 0 <= record["val_dice_running"] <= 1
    final = torch.load(out / "final.pt", map_location="cpu", weights_only=True)
    last = weights(out / "last.pt")
    assert final["epoch"] == 2 and final["val_dice"] == pytest.approx(log[-1]["val_dice"], abs=1e-4)
    stats = [k for k in last if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(final["model"][k], last[k]) for k in last if k not in stats and "num_b" not in k)
    assert all(not torch.equal(final["model"][k], last[k]) for k in stats)
    cfg = final["config"]
    x_l = ideal.finetune_data(cfg, torch.device("cpu"))[2][0]
    net = ideal.IDEALSegmenter(cfg["num_classes"], cfg["depth"], cfg["width"], cfg["same_decoders"])
    net.load_state_dict(last)
    with ideal.recomputed_bn(net, x_l, cfg["batch_size"], cfg["seed"], cfg["steps_per_epoch"] * cfg["batch_size"]):
        assert all(torch.equal(net.state_dict()[k], final["model"][k]) for k in stats)
    assert_one_error_line(run_main(capsys, "eval", "--run", out, "--checkpoint", "best", "final", "--out",
                                   tmp_path / "one"), "--out", "--checkpoint")
    assert ideal.main(["eval", "--run", str(out), "--checkpoint", "best", "final", "--quiet"]) == 0
    for folder in ("eval-test", "eval-test-final"):
        assert json.loads((out / folder / "summary.json").read_text())["volumes"] == 4


def test_finetune_eval_and_report_cli(phantom, pretrained, tmp_path, capsys):
    out = tmp_path / "runs" / "ideal" / "L20" / "seed0"
    rc, _, err = run_main(capsys, "finetune", "--data", phantom, "--out", out, "--pretrained",
                          pretrained / "encoder.pt", "--labeled", "20", "--epochs", "2", "--steps-per-epoch", "3",
                          *TINY)
    assert rc == 0, err
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and 0 <= log[-1]["val_dice"] <= 1 and (out / "best.pt").is_file()
    rc, stdout, err = run_main(capsys, "eval", "--run", out, "--save-pred", "--save-png", "--quiet")
    assert rc == 0, err
    ev = out / "eval-test"
    summary = json.loads((ev / "summary.json").read_text())
    assert summary["volumes"] == 4 and set(summary["mean"]) == {"dsc", "assd", "hd", "hd95"}
    measured = list(csv.DictReader((ev / "metrics.csv").open()))
    assert len(measured) == 4 * 3
    for c in ("1", "2", "3"):
        pred, true = (sum(float(r[f"volume_ml_{k}"]) for r in measured if r["label"] == c) for k in ("pred", "gt"))
        assert summary["volume_ratio"][c] == pytest.approx(pred / true)
    assert "MYO" in stdout
    _, volumes = data.load_volumes(phantom)
    for vol in volumes:
        if vol.id in json.loads((out / "split.json").read_text())["test"]:
            pred = nib.load(ev / "pred" / f"{vol.id}.nii.gz")
            assert pred.shape == vol.image.shape and np.allclose(pred.affine, vol.affine)
            assert (ev / "png" / f"{vol.id}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rc, stdout, err = run_main(capsys, "report", "--runs", tmp_path / "runs", "--out", tmp_path / "table",
                               "--made-by", "pytest", "--commit", "abc")
    assert rc == 0, err
    table = json.loads((tmp_path / "table.json").read_text())
    assert table["made_by"] == "pytest" and len(table["results"]) == 1
    row = table["results"][0]
    assert row["row"] == "ideal" and row["labeled_percent"] == 20.0
    assert row["dsc"]["mean"] == pytest.approx(summary["mean"]["dsc"]["mean"])
    (run,) = row["per_run"]
    assert run["seed"] == "0" and run["dsc"] == summary["mean"]["dsc"]["mean"]
    assert run["dsc_per_class"] == {c: summary[c]["dsc"]["mean"] for c in ("1", "2", "3")}
    assert run["volume_ratio"] == summary["volume_ratio"]
    assert run["validation"] == dict(
        best=max(r["val_dice"] for r in log), spread=abs(log[0]["val_dice"] - log[1]["val_dice"]),
        last10=pytest.approx((log[0]["val_dice"] + log[1]["val_dice"]) / 2))
    assert "| IDEAL" in (tmp_path / "table.md").read_text() and "| 20 |" in stdout
    rc, _, err = run_main(capsys, "eval", "--run", out, "--split", "val", "--quiet")
    assert rc == 0, err
    rc, stdout, err = run_main(capsys, "report", "--runs", tmp_path / "runs", "--out", tmp_path / "val",
                               "--split", "val")
    assert rc == 0, err
    val = json.loads((out / "eval-val" / "summary.json").read_text())
    table = json.loads((tmp_path / "val.json").read_text())
    assert table["split"] == "val" and table["results"][0]["per_run"][0]["dsc"] == val["mean"]["dsc"]["mean"]
    assert "The val split" in stdout and "paper" not in stdout


def test_validation_curve_of_a_log(tmp_path):
    dice = [0.1 * k for k in range(12)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps({"val_dice": d, "val_dice_running": 0.5}) + "\n"
                                                for d in dice))
    assert data.validation_curve(tmp_path) == pytest.approx(dict(best=1.1, spread=0.9, last10=0.65))


def test_supervised_ablation_runs_without_pretraining(phantom, tmp_path, capsys):
    rc, _, err = run_main(capsys, "finetune", "--data", phantom, "--out", tmp_path / "sup", "--pretrained", "none",
                          "--unlabeled-weight", "0", "--same-decoders", "--epochs", "1",
                          "--steps-per-epoch", "2", *TINY)
    assert rc == 0, err
    log = json.loads((tmp_path / "sup" / "log.jsonl").read_text())
    assert log["unsup"] == 0.0


def test_bench_cli_prints_ratios(capsys):
    rc, stdout, err = run_main(capsys, "bench", "--steps", "1", *TINY[:2], *TINY[4:-1])
    assert rc == 0, err
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["pretrain"]["ratio"] > 0 and result["finetune"]["ratio"] > 0


def test_bench_alternates_the_training_step_and_the_bare_model():
    """Warm-up twice each, then 10 rounds of steps // 10 calls of one and of the other, in turn."""
    calls = []
    full, bare, ratio = ideal.images_per_second(lambda: calls.append("f"), lambda: calls.append("b"), 8,
                                                torch.device("cpu"), 20)
    assert "".join(calls) == "fbfb" + "ffbb" * 10
    assert full > 0 and bare > 0 and ratio > 0


def run_sh(tmp_path, **env):
    """run.sh on a copy of the project in tmp_path (its results/ and README stay untouched), supervised rows of
    the tiny model; returns (returncode, stdout, stderr)."""
    for name in ("run.sh", "ideal.py", "data.py", "metrics.py"):
        shutil.copy(HERE / name, tmp_path / name)
    flags = " ".join(TINY + ["--epochs", "1", "--steps-per-epoch", "2"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PRESET": "demo", "ROWS": "supervised", "FRACTIONS": "20",
           "BENCH": "0", "FINETUNE_FLAGS": flags, **env}
    env = {k: v for k, v in env.items() if v is not None}              # None: leave the variable unset
    p = subprocess.run(["bash", str(tmp_path / "run.sh")], capture_output=True, text=True, env=env, timeout=600)
    return p.returncode, p.stdout, p.stderr


def test_run_sh_jobs_side_by_side_share_the_cores_and_give_the_sequential_numbers(phantom, tmp_path):
    """JOBS=2: each fine-tuning gets cores / 2 threads unless OMP_NUM_THREADS says otherwise, logs to its own file, and
    the numbers are those of the same runs one after the other (with as many threads each)."""
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    loud = " ".join([f for f in TINY if f != "--quiet"] + ["--epochs", "1", "--steps-per-epoch", "2"])
    rc, _, err = run_sh(tmp_path, DATA=str(phantom), SEEDS="2", JOBS="2", OUT=str(tmp_path / "par"),
                        OMP_NUM_THREADS=None, FINETUNE_FLAGS=loud)
    assert rc == 0, err
    rc, _, err = run_sh(tmp_path, DATA=str(phantom), SEEDS="2", OUT=str(tmp_path / "seq"), OMP_NUM_THREADS=str(share))
    assert rc == 0, err
    for seed in ("seed0", "seed1"):
        par, seq = (tmp_path / kind / "supervised" / "L20" / seed for kind in ("par", "seq"))
        assert f"on cpu ({share} threads)" in (par.parent / f"{seed}.log").read_text()
        assert not (seq.parent / f"{seed}.log").exists()
        curves = [[{k: v for k, v in json.loads(line).items() if k != "images_per_s"}
                   for line in (run / "log.jsonl").read_text().splitlines()] for run in (par, seq)]
        assert curves[0] == curves[1]
        scores = [json.loads((run / "eval-test" / "summary.json").read_text())["mean"] for run in (par, seq)]
        assert scores[0] == scores[1]
    table = json.loads((tmp_path / "par" / "tables" / "acdc-demo.json").read_text())
    assert [len(row["per_run"]) for row in table["results"]] == [2]
    wall = (tmp_path / "par" / "tables" / "acdc-demo.md").read_text().splitlines()[-1]
    assert wall.endswith(f"(2 fine-tunings side by side, {share} thread(s) each)")
    assert not (tmp_path / "results").exists()                     # without PUBLISH=1 nothing outside runs/


def test_run_sh_stops_when_a_job_fails(phantom, tmp_path):
    rc, _, err = run_sh(tmp_path, DATA=str(phantom / "nowhere"), SEEDS="2", JOBS="2", OUT=str(tmp_path / "runs"))
    assert rc == 1 and "run.sh: error: a fine-tuning failed" in err
    assert "nowhere" in (tmp_path / "runs" / "supervised" / "L20" / "seed0.log").read_text()
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("env, words", [(dict(JOBS="0"), ["JOBS", "'0'"]), (dict(JOBS="two"), ["JOBS", "'two'"]),
                                        (dict(ROWS="best"), ["row", "'best'"]), (dict(DATASET="mnist"), ["DATASET"])])
def test_run_sh_bad_settings_exit_2(env, words, phantom, tmp_path):
    rc, _, err = run_sh(tmp_path, DATA=str(phantom), OUT=str(tmp_path / "runs"), **env)
    assert_one_error_line((rc, "", err), *words)
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit 2, nothing overwritten
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, words", [
    (["pretrain", "--out", "x", "--preset", "huge"], ["--preset", "huge"]),
    (["pretrain", "--out", "x", "--loss", "mixed"], ["--loss"]),
    (["pretrain", "--out", "x", "--batch-size", "0"], ["--batch-size", "> 0"]),
    (["pretrain", "--out", "x", "--size", "-64"], ["--size"]),
    (["pretrain", "--out", "x", "--size", "100"], ["--size", "multiple of 32"]),
    (["finetune", "--out", "x"], ["--pretrained"]),
    (["finetune", "--out", "x", "--pretrained", "none", "--labeled", "150"], ["--labeled"]),
    (["finetune", "--out", "x", "--pretrained", "none", "--ema", "0.9"], ["unrecognized", "--ema"]),
    (["finetune", "--out", "x", "--pretrained", "none", "--label-map", " "], ["--label-map", "empty"]),
    (["bench", "--spacing", "2"], ["unrecognized", "--spacing"]),
    (["finetune", "--out", "x", "--resume"], ["--pretrained", "x holds no checkpoint"]),
    (["finetune", "--out", "x", "--pretrained", "none", "--split-file", "s.json", "--labeled", "5"],
     ["--labeled", "--split"]),
    (["pretrain", "--out", "x", "--device", "foo"], ["--device", "foo"]),
    (["pretrain", "--out", "x", "--device", "cuda:7"], ["--device", "cuda:7"]),
    (["pretrain", "--out", "x", "--device", "cpu:-1"], ["--device"]),
    (["pretrain", "--out", "x", "--device", "meta"], ["--device", "meta"]),
    (["pretrain", "--out", "x", "--seed", "-1"], ["--seed"]),
    (["pretrain", "--out", "x", "--seed", str(2 ** 63)], ["--seed"]),
    (["pretrain", "--out", "x", "--width", "100000"], ["--width"]),
    (["pretrain", "--out", ""], ["--out", "empty"]),
    (["eval", "--run", "x", "--lr", "0.1"], ["unrecognized", "--lr"]),
    (["eval", "--run", "x", "--preset", "cpu"], ["unrecognized", "--preset"]),
])
def test_bad_options(args, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_one_error_line(run_main(capsys, *args), *words)
    assert not (tmp_path / "x").exists()


def test_missing_data_folder_writes_nothing(tmp_path, capsys):
    assert_one_error_line(run_main(capsys, "pretrain", "--data", tmp_path / "nowhere", "--out", tmp_path / "run",
                                   *TINY), "nowhere")
    assert not (tmp_path / "run").exists()


def test_existing_run_is_not_overwritten(phantom, pretrained, capsys):
    before = (pretrained / "last.pt").read_bytes()
    assert_one_error_line(run_main(capsys, "pretrain", "--data", phantom, "--out", pretrained, "--epochs", "1", *TINY),
                          "--resume")
    assert (pretrained / "last.pt").read_bytes() == before


@pytest.mark.parametrize("kind", ["garbage", "pickled_code", "other_arch"])
def test_bad_pretrained_checkpoints(kind, phantom, pretrained, tmp_path, capsys):
    path = tmp_path / "encoder.pt"
    if kind == "garbage":
        path.write_bytes(b"this is not a checkpoint")
    elif kind == "pickled_code":
        torch.save({"encoder": {}, "config": {}, "hook": torch.nn.ReLU()}, path)
    else:
        path.write_bytes((pretrained / "encoder.pt").read_bytes())
    extra = ["--width", "16"] if kind == "other_arch" else []
    rc, _, err = run_main(capsys, "finetune", "--data", phantom, "--out", tmp_path / "run", "--pretrained", path,
                          *TINY, *extra)
    assert_one_error_line((rc, "", err), str(path))
    assert not (tmp_path / "run").exists()
    if kind == "other_arch":
        assert "width=8 (this run: 16)" in err


def test_non_finite_loss_stops_and_the_same_command_starts_again(phantom, tmp_path, capsys):
    """A run that dies before its first checkpoint holds nothing to lose: the same command starts it again."""
    out = tmp_path / "nan"
    args = ["pretrain", "--data", phantom, "--out", out, "--epochs", "1", *TINY]
    rc, _, err = run_main(capsys, *args, "--lr", "1e30", "--tau", "1e-30")
    assert rc == 1 and "non-finite loss in epoch 1" in err and "Traceback" not in err, err
    assert "no checkpoint was written" in err and not (out / "last.pt").exists()
    for extra in ([], ["--resume"]):
        rc, _, err = run_main(capsys, *args, *extra)
        assert rc == 0 and (out / "done.json").is_file(), err
        (out / "done.json").unlink(), (out / "last.pt").unlink()


def test_every_default_is_written_once_and_the_baselines_pin_labeled_ce():
    """argparse shows DEFAULTS and PRESETS; run.sh's rows pin only what differs from them (the baselines: CE alone and
    no unlabeled term); the README quotes the defaults block verbatim."""
    args = vars(ideal.build_parser().parse_args(["finetune", "--data", "d", "--out", "o"]))
    assert {k: args[k] for k in ideal.DEFAULTS if k in args and k != "labeled"} == {
        k: v for k, v in ideal.DEFAULTS.items() if k in args and k != "labeled"}
    pattern = r"^    ([a-z|\- ]+)\) enc=\w*; init=\((.*?)\) ;;"
    rows = dict(re.findall(pattern, (HERE / "run.sh").read_text(), re.M | re.S))
    assert "--sup-loss ce" in rows["supervised"] and "--sup-loss ce" in rows["pretrained-supervised"]
    for row, flags in rows.items():
        pinned = dict(re.findall(r"--([a-z-]+) (\S+)", flags))
        assert all(str(ideal.DEFAULTS.get(k.replace("-", "_"))) != v for k, v in pinned.items()), row
    source = (HERE / "ideal.py").read_text()
    block = source[source.index("PRESETS = {"):source.index("ARCH_KEYS = ")]
    assert block in (HERE / "README.md").read_text()


@pytest.mark.parametrize("command", ["pretrain", "finetune", "eval", "predict", "report", "bench"])
def test_help_shows_real_defaults_and_each_commands_own_presets(command, capsys):
    with pytest.raises(SystemExit):
        ideal.build_parser().parse_args([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: False)" not in text
    lr = {"pretrain": "cpu 0.001", "finetune": "cpu 0.003"}
    if command in lr:
        assert lr[command] in text and lr["finetune" if command == "pretrain" else "pretrain"] not in text


# ----------------------------------------------------------------------------------------------------------
# Runs and checkpoints: interruptions, copies, concurrent processes, bad options (issue 12)
# ----------------------------------------------------------------------------------------------------------
class Killed(BaseException):
    """Stands in for SIGKILL at a chosen moment: raised from inside a checkpoint save."""


def kill_at_save(monkeypatch, n):
    """Make the n-th atomic_save of this process raise Killed before it writes anything."""
    real, calls = ideal.atomic_save, []

    def save(obj, path):
        calls.append(path)
        if len(calls) == n:
            raise Killed(path)
        real(obj, path)
    monkeypatch.setattr(ideal, "atomic_save", save)


def killed_run(monkeypatch, args, out, n):
    """Run the command line args into the folder out, killed at its n-th checkpoint save (kill_at_save)."""
    kill_at_save(monkeypatch, n)
    with pytest.raises(Killed):
        ideal.main([*args, "--out", str(out)])
    monkeypatch.undo()


def log_epochs(run):
    return [json.loads(line)["epoch"] for line in (run / "log.jsonl").read_text().splitlines()]


def test_a_kill_at_any_save_resumes_to_a_complete_current_run(phantom, tmp_path, monkeypatch, capsys):
    """Killed before each of the 4 saves of a 2-epoch pre-training (encoder.pt, then last.pt, per epoch), then the
    same command with --resume: done.json with a current encoder.pt, one log line per epoch, the same weights."""
    args = ["pretrain", "--data", str(phantom), "--epochs", "2", *TINY]
    assert ideal.main([*args, "--out", str(tmp_path / "whole")]) == 0
    want = weights(tmp_path / "whole" / "last.pt")
    for n in range(1, 5):
        out = tmp_path / f"killed{n}"
        killed_run(monkeypatch, args, out, n)
        assert ideal.main([*args, "--out", str(out), "--resume"]) == 0
        got, encoder = weights(out / "last.pt"), torch.load(out / "encoder.pt", weights_only=True)["encoder"]
        assert all(torch.equal(want[k], got[k]) for k in want), n
        assert all(torch.equal(encoder[k], got[f"encoder.{k}"]) for k in encoder), n
        assert log_epochs(out) == [1, 2] and (out / "done.json").is_file(), n


def test_resume_writes_only_into_the_folder_given(pretrained, tmp_path):
    """A copied (or moved) run resumes in its new folder; the original is not touched."""
    before = {p.name: p.read_bytes() for p in pretrained.iterdir() if p.is_file()}
    copy = tmp_path / "copy"
    shutil.copytree(pretrained, copy)
    assert ideal.main(["pretrain", "--out", str(copy), "--resume", "--epochs", "3", *TINY]) == 0
    assert {p.name: p.read_bytes() for p in pretrained.iterdir() if p.is_file()} == before
    assert log_epochs(copy) == [1, 2, 3] and json.loads((copy / "done.json").read_text())["epochs"] == 3


@pytest.mark.parametrize("extra, words", [(["--epochs", "1"], ["--epochs 1", "the run's 2"]),
                                          (["--lr", "0.5"], ["--lr 0.5", "stored options"])])
def test_resume_refuses_fewer_epochs_and_changed_options(pretrained, tmp_path, capsys, extra, words):
    copy = tmp_path / "copy"
    shutil.copytree(pretrained, copy)
    before = {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()}
    assert_one_error_line(run_main(capsys, "pretrain", "--out", copy, "--resume", *TINY, *extra), *words)
    assert {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()} == before


def test_a_run_made_before_the_retired_options_names_the_commit_that_resumes_it(
        phantom, pretrained, tmp_path, monkeypatch, capsys):
    """A fine-tuning whose stored options include one retired since (or lack one added since) is refused in one line
    naming the commit that can still resume it; nothing in its folder changes."""
    out = tmp_path / "old"
    args = ["finetune", "--data", str(phantom), "--pretrained", str(pretrained / "encoder.pt"), "--labeled", "20",
            "--epochs", "2", "--steps-per-epoch", "2", *TINY]
    killed_run(monkeypatch, args, out, 3)                          # epoch 1 wrote best.pt and last.pt
    ckpt = torch.load(out / "last.pt", weights_only=True)
    ckpt["config"].update(align="none", ema=0.0)
    torch.save(ckpt, out / "last.pt")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert_one_error_line(run_main(capsys, *args, "--out", out, "--resume"), "align", "ema", ideal.OLD_FORMAT)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_resume_reads_a_moved_dataset_and_keeps_the_number_of_processes(phantom, tmp_path, capsys):
    """--data may change on resume (a moved dataset) and the new folder is read; config.json records the number of
    processes, and another number is refused in one line, nothing changed."""
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "run"
    shutil.copytree(phantom, a)
    assert run_main(capsys, "pretrain", "--data", a, "--out", out, "--epochs", "1", *TINY)[0] == 0
    assert json.loads((out / "config.json").read_text())["world_size"] == 1
    a.rename(b)
    assert run_main(capsys, "pretrain", "--data", b, "--out", out, "--resume", "--epochs", "2", *TINY)[0] == 0
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["config"]["data"] == str(b) and log_epochs(out) == [1, 2]
    ckpt["config"]["world_size"] = 2
    torch.save(ckpt, out / "last.pt")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert_one_error_line(run_main(capsys, "pretrain", "--out", out, "--resume", "--epochs", "3", *TINY),
                          "last.pt", "2 process(es)", "resumed by 1")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_an_extended_run_is_unfinished_until_the_extension_ends(pretrained, tmp_path, monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(pretrained, copy)
    kill_at_save(monkeypatch, 1)
    with pytest.raises(Killed):
        ideal.main(["pretrain", "--out", str(copy), "--resume", "--epochs", "3", *TINY])
    assert not (copy / "done.json").exists() and log_epochs(copy) == [1, 2]


def test_an_optimizer_state_that_does_not_fit_is_one_line(pretrained, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(pretrained, copy)
    ckpt = torch.load(copy / "last.pt", weights_only=True)
    ckpt["optimizer"]["param_groups"][0]["params"] = [0]
    torch.save(ckpt, copy / "last.pt")
    before = {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()}
    assert_one_error_line(run_main(capsys, "pretrain", "--out", copy, "--resume", "--epochs", "3", *TINY),
                          "last.pt", "optimizer")
    assert {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()} == before


def test_two_processes_writing_the_phantom_cache_both_go_on(tmp_path, monkeypatch):
    """Two runs without --data start at once: the one that loses the race to cache/phantom uses the other's copy
    (the same phantom) and leaves no temporary folder."""
    monkeypatch.setattr(ideal, "PHANTOM_DIR", str(tmp_path / "cache" / "phantom"))
    real = data.write_phantom

    def raced(out, n, seed):
        real(ideal.PHANTOM_DIR, n=1, seed=seed)                          # the other process finishes first
        real(out, n=1, seed=seed)
    monkeypatch.setattr(data, "write_phantom", raced)
    assert ideal.resolve_data({"data": None, "quiet": True}) == ideal.PHANTOM_DIR
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["phantom"]


def test_where_to_continue_from_without_a_run_folder():
    """bench has no --out: a non-finite loss there still ends in one line."""
    assert ideal.last_good({"quiet": True}) == "nothing was written"


def test_a_second_process_on_the_same_out_stops_at_once(phantom, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)                                  # the lock is on the folder itself
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        rc, _, err = run_cli("ideal.py", "pretrain", "--data", phantom, "--out", out, *TINY)
    finally:
        os.close(fd)
    assert_one_error_line((rc, "", err), str(out), "another process")
    assert not list(out.iterdir())


def test_non_finite_weights_are_never_saved(phantom, tmp_path, monkeypatch, capsys):
    """A finite loss with non-finite state (here a BatchNorm running mean) stops before anything is saved."""
    real = ideal.pretrain_step

    def poisoned(model, *args, **kwargs):
        values = real(model, *args, **kwargs)
        model.encoder.stem[1].running_mean.fill_(float("nan"))
        return values
    monkeypatch.setattr(ideal, "pretrain_step", poisoned)
    rc, _, err = run_main(capsys, "pretrain", "--data", phantom, "--out", tmp_path / "run", "--epochs", "1", *TINY)
    assert rc == 1 and "non-finite weights after epoch 1" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "run" / "encoder.pt").exists()


def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(phantom, tmp_path, monkeypatch, capsys):
    def full(obj, path):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "run"
    assert_one_error_line(run_main(capsys, "pretrain", "--data", phantom, "--out", out, "--epochs", "1", *TINY),
                          "encoder.pt", "No space left")
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_an_empty_validation_set_is_refused(tmp_path, capsys):
    root = tmp_path / "own"
    for i in range(3):
        nii(root / "imagesTr" / f"case{i}.nii.gz", noise((16, 16, 2), seed=i))
        nii(root / "labelsTr" / f"case{i}.nii.gz", labels((16, 16, 2)))
    out = tmp_path / "run"
    assert_one_error_line(run_main(capsys, "finetune", "--data", root, "--out", out, "--pretrained", "none", *TINY),
                          "validation volume")
    assert not out.exists()


@pytest.mark.parametrize("where", ["under_a_file", "a_file"])
def test_an_unusable_out_is_one_line_before_any_work(phantom, tmp_path, capsys, where):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "run" if where == "under_a_file" else tmp_path / "file"
    assert_one_error_line(run_main(capsys, "pretrain", "--data", phantom, "--out", out, *TINY), str(out))
    assert (tmp_path / "file").read_text() == "x"


def test_pretrain_resume_refuses_a_finetune_run(phantom, pretrained, tmp_path, capsys):
    out = tmp_path / "ft"
    assert run_main(capsys, "finetune", "--data", phantom, "--out", out, "--pretrained", pretrained / "encoder.pt",
                    "--labeled", "20", "--epochs", "1", "--steps-per-epoch", "1", *TINY)[0] == 0
    assert_one_error_line(run_main(capsys, "pretrain", "--out", out, "--resume", *TINY), "last.pt", "finetune")


@pytest.mark.parametrize("kind", ["config_list", "encoder_int", "raw_pickle"])
def test_malformed_pretrained_checkpoints(kind, phantom, tmp_path, capsys):
    path = tmp_path / "encoder.pt"
    if kind == "raw_pickle":
        path.write_bytes(pickle.dumps({"encoder": {}, "config": {}}))
    else:
        torch.save({"encoder": 3, "config": dict(depth=10, width=8, size=64, spacing=5.0)} if kind == "encoder_int"
                   else {"encoder": {}, "config": [1, 2]}, path)
    assert_one_error_line(run_main(capsys, "finetune", "--data", phantom, "--out", tmp_path / "run", "--pretrained",
                                   path, *TINY), str(path))


def test_a_deeply_nested_split_file_is_one_line(phantom, tmp_path, capsys):
    split = tmp_path / "split.json"
    split.write_text("[" * 100000 + "]" * 100000)
    assert_one_error_line(run_main(capsys, "finetune", "--data", phantom, "--out", tmp_path / "run", "--pretrained",
                                   "none",
                                   "--split-file", split, *TINY), str(split))


@pytest.mark.parametrize("damage", ["bad_summary", "Lfoo"])
def test_report_over_damaged_run_folders(tmp_path, capsys, damage):
    ev = tmp_path / "runs" / "ideal" / ("Lfoo" if damage == "Lfoo" else "L10") / "seed0" / "eval-test"
    ev.mkdir(parents=True)
    (ev / "summary.json").write_text('{"mean": 3}')
    rc, _, err = run_main(capsys, "report", "--runs", tmp_path / "runs", "--out", tmp_path / "table")
    assert_one_error_line((rc, "", err), "summary.json" if damage == "bad_summary" else "no <row>")


# ----------------------------------------------------------------------------------------------------------
# torchrun: two gloo processes on the CPU (issue 11)
# ----------------------------------------------------------------------------------------------------------
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_group(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    ideal.init_distributed(torch.device("cpu"))


def loss_worker(rank, world, port, tensors, negatives, out):
    """This rank's share of the global batch through Eq. 1 and Eq. 2; DDP averages gradients over ranks, so each
    rank's objective is its loss / world. Saves the losses and the gradients reaching its features."""
    join_group(rank, world, port)
    b = len(tensors[0]) // world
    q, k, dq, dk = (t[rank * b:(rank + 1) * b].clone().requires_grad_() for t in tensors[:4])
    lg, ll = ideal.global_infonce(q, k, 0.2), ideal.local_infonce(dq, dk, tensors[4][rank * b:(rank + 1) * b], 0.2,
                                                                  negatives)
    ((lg + ll) / world).backward()
    torch.save({"global": lg.item(), "local": ll.item(), "grads": [t.grad for t in (q, k, dq, dk)]},
               out / f"rank{rank}.pt")
    ideal.leave_distributed()


@pytest.mark.parametrize("negatives", ["same", "all"])
def test_gathered_losses_and_gradients_equal_one_process_on_the_global_batch(negatives, tmp_path):
    """Two ranks of B: the mean of their Eq. 1 and Eq. 2 losses equals the one-process loss on the concatenated 2B
    batch, and the gradients reaching each rank's features equal the one-process gradients of its share."""
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g),
               F.normalize(torch.randn(6, 4, 3, 3, generator=g), dim=1),
               F.normalize(torch.randn(6, 4, 3, 3, generator=g), dim=1), torch.rand(6, 3, 3, generator=g) > 0.3]
    torch.multiprocessing.spawn(loss_worker, (2, free_port(), tensors, negatives, tmp_path), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    full = [t.clone().requires_grad_() for t in tensors[:4]]
    lg, ll = ideal.global_infonce(full[0], full[1], 0.2), ideal.local_infonce(full[2], full[3], tensors[4], 0.2,
                                                                              negatives)
    (lg + ll).backward()
    assert np.mean([r["global"] for r in ranks]) == pytest.approx(lg.item(), abs=1e-5)
    assert np.mean([r["local"] for r in ranks]) == pytest.approx(ll.item(), abs=1e-5)
    for i, t in enumerate(full):
        assert torch.allclose(torch.cat([r["grads"][i] for r in ranks]), t.grad, atol=1e-5)


def train_worker(rank, world, port, argv, out):
    """ideal.py pretrain|finetune as one rank of a torchrun job; saves this rank's final parameters."""
    join_group(rank, world, port)
    parser = ideal.build_parser()
    args = parser.parse_args(argv)
    cfg = ideal.resolve(args, parser)
    with ideal.claimed(cfg["out"]):
        model = getattr(ideal, args.command)(cfg, ideal.given_options(argv))
    torch.save(dict(model.named_parameters()), out / f"{args.command}{rank}.pt")
    ideal.leave_distributed()


def test_two_rank_training_ends_with_identical_weights_on_both_ranks(phantom, tmp_path):
    common = ["--data", str(phantom), *TINY, "--device", "cpu"]
    pre = ["pretrain", "--out", str(tmp_path / "pre"), "--epochs", "1", *common]
    torch.multiprocessing.spawn(train_worker, (2, free_port(), pre, tmp_path), nprocs=2)
    ft = ["finetune", "--out", str(tmp_path / "ft"), "--pretrained", str(tmp_path / "pre" / "encoder.pt"),
          "--labeled", "20", "--epochs", "1", "--steps-per-epoch", "2", "--forward", "separate", "--pseudo", "weak",
          *common]
    torch.multiprocessing.spawn(train_worker, (2, free_port(), ft, tmp_path), nprocs=2)
    for command in ("pretrain", "finetune"):
        a, b = (torch.load(tmp_path / f"{command}{r}.pt") for r in range(2))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), command
    config = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert config["batch_size"] == 4 and json.loads((tmp_path / "ft" / "log.jsonl").read_text())["epoch"] == 1


def test_torchrun_killed_and_resumed_completes(phantom, tmp_path):
    """The README's command under torchrun: killed (the whole process group) once epoch 1 is logged, then resumed."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(HERE / "ideal.py"), "pretrain", "--data", str(phantom), "--out", str(out), "--epochs", "2",
               *TINY, "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(command, cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    log = out / "log.jsonl"
    while proc.poll() is None and not (log.is_file() and log.read_text().count("\n") >= 1):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = subprocess.run([*command, "--resume"], cwd=HERE, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert log_epochs(out) == [1, 2] and (out / "done.json").is_file()


# ==========================================================================================================
# Hardening of data.py and metrics.py (bad input found by an adversarial campaign) and the clinical indices
# ==========================================================================================================
PIXDIM1, DIM1 = 80, 42  # byte offsets in a NIfTI-1 header: pixdim[1] (float32), dim[1] (int16)


def one_error_line(result, *words):
    """Assert exit 2, no stdout, and exactly one stderr line holding every word; returns that line."""
    rc, out, err = result
    lines = err.splitlines()
    assert rc == 2 and out == "" and len(lines) == 1, err
    assert all(word in lines[0] for word in words), (words, lines[0])
    return lines[0]


def nii_affine(path, array, affine=None):
    """Write array as NIfTI (gzipped for .nii.gz) with affine (default: 1.5 x 1.5 x 8 mm voxels)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([1.5, 1.5, 8.0, 1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return path


def random_labels(shape=SHAPE, seed=0):
    return np.random.default_rng(seed).integers(0, 4, shape).astype(np.uint8)


def acdc_patient_info(root, ed="1", es="2", image=None):
    """An ACDC patient001 folder (labeled frames 01 and 02) with the given Info.cfg ED/ES text."""
    folder = root / "patient001"
    for number in (1, 2):
        nii_affine(folder / f"patient001_frame{number:02d}.nii.gz", noise() if image is None else image)
        nii_affine(folder / f"patient001_frame{number:02d}_gt.nii.gz", random_labels())
    (folder / "Info.cfg").write_text(f"ED: {ed}\nES: {es}\nGroup: NOR\n")
    return folder


def patch_header(path, fmt, offset, value):
    """Overwrite one header field in place (a valid gzip stream is rewritten for .nii.gz)."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    struct.pack_into(fmt, raw, offset, value)
    path.write_bytes(gzip.compress(bytes(raw)))
    return path


def lazy_read(blob, size):
    """The first size bytes of a gzip blob read as nibabel does (no CRC32/length check); None if that fails."""
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(blob)) as stream:
            return stream.read(size)
    except (OSError, EOFError, zlib.error):
        return None


def flip_silently(path):
    """Flip one byte of the compressed stream of a .nii.gz so that a lazy reader (nibabel) still gets every byte,
    but different ones; only the gzip CRC32 check can tell."""
    blob = path.read_bytes()
    original = gzip.decompress(blob)
    for pos in range(len(blob) // 2, len(blob) - 8):
        flipped = blob[:pos] + bytes([blob[pos] ^ 0x10]) + blob[pos + 1:]
        got = lazy_read(flipped, len(original))
        if got is not None and len(got) == len(original) and got != original:
            path.write_bytes(flipped)
            return path
    raise AssertionError(f"{path}: no silent flip found")


# ----------------------------------------------------------------------------------------------------------
# 1. synth never overwrites an existing dataset
# ----------------------------------------------------------------------------------------------------------
def test_synth_refuses_a_non_empty_folder(tmp_path):
    out = tmp_path / "dataset"
    marker = out / "patient001" / "Info.cfg"
    marker.parent.mkdir(parents=True)
    marker.write_text("ED: 1\nES: 9\n")
    before = sorted(tmp_path.rglob("*"))
    one_error_line(run_cli("data.py", "synth", "--out", out, "--n", 1), str(out), "not empty")
    with pytest.raises(DataError, match="not empty"):
        data.write_phantom(out, n=1)
    assert sorted(tmp_path.rglob("*")) == before and marker.read_text() == "ED: 1\nES: 9\n"


# ----------------------------------------------------------------------------------------------------------
# 2. gzip CRC32 and length are checked; uncompressed .nii still works
# ----------------------------------------------------------------------------------------------------------
def test_flipped_byte_in_gzip_is_an_error_in_data(tmp_path):
    path = flip_silently(nii_affine(tmp_path / "img.nii.gz", noise()))
    with pytest.raises(DataError, match="unreadable or truncated") as err:
        data._read_nifti(path, image=True)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_flipped_byte_in_gzip_is_an_error_in_metrics(tmp_path):
    gt = nii_affine(tmp_path / "gt.nii.gz", random_labels((16, 16, 4)))
    pred = flip_silently(nii_affine(tmp_path / "pred.nii.gz", random_labels((16, 16, 4))))
    one_error_line(run_cli("metrics.py", pred, gt), "metrics.py: error:", str(pred), "CRC")


def test_gzip_trailer_length_is_checked(tmp_path):
    path = nii_affine(tmp_path / "img.nii.gz", noise())
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0x01  # ISIZE, the stored uncompressed length; the voxels themselves are intact
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="unreadable or truncated"):
        data._read_nifti(path, image=True)


def test_uncompressed_nii_still_reads(tmp_path):
    nii_affine(tmp_path / "imagesTr" / "a.nii", noise())
    gt = nii_affine(tmp_path / "labelsTr" / "a.nii", random_labels())
    _, (vol,) = data.load_volumes(tmp_path)
    np.testing.assert_array_equal(vol.image, noise())
    np.testing.assert_array_equal(vol.label, random_labels())
    rc, out, err = run_cli("metrics.py", gt, gt)
    assert rc == 0 and err == "" and out.splitlines()[1].split()[1] == "1.0000"


# ----------------------------------------------------------------------------------------------------------
# 3. voxel sizes must be finite and positive as stored; nibabel prints nothing
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [math.nan, math.inf, 0.0, -2.0])
def test_bad_voxel_size_is_refused_by_data(tmp_path, value):
    folder = acdc_patient_info(tmp_path)
    path = patch_header(folder / "patient001_frame01.nii.gz", "<f", PIXDIM1, value)
    with pytest.raises(DataError, match="voxel sizes") as err:
        data.load_volumes(tmp_path)
    assert str(path) in str(err.value)
    if value in (0.0, -2.0):  # the ones nibabel would 'fix' and log
        line = one_error_line(run_cli("data.py", "info", tmp_path), str(path), "finite and positive")
        assert line.startswith("error: ")


@pytest.mark.parametrize("value", [math.inf, 0.0])
def test_bad_voxel_size_is_refused_by_metrics(tmp_path, value):
    pred = nii_affine(tmp_path / "pred.nii.gz", random_labels())
    gt = patch_header(nii_affine(tmp_path / "gt.nii.gz", random_labels()), "<f", PIXDIM1, value)
    one_error_line(run_cli("metrics.py", pred, gt), str(gt), "voxel sizes")


def test_nibabel_header_fixes_print_nothing(tmp_path):
    image = nii_affine(tmp_path / "imagesTr" / "a.nii.gz", noise((8, 8)))  # 2D: pixdim[3] is no voxel size of it
    label = nii_affine(tmp_path / "labelsTr" / "a.nii.gz", random_labels((8, 8)))
    for path in (image, label):
        patch_header(path, "<f", PIXDIM1 + 8, 0.0)  # nibabel logs "pixdim[1,2,3] should be non-zero"
    rc, out, err = run_cli("data.py", "info", tmp_path)
    assert rc == 0 and "shape:    8-8 x 8-8 x 1-1" in out and err == ""
    rc, out, err = run_cli("metrics.py", label, label)
    assert rc == 0 and err == ""


# ----------------------------------------------------------------------------------------------------------
# 4. a header that claims more voxels than the file holds
# ----------------------------------------------------------------------------------------------------------
def test_header_claiming_too_many_voxels_is_truncated(tmp_path):
    path = nii_affine(tmp_path / "img.nii.gz", noise())
    for axis in range(3):
        patch_header(path, "<h", DIM1 + 2 * axis, 32767)
    with pytest.raises(DataError, match="truncated") as err:
        data._read_nifti(path, image=True)
    assert str(path) in str(err.value)
    one_error_line(run_cli("metrics.py", path, path), str(path), "truncated")


# ----------------------------------------------------------------------------------------------------------
# 5. metrics.py refuses a prediction on another voxel grid
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, affine", [
    ("shifted 50 mm", np.array([[1.5, 0, 0, 50], [0, 1.5, 0, 0], [0, 0, 8, 0], [0, 0, 0, 1.0]])),
    ("mirrored", np.diag([-1.5, 1.5, 8.0, 1.0])),
    ("swapped axes", np.array([[0, 1.5, 0, 0], [1.5, 0, 0, 0], [0, 0, 8, 0], [0, 0, 0, 1.0]])),
])
def test_metrics_refuses_another_affine(tmp_path, name, affine):
    gt = nii_affine(tmp_path / "gt.nii.gz", random_labels())
    pred = nii_affine(tmp_path / "pred.nii.gz", random_labels(), affine)
    one_error_line(run_cli("metrics.py", pred, gt), str(pred), "origin or axis directions")


def test_metrics_geometry_check_tolerance_and_shape():
    lab = random_labels()
    base = np.diag([1.5, 1.5, 8.0, 1.0])
    nudged = base.copy()
    nudged[0, 3] = 1e-5
    metrics._check_geometry((lab, (1.5, 1.5, 8.0), nudged), (lab, (1.5, 1.5, 8.0), base), ("p", "g"))
    coarse = np.diag([3.0, 1.5, 8.0, 1.0])  # other voxel size only: the CLI warns and uses the ground truth's
    metrics._check_geometry((lab, (3.0, 1.5, 8.0), coarse), (lab, (1.5, 1.5, 8.0), base), ("p", "g"))
    with pytest.raises(ValueError, match="p: shape"):
        metrics._check_geometry((lab[:4], (1.5,) * 3, base), (lab, (1.5,) * 3, base), ("p", "g"))
    nan = base.copy()
    nan[0, 3] = math.nan
    with pytest.raises(ValueError, match="origin"):
        metrics._check_geometry((lab, (1.5,) * 3, nan), (lab, (1.5,) * 3, base), ("p", "g"))


# ----------------------------------------------------------------------------------------------------------
# 6. malformed values
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ed", ["inf", "1.5", "-1", "abc", "0", ""])
def test_bad_info_cfg_frame_number(tmp_path, ed):
    folder = acdc_patient_info(tmp_path, ed=ed)
    with pytest.raises(DataError, match="not a valid frame number") as err:
        data.load_volumes(tmp_path)
    assert str(folder / "Info.cfg") in str(err.value)
    if ed == "inf":
        one_error_line(run_cli("data.py", "info", tmp_path), str(folder / "Info.cfg"), "'ED: inf'")


def test_bad_numbers_on_the_command_lines(tmp_path):
    one_error_line(run_cli("data.py", "info", tmp_path, "--seed", "-1"), "data.py info: error:", "--seed", "-1")
    one_error_line(run_cli("data.py", "synth", "--out", tmp_path / "x", "--n", "0"), "data.py synth: error:", "--n")
    one_error_line(run_cli("metrics.py", "a", "b", "--labels", "99999999999999999999999"),
                   "metrics.py: error:", "--labels")
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------------------------
# 7. one line on stderr for bad options and for the NaN-voxel warning
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script, args, prog", [
    ("data.py", ["info", ".", "--bogus"], "data.py"),
    ("data.py", [], "data.py"),
    ("data.py", ["synth"], "data.py synth"),
    ("data.py", ["info", ".", "--layout", "nope"], "data.py info"),
    ("metrics.py", ["--labels", "x"], "metrics.py"),
    ("metrics.py", [], "metrics.py"),
])
def test_bad_option_is_one_line(script, args, prog):
    one_error_line(run_cli(script, *args), f"{prog}: error: ")


def test_nan_voxel_warning_is_one_line_in_default_format(tmp_path):
    image = noise()
    image[0, 0, 0] = math.nan
    path = acdc_patient_info(tmp_path, image=image) / "patient001_frame01.nii.gz"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        data.load_volumes(tmp_path)
    (w,) = record
    text = warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line)
    assert text.count("\n") == 1 and "DataWarning" in text and str(path) in text


# ----------------------------------------------------------------------------------------------------------
# B. clinical indices
# ----------------------------------------------------------------------------------------------------------
def test_volume_ml_of_a_box():
    mask = np.zeros((10, 10, 10), bool)
    mask[2:5, 1:5, 3:8] = True  # 3 x 4 x 5 = 60 voxels of 1.5 x 1.25 x 8 mm = 15 mm^3
    assert metrics.volume_ml(mask, (1.5, 1.25, 8.0)) == 0.9
    assert metrics.volume_ml(np.zeros((2, 2), bool), (1.0, 1.0)) == 0.0
    with pytest.raises(ValueError, match="positive"):
        metrics.volume_ml(mask, (1.5, 0.0, 8.0))


def test_ejection_fraction():
    assert metrics.ejection_fraction(150.0, 60.0) == 60.0
    assert math.isnan(metrics.ejection_fraction(0.0, 0.0))
    assert math.isnan(metrics.ejection_fraction(math.nan, 10.0))
    np.testing.assert_array_equal(metrics.ejection_fraction([100.0, 0.0], [25.0, 5.0]), [75.0, math.nan])


def test_agreement_by_hand():
    pred = [10.0, 20.0, 30.0, 7.0, math.nan]
    gt = [12.0, 18.0, 33.0, math.nan, 5.0]
    got = metrics.agreement(pred, gt)
    # used pairs: differences -2, 2, -3 -> bias -1; deviations -1, 3, -2 -> sd = sqrt(14 / 2)
    # r: dp = -10, 0, 10; dg = -9, -3, 12 -> 210 / sqrt(200 * 234)
    sd = math.sqrt(7.0)
    assert (got["n"], got["n_nan"]) == (3, 2)
    assert got["bias"] == pytest.approx(-1.0) and got["sd"] == pytest.approx(sd)
    assert got["loa_low"] == pytest.approx(-1 - 1.96 * sd) and got["loa_high"] == pytest.approx(-1 + 1.96 * sd)
    assert got["r"] == pytest.approx(210 / math.sqrt(200 * 234))


def test_agreement_undefined_cases():
    one = metrics.agreement([5.0, math.nan], [4.0, 1.0])
    assert (one["n"], one["n_nan"], one["bias"]) == (1, 1, 1.0)
    assert all(math.isnan(one[k]) for k in ("r", "sd", "loa_low", "loa_high"))
    flat = metrics.agreement([3.0, 3.0, 3.0], [1.0, 2.0, 4.0])
    assert math.isnan(flat["r"]) and flat["n"] == 3
    none = metrics.agreement([math.nan], [math.nan])
    assert none["n"] == 0 and none["n_nan"] == 1 and math.isnan(none["bias"])
    with pytest.raises(ValueError, match="one length"):
        metrics.agreement([1.0, 2.0], [1.0])


# ----------------------------------------------------------------------------------------------------------
# Second red-team pass: data.py and metrics.py (RGB voxels, absurd voxel sizes, huge integers, empty label map,
# a killed synth) and the beating phantom cine
# ----------------------------------------------------------------------------------------------------------
PIXDIM1 = 80  # byte offset of pixdim[1] (float32) in a NIfTI-1 header
RGB = [("R", "u1"), ("G", "u1"), ("B", "u1")]


def own_dataset(root, image=None):
    """An own-layout dataset of one labeled volume; returns the image path."""
    path = nii(root / "imagesTr" / "a.nii.gz", noise() if image is None else image)
    nii(root / "labelsTr" / "a.nii.gz", np.random.default_rng(0).integers(0, 4, SHAPE).astype(np.uint8))
    return path


def patch_pixdim1(path, value):
    raw = bytearray(gzip.decompress(path.read_bytes()))
    struct.pack_into("<f", raw, PIXDIM1, value)
    path.write_bytes(gzip.compress(bytes(raw)))
    return path


# 1. RGB voxels ------------------------------------------------------------------------------------------
def test_rgb_nifti_is_one_line_everywhere(tmp_path):
    path = own_dataset(tmp_path, np.zeros((8, 8, 3), RGB))
    for read in (lambda: data.read_scan(path), lambda: data.load_volumes(tmp_path)):
        with pytest.raises(DataError, match="RGB") as err:
            read()
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert_one_error_line(run_cli("data.py", "info", tmp_path), str(path), "RGB", "not supported")
    assert_one_error_line(run_cli("metrics.py", path, path), str(path), "integer labels")


# 2. absurd voxel sizes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [1e30, 1e-30])
def test_absurd_voxel_size_is_refused_by_data(tmp_path, value):
    path = patch_pixdim1(own_dataset(tmp_path), value)
    for read in (lambda: data.read_scan(path), lambda: data.load_volumes(tmp_path)):
        with pytest.raises(DataError, match="plausible range") as err:
            read()
        assert str(path) in str(err.value) and f"{np.float32(value):g}" in str(err.value)
    assert_one_error_line(run_cli("data.py", "info", tmp_path), str(path), "plausible range")


@pytest.mark.parametrize("value", [1e30, 1e-30])
def test_absurd_voxel_size_is_refused_by_metrics(tmp_path, value):
    gt = patch_pixdim1(nii(tmp_path / "gt.nii.gz", np.ones((8, 8, 3), np.uint8)), value)
    assert_one_error_line(run_cli("metrics.py", gt, gt), str(gt), "plausible range")
    a = np.ones((4, 4), bool)
    for call in (lambda: metrics.hd(a, a, (value, 1.0)), lambda: metrics.volume_ml(a, (1.0, value)),
                 lambda: metrics.evaluate(a.astype(np.uint8), a.astype(np.uint8), (value, 1.0))):
        with pytest.raises(ValueError, match="plausible range"):
            call()
    assert metrics.volume_ml(a, (1e-4, 1e4)) == pytest.approx(16e-3)  # the bounds themselves are accepted


# 3. huge integers in a split file ---------------------------------------------------------------------
def test_split_file_with_a_huge_integer_is_one_line(tmp_path):
    path = tmp_path / "split.json"
    path.write_text('{"seed": ' + "1" * 4400 + "}")
    with pytest.raises(DataError, match="unreadable split file") as err:
        data.load_split(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


# 4. empty label map -----------------------------------------------------------------------------------
def test_empty_label_map_is_refused(tmp_path):
    for text in ("", "  "):
        with pytest.raises(DataError, match="--label-map must not be empty"):
            data.parse_label_map(text)
    assert data.parse_label_map(None) is None
    own_dataset(tmp_path)
    assert_one_error_line(run_cli("data.py", "info", tmp_path, "--label-map", ""), "--label-map must not be empty")


# 5. synth is atomic -----------------------------------------------------------------------------------
@pytest.mark.parametrize("existing", [False, True])
def test_synth_failing_midway_leaves_nothing_and_reruns(tmp_path, monkeypatch, existing):
    out = tmp_path / "phantom"
    if existing:
        out.mkdir()
    real, calls = data._write_patient, []

    def flaky(folder, rng, group):
        calls.append(folder)
        if len(calls) == 2:
            raise OSError("No space left on device")
        real(folder, rng, group)

    monkeypatch.setattr(data, "_write_patient", flaky)
    with pytest.raises(OSError, match="No space"):
        data.write_phantom(out, n=3)
    assert calls[0].parent != out and calls[0].parent.name.startswith(".")  # written aside, not into out
    assert [p.name for p in tmp_path.iterdir()] == (["phantom"] if existing else [])
    assert not existing or not any(out.iterdir())
    monkeypatch.setattr(data, "_write_patient", real)
    (tmp_path / ".phantom.tmp4000000").mkdir()                       # a killed write's, of a process long gone
    data.write_phantom(out, n=1)
    assert [p.name for p in tmp_path.iterdir()] == ["phantom"]
    _, volumes = data.load_volumes(out)
    assert [v.id for v in volumes] == ["patient001"]


# 6. beating phantom cine ------------------------------------------------------------------------------
def test_write_cine_beats_and_reports_its_true_volumes(tmp_path):
    path = tmp_path / "cine" / "heart.nii.gz"
    truth = data.write_cine(path, frames=6, seed=3)
    frames, img = data.read_scan(path)
    assert len(frames) == 6 and img.shape[3] == 6 and [v.id for v in frames][:2] == ["heart_t0", "heart_t1"]
    gt = nib.load(str(tmp_path / "cine" / "heart_gt.nii.gz"))
    labels = np.asarray(gt.dataobj)
    assert labels.shape == img.shape and labels.dtype == np.uint8 and np.array_equal(gt.affine, img.affine)
    voxel = math.prod(frames[0].spacing)  # mm^3, as a reader of the file sees it
    for c, key in ((3, "lv_ml"), (1, "rv_ml"), (2, "myo_ml")):
        assert truth[key] == [int(np.count_nonzero(labels[..., t] == c)) * voxel / 1000 for t in range(6)]
        assert all(type(v) is float for v in truth[key])
    lv = truth["lv_ml"]
    assert (truth["ed"], truth["es"]) == (0, 3) and lv[0] > lv[1] > lv[2] > lv[3] and lv[1:3] == lv[5:3:-1]
    assert 30 < 100 * (lv[0] - lv[3]) / lv[0] < 80 and 20 < lv[3] and min(truth["myo_ml"]) > 20
    with pytest.raises(DataError, match="frames >= 2"):
        data.write_cine(tmp_path / "x.nii.gz", frames=1)


# ==========================================================================================================
# Using a trained model: predict, eval on other data, clinical indices
# ==========================================================================================================
@pytest.fixture(scope="module")
def tuned(phantom, tmp_path_factory):
    """One tiny fine-tuned run (supervised, 1 epoch of 2 steps) on the phantom: enough to segment with."""
    out = tmp_path_factory.mktemp("tuned") / "run"
    assert ideal.main(["finetune", "--data", str(phantom), "--out", str(out), "--pretrained", "none", "--labeled", "20",
                       "--unlabeled-weight", "0", "--epochs", "1", "--steps-per-epoch", "2", *TINY]) == 0
    return out


@pytest.fixture(scope="module")
def tuned_both(tuned):
    """tuned's evaluation on the ED and ES frames of its test patients (RUN/eval-test-both)."""
    assert ideal.main(["eval", "--run", str(tuned), "--frames", "both", "--quiet"]) == 0
    return tuned / "eval-test-both"


def csv_rows(path):
    """The rows of a CSV file as dicts of strings."""
    import csv
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def run_main(capsys, *args):
    """ideal.main in this process (no interpreter start-up): (returncode, stdout, stderr); an option error's exit
    is its return code."""
    try:
        rc = ideal.main([str(a) for a in args])
    except SystemExit as e:
        rc = e.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def scans(root):
    """A folder mixing .nii and .nii.gz: int16 37x41x3 with a rotated, offset affine (qform code 1, sform code 2),
    a float32 4D cine 30x26x3x4 in a subfolder, and that cine's frame 2 as a 3D file."""
    rng = np.random.default_rng(5)
    rotated = np.array([[0.0, -1.3, 0.0, 20.5], [1.1, 0.0, 0.0, -7.25], [0.0, 0.0, 6.5, 33.0], [0, 0, 0, 1]])
    odd = nib.Nifti1Image(rng.normal(300, 80, (37, 41, 3)).astype(np.int16), None)
    odd.header.set_qform(rotated, code=1)
    odd.header.set_sform(rotated, code=2)
    nib.save(odd, str(root / "odd.nii"))
    cine = rng.normal(0, 1, (30, 26, 3, 4)).astype(np.float32)
    nii_affine(root / "sub" / "cine.nii.gz", cine, np.diag([1.8, 1.6, 8.0, 1.0]))
    nii_affine(root / "frame2.nii.gz", cine[..., 2], np.diag([1.8, 1.6, 8.0, 1.0]))
    return {name: nib.load(root / path) for name, path in
            (("odd", "odd.nii"), ("cine", "sub/cine.nii.gz"), ("frame2", "frame2.nii.gz"))}


def test_predict_keeps_shape_affine_and_header_and_skips_finished_outputs(tuned, tmp_path, capsys):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    inputs, out = scans(tmp_path / "in"), tmp_path / "pred"
    rc, _, err = run_main(capsys, "predict", "--run", tuned, "--input", tmp_path / "in", "--out", out,
                          "--probabilities", "--save-png")
    assert rc == 0, err
    assert all(f"{name} " in err and "network" in err for name in inputs), err     # a progress line per volume
    for name, img in inputs.items():
        labels, probs = nib.load(out / f"{name}.nii.gz"), nib.load(out / f"{name}_prob.nii.gz")
        assert labels.shape == img.shape and labels.get_data_dtype() == np.uint8
        np.testing.assert_allclose(labels.affine, img.affine)
        assert [int(labels.header[k]) for k in ("qform_code", "sform_code")] == \
            [int(img.header[k]) for k in ("qform_code", "sform_code")]
        assert probs.shape == (*img.shape, 4) and probs.get_data_dtype() == np.float32
        p = np.asarray(probs.dataobj)
        np.testing.assert_allclose(p.sum(-1), 1, atol=1e-5)
        np.testing.assert_array_equal(p.argmax(-1), np.asarray(labels.dataobj))
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [int(inputs["odd"].header[k]) for k in ("qform_code", "sform_code")] == [1, 2]
    cine, frame2 = (np.asarray(nib.load(out / f"{n}.nii.gz").dataobj) for n in ("cine", "frame2"))
    np.testing.assert_array_equal(cine[..., 2], frame2)                   # a 4D input: frame by frame
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    rc, _, err = run_main(capsys, "predict", "--run", tuned, "--input", tmp_path / "in", "--out", out,
                          "--probabilities", "--save-png")
    assert rc == 0 and "3 of 3 inputs already have their outputs" in err, err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_predict_bad_input_writes_nothing(tuned, tmp_path, capsys):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    scans(folder)
    cut = folder / "sub" / "cut.nii.gz"
    cut.write_bytes((folder / "frame2.nii.gz").read_bytes()[:200])
    out = tmp_path / "pred"
    one_error_line(run_main(capsys, "predict", "--run", tuned, "--input", folder, "--out", out, "--quiet"),
                   str(cut), "truncated")
    cut.unlink()
    nii_affine(folder / "sub" / "odd.nii.gz", noise())
    one_error_line(run_main(capsys, "predict", "--run", tuned, "--input", folder, "--out", out, "--quiet"),
                   "odd.nii", "odd.nii.gz", "distinct names")
    one_error_line(run_main(capsys, "predict", "--run", tmp_path, "--input", folder, "--out", out, "--quiet"),
                   str(tmp_path / "best.pt"))
    assert not out.exists()


def heart(shape, lv, rv, myo):
    """ACDC-class labels: LV (3), RV (1) and MYO (2) boxes of lv, rv, myo rows x 10 x 2 slices = 20 voxels a row."""
    lab = np.zeros(shape, np.uint8)
    lab[0:lv, :10, :2], lab[20:20 + rv, :10, :2], lab[30:30 + myo, :10, :2] = 3, 1, 2
    return lab


# (ED rows, ES rows) of LV, RV, MYO per patient; voxels 1.5 x 1.25 x 8 mm = 15 mm^3, so a row is 0.3 ml
UNSEEN = {"patient201": ((10, 4, 2), (3, 2, 3)), "patient202": ((8, 5, 4), (4, 0, 4))}


def test_eval_all_on_unseen_acdc_patients_gives_hand_computed_volumes_and_ef(tuned, tmp_path, capsys):
    root = tmp_path / "other"
    for pid, phases in UNSEEN.items():
        for number, rows in zip((1, 2), phases):
            nii(root / pid / f"{pid}_frame{number:02d}.nii.gz", noise((40, 40, 3), number), (1.5, 1.25, 8.0))
            nii(root / pid / f"{pid}_frame{number:02d}_gt.nii.gz", heart((40, 40, 3), *rows), (1.5, 1.25, 8.0))
        (root / pid / "Info.cfg").write_text("ED: 1\nES: 2\nGroup: NOR\n")
    rc, stdout, err = run_main(capsys, "eval", "--run", tuned, "--data", root, "--split", "all", "--frames", "both",
                               "--quiet")
    assert rc == 0, err
    ev = tuned / "eval-other-all-both"                             # --frames both is not the run's
    rows = {(r["id"], int(r["label"])): r for r in csv_rows(ev / "metrics.csv")}
    assert len(rows) == 4 * 3
    for pid, phases in UNSEEN.items():
        for phase, (lv, rv, myo) in zip(("ED", "ES"), phases):
            for c, n in ((3, lv), (1, rv), (2, myo)):
                assert float(rows[f"{pid}_{phase}", c]["volume_ml_gt"]) == pytest.approx(0.3 * n)
    clinical = {r["case"]: {k: float(v) for k, v in r.items() if k != "case"} for r in csv_rows(ev / "clinical.csv")}
    a, b = clinical["patient201"], clinical["patient202"]
    assert (a["lv_edv_gt"], a["lv_esv_gt"], a["lv_ef_gt"]) == pytest.approx((3.0, 0.9, 70.0))
    assert (a["rv_edv_gt"], a["rv_esv_gt"], a["rv_ef_gt"]) == pytest.approx((1.2, 0.6, 50.0))
    assert a["myo_mass_gt"] == pytest.approx(0.6 * 1.05) and b["myo_mass_gt"] == pytest.approx(1.2 * 1.05)
    assert b["lv_ef_gt"] == pytest.approx(50.0) and math.isnan(b["rv_esv_gt"]) and math.isnan(b["rv_ef_gt"])
    edv = float(rows["patient201_ED", 3]["volume_ml_pred"])
    assert a["lv_edv_pred"] == pytest.approx(edv)
    summary = json.loads((ev / "summary.json").read_text())
    assert summary["volumes"] == 4 and summary["clinical"]["rv_ef"]["n_nan"] == 1
    assert summary["clinical"]["lv_ef"] == pytest.approx(metrics.agreement(
        [a["lv_ef_pred"], b["lv_ef_pred"]], [70.0, 50.0]) | {"unit": "%"}, nan_ok=True)
    assert "myo_mass" in stdout and "limits of agreement" in stdout


def test_eval_all_on_own_layout_needs_the_label_map(tuned, tmp_path, capsys):
    root = tmp_path / "mine"
    for name in ("a", "b"):
        nii(root / "imagesTr" / f"{name}.nii.gz", noise((40, 40, 3)), (1.5, 1.25, 8.0))
        nii(root / "labelsTr" / f"{name}.nii.gz", heart((40, 40, 3), 5, 3, 2) * 10, (1.5, 1.25, 8.0))
    one_error_line(run_main(capsys, "eval", "--run", tuned, "--data", root, "--split", "all", "--layout", "own",
                            "--quiet"), str(root / "imagesTr" / "a.nii.gz"), "class 30", "--label-map")
    assert not (tuned / "eval-mine-all").exists()
    rc, _, err = run_main(capsys, "eval", "--run", tuned, "--data", root, "--split", "all", "--layout", "own",
                          "--label-map", "10:1,20:2,30:3", "--quiet")
    assert rc == 0, err
    rows = csv_rows(tuned / "eval-mine-all" / "metrics.csv")
    assert [(r["id"], r["label"]) for r in rows] == [(n, c) for n in "ab" for c in "123"]
    assert [float(r["volume_ml_gt"]) for r in rows[:3]] == pytest.approx([0.9, 0.6, 1.5])
    assert not (tuned / "eval-mine-all" / "clinical.csv").exists()


def test_eval_test_split_with_both_frames_scores_ed_and_es_of_the_test_patients(tuned, tuned_both):
    test = json.loads((tuned / "split.json").read_text())["test"]
    ids = {r["id"] for r in csv_rows(tuned / "eval-test-both" / "metrics.csv")}
    assert ids == {f"{p}_{phase}" for p in test for phase in ("ED", "ES")} and len(test) == 4
    assert [r["case"] for r in csv_rows(tuned / "eval-test-both" / "clinical.csv")] == test


def test_eval_prints_a_line_per_volume_and_an_unwritable_output_is_one_line(tuned, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tuned, run)
    rc, _, err = run_main(capsys, "eval", "--run", run)
    test = json.loads((run / "split.json").read_text())["test"]
    assert rc == 0 and [line.split()[:2] for line in err.splitlines() if line.startswith("eval ")] == \
        [["eval", f"{i}/{len(test)}"] for i in range(1, len(test) + 1)]
    assert run_main(capsys, "eval", "--run", run, "--quiet")[2] == ""
    for vid in test:                                                     # a folder where the prediction goes
        (run / "eval-test" / "pred" / f"{vid}.nii.gz").mkdir(parents=True)
    assert_one_error_line(run_main(capsys, "eval", "--run", run, "--save-pred", "--quiet"), ".nii.gz", "cannot write")
    assert not [p for p in (run / "eval-test" / "pred").iterdir() if ".tmp" in p.name]


def test_select_matches_patients_across_frame_settings():
    both = fake(["patient007_ED", "patient007_ES", "patient008_ED", "patient008_ES"])
    for v in both:
        v.frame = v.id[-2:]
    ed = fake(["patient007", "patient008"])
    for v in ed:
        v.frame = "ED"
    assert [v.id for v in data.select(both, ["patient007"], "s")] == ["patient007_ED", "patient007_ES"]
    assert [v.id for v in data.select(ed, ["patient008_ED", "patient008_ES"], "s")] == ["patient008"]
    with pytest.raises(DataError, match="s: ids not among the volumes: patient009"):
        data.select(ed, ["patient007", "patient009"], "s")


# ==========================================================================================================
# Second red-team pass: ideal.py
# ==========================================================================================================
def test_resume_never_shortens_a_killed_run(phantom, pretrained, tmp_path, monkeypatch, capsys):
    """Killed after its first epoch, a 3-epoch fine-tuning resumed with --epochs 2 is refused (the stored target,
    not the epochs done, is what may only grow); nothing in the folder changes."""
    args = ["finetune", "--data", str(phantom), "--pretrained", str(pretrained / "encoder.pt"), "--labeled", "20",
            "--epochs", "3", "--steps-per-epoch", "2", *TINY]
    killed_run(monkeypatch, args, tmp_path / "run", 3)             # epoch 1 wrote best.pt and last.pt
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    assert_one_error_line(run_main(capsys, *args, "--out", tmp_path / "run", "--resume", "--epochs", "2"),
                          "--epochs 2", "run's 3", "never shortened")
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before


@pytest.mark.parametrize("key, value", [("depth", 11), ("num_classes", "abc"), ("num_classes", 10 ** 12),
                                        ("width", -8), ("size", 0), ("size", 48), ("spacing", 0.0),
                                        ("spacing", float("nan")), ("predict", "xyz"), ("batch_size", 0),
                                        ("class_names", None), ("same_decoders", "yes")])
def test_a_best_pt_with_one_bad_config_value_is_refused_before_anything_is_written(tuned, tmp_path, capsys, key,
                                                                                   value):
    run = tmp_path / "run"
    shutil.copytree(tuned, run, ignore=shutil.ignore_patterns("eval-*"))
    ckpt = torch.load(run / "best.pt", weights_only=True)
    ckpt["config"][key] = value
    torch.save(ckpt, run / "best.pt")
    (tmp_path / "in").mkdir()
    nii(tmp_path / "in" / "a.nii.gz", noise((40, 40, 3)))
    assert_one_error_line(run_main(capsys, "predict", "--run", run, "--input", tmp_path / "in", "--out",
                                   tmp_path / "out"), "best.pt", "invalid config", key)
    assert not (tmp_path / "out").exists()
    assert_one_error_line(run_main(capsys, "eval", "--run", run, "--quiet"), "best.pt", "invalid config", key)
    assert not list(run.glob("eval-*"))


@pytest.mark.parametrize("change", [dict(log="abc"), dict(epoch=-5), dict(epoch=7), dict(config_lr="fast")])
def test_a_last_pt_with_a_bad_state_is_refused_before_anything_is_touched(pretrained, tmp_path, capsys, change):
    run = tmp_path / "run"
    shutil.copytree(pretrained, run)
    ckpt = torch.load(run / "last.pt", weights_only=True)
    for k, v in change.items():
        if k.startswith("config_"):
            ckpt["config"][k[7:]] = v
        else:
            ckpt[k] = v
    torch.save(ckpt, run / "last.pt")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert_one_error_line(run_main(capsys, "pretrain", "--out", run, "--resume", "--epochs", "3", *TINY), "last.pt")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_a_flipped_byte_in_a_checkpoint_is_refused(phantom, pretrained, tmp_path, capsys):
    """torch.load does not check the zip's CRCs: one flipped byte in a weight would load silently."""
    raw = bytearray((pretrained / "encoder.pt").read_bytes())
    with zipfile.ZipFile(pretrained / "encoder.pt") as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size > 64)
    name_len, extra_len = struct.unpack_from("<HH", raw, info.header_offset + 26)     # the local header's own
    raw[info.header_offset + 30 + name_len + extra_len + 10] ^= 0x01
    (tmp_path / "encoder.pt").write_bytes(bytes(raw))
    assert_one_error_line(run_main(capsys, "finetune", "--data", phantom, "--out", tmp_path / "run", "--pretrained",
                                   tmp_path / "encoder.pt", *TINY), "encoder.pt", "damaged", "CRC")
    assert not (tmp_path / "run").exists()


def test_predict_segments_a_symlink_and_its_target_and_follows_symlinked_folders(tuned, tmp_path, capsys):
    (tmp_path / "real").mkdir()
    nii(tmp_path / "real" / "a.nii.gz", noise((40, 40, 3)))
    (tmp_path / "in").mkdir()
    nii(tmp_path / "in" / "b.nii.gz", noise((40, 40, 3), 1))
    (tmp_path / "in" / "b_link.nii.gz").symlink_to(tmp_path / "in" / "b.nii.gz")
    (tmp_path / "in" / "linked").symlink_to(tmp_path / "real", target_is_directory=True)
    (tmp_path / "real" / "loop").symlink_to(tmp_path / "in", target_is_directory=True)     # a cycle
    rc, _, err = run_main(capsys, "predict", "--run", tuned, "--input", tmp_path / "in", "--out", tmp_path / "out")
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == ["a.nii.gz", "b.nii.gz", "b_link.nii.gz"]


def test_sync_bn_without_cuda_is_one_line_before_anything_is_written(phantom, tmp_path, capsys):
    assert_one_error_line(run_main(capsys, "pretrain", "--data", phantom, "--out", tmp_path / "run", "--device",
                                   "cpu", "--sync-bn", *TINY), "--sync-bn", "CUDA")
    assert not (tmp_path / "run").exists()


def test_a_resumed_run_keeps_the_exact_best_validation_dice(phantom, pretrained, tmp_path, monkeypatch):
    args = ["finetune", "--data", str(phantom), "--pretrained", str(pretrained / "encoder.pt"), "--labeled", "20",
            "--epochs", "2", "--steps-per-epoch", "2", *TINY]
    assert ideal.main([*args, "--out", str(tmp_path / "whole")]) == 0
    killed_run(monkeypatch, args, tmp_path / "killed", 3)          # epoch 1 wrote best.pt and last.pt
    assert ideal.main([*args, "--out", str(tmp_path / "killed"), "--resume"]) == 0
    whole, killed = (json.loads((tmp_path / r / "done.json").read_text()) for r in ("whole", "killed"))
    assert whole["best_val_dice"] == killed["best_val_dice"]
    assert torch.load(tmp_path / "whole" / "last.pt", weights_only=True)["best_val_dice"] == whole["best_val_dice"]


def test_an_evaluation_folder_never_mixes_two_evaluations(tuned, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tuned, run, ignore=shutil.ignore_patterns("eval-*"))
    for name in ("a", "b"):                                          # two datasets whose folders share a name
        root = tmp_path / name / "data"
        for pid in ("patient201", "patient202"):
            for number in (1, 2):
                nii(root / pid / f"{pid}_frame{number:02d}.nii.gz", noise((40, 40, 3), number))
                nii(root / pid / f"{pid}_frame{number:02d}_gt.nii.gz", heart((40, 40, 3), 5, 3, 2))
            (root / pid / "Info.cfg").write_text("ED: 1\nES: 2\n")
    a, b = tmp_path / "a" / "data", tmp_path / "b" / "data"
    assert run_main(capsys, "eval", "--run", run, "--data", a, "--split", "all", "--frames", "both", "--save-pred",
                    "--quiet")[0] == 0
    assert run_main(capsys, "eval", "--run", run, "--data", a, "--split", "all", "--quiet")[0] == 0
    assert (run / "eval-data-all-both" / "clinical.csv").exists() and not (run / "eval-data-all" / "pred").exists()
    before = {p.name: p.read_bytes() for p in (run / "eval-data-all").iterdir()}
    for extra in (["--data", b], ["--data", a, "--label-map", "1:1"]):
        assert_one_error_line(run_main(capsys, "eval", "--run", run, "--split", "all", "--quiet", *extra),
                              "eval-data-all", "another evaluation", "--out")
    assert {p.name: p.read_bytes() for p in (run / "eval-data-all").iterdir()} == before
    assert run_main(capsys, "eval", "--run", run, "--data", b, "--split", "all", "--out", tmp_path / "b-eval",
                    "--quiet")[0] == 0


@pytest.mark.parametrize("damage", [dict(std="x"), dict(std=None), dict(mean="0.5")])
def test_report_on_a_summary_with_a_bad_number_is_one_line(tmp_path, capsys, damage):
    ev = tmp_path / "runs" / "ideal" / "L10" / "seed0" / "eval-test"
    ev.mkdir(parents=True)
    stats = {k: v for k, v in dict(dict(mean=0.5, std=0.1), **damage).items() if v is not None}
    (ev / "summary.json").write_text(json.dumps({"mean": {m: stats for m in metrics.METRICS}}))
    assert_one_error_line(run_main(capsys, "report", "--runs", tmp_path / "runs", "--out", tmp_path / "t"),
                          "summary.json", "not an eval summary")


def test_temporary_files_of_killed_writes_are_removed(pretrained, tuned, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pretrained, run)
    dead = 4_000_000                                                # beyond pid_max: no such process
    (run / f".tmp{dead}-last.pt").write_bytes(b"half")
    (run / f".tmp{os.getpid()}-x.json").write_bytes(b"mine")      # a live process's: kept
    assert ideal.main(["pretrain", "--out", str(run), "--resume", "--epochs", "3", *TINY]) == 0
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".tmp")) == [f".tmp{os.getpid()}-x.json"]
    out = tmp_path / "seg"
    out.mkdir()
    (out / f".tmp{dead}-a.nii.gz").write_bytes(b"half")
    nii(tmp_path / "a.nii.gz", noise((40, 40, 3)))
    assert ideal.main(["predict", "--run", str(tuned), "--input", str(tmp_path / "a.nii.gz"), "--out", str(out),
                       "--quiet"]) == 0
    assert not list(out.glob(".tmp*"))


def test_an_error_is_one_line_without_quiet_and_a_refused_command_leaves_no_lock(phantom, pretrained, tmp_path):
    loud = [f for f in TINY if f != "--quiet"]
    rc, _, err = run_cli("ideal.py", "finetune", "--data", phantom, "--out", tmp_path / "run", "--pretrained",
                         tmp_path / "missing.pt", *loud)
    assert_one_error_line((rc, "", err), "missing.pt")
    run = tmp_path / "copy"
    shutil.copytree(pretrained, run)
    before = sorted(p.name for p in run.iterdir())
    assert_one_error_line(run_cli("ideal.py", "pretrain", "--data", phantom, "--out", run, *loud), "already holds")
    assert sorted(p.name for p in run.iterdir()) == before and ".lock" not in before


@pytest.mark.skipif(not shutil.which("torchrun"), reason="torchrun not on PATH")
def test_under_torchrun_an_error_is_printed_once(phantom, tmp_path):
    p = subprocess.run(["torchrun", "--standalone", "--nproc_per_node", "2", str(HERE / "ideal.py"), "finetune",
                        "--data", str(phantom), "--out", str(tmp_path / "run"), "--pretrained", str(tmp_path / "no.pt"),
                        "--device", "cpu", *TINY], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode != 0 and (p.stdout + p.stderr).count("ideal.py finetune: error:") == 1, p.stderr


def test_the_readme_runs_eval_and_predict_without_torchrun():
    """torchrun's own parser takes --run for its --run-path, so the README must not offer eval or predict under it."""
    text = (HERE / "README.md").read_text()
    assert not re.search(r"torchrun[^\n]*ideal\.py (eval|predict)", text)
    assert "eval, predict, report and bench run on rank 0" not in text


# ==========================================================================================================
# The method as one copyable block; figures; clinical indices, cines and the clinical table
# ==========================================================================================================
def test_the_method_block_runs_pasted_alone():
    """From the top of ideal.py to its end marker: PyTorch only, and its losses are ideal's."""
    source = (HERE / "ideal.py").read_text()
    block = source[:source.index("# END OF THE METHOD")]
    space = {}
    exec(compile(block, "method block", "exec"), space)
    assert not {"data", "metrics", "np", "argparse"} & set(space)
    torch.manual_seed(0)
    x, g = torch.rand(4, 1, 64, 64), torch.Generator().manual_seed(0)
    views, thetas = space["make_view"](torch.cat([x, x]), g)
    for module in (space, vars(ideal)):
        torch.manual_seed(1)
        net = module["PretrainNet"](10, 8, 16)
        total, parts = module["pretrain_loss"](net, views, thetas, "both", 0.1, 1.0, "same")
        seg = module["IDEALSegmenter"](4, 10, 8)
        (l1, l2), (u1, u2) = seg(x, x)
        y1, y2 = (module["pseudo_label"](z, 0.5) for z in (u1, u2))
        eq3 = module["cross_consistency_loss"](l1, l2, (x[:, 0] * 4).long().clamp(max=3), u1, u2, y1, y2, 1.0, True)
        module["result"] = [total.item(), parts["global"].item(), parts["local"].item(), *(t.item() for t in eq3)]
    assert space["result"] == ideal.result and all(math.isfinite(v) for v in space["result"])
    del ideal.result


def svg_points(path):
    """{series name: [(data-x, data-y, cx, cy)]} of a metrics.svg_plot file, parsed with xml.etree."""
    import xml.etree.ElementTree as ET
    ns = {"s": "http://www.w3.org/2000/svg"}
    root = ET.parse(path).getroot()
    return {g.get("data-name"): [(float(c.get("data-x")), float(c.get("data-y")), float(c.get("cx")),
                                  float(c.get("cy"))) for c in g.findall("s:circle", ns)]
            for g in root.findall("s:g", ns)}


def test_svg_plot_places_each_point_by_its_value(tmp_path):
    (tmp_path / "f.svg").write_text(metrics.svg_plot(
        [dict(name="a", x=[1.25, 10, 100], y=[0.7, 0.8, 0.85], err=[0.02, 0.01, 0]),
         dict(name="b", x=[1.25, 10], y=[0.6, 0.75], line=False)],
        "L, %", "DSC", "title & <more>", hlines=[(0.5, "floor")], xlog=True))
    points = svg_points(tmp_path / "f.svg")
    assert [p[:2] for p in points["a"]] == [(1.25, 0.7), (10, 0.8), (100, 0.85)]
    everything = sorted(p for s in points.values() for p in s)
    for (x0, y0, cx0, cy0), (x1, y1, cx1, cy1) in itertools.combinations(everything, 2):
        assert (cy0 > cy1) == (y0 < y1) or y0 == y1                   # higher values higher up
        if x0 != x1:
            assert (cx0 < cx1) == (x0 < x1)
    text = (tmp_path / "f.svg").read_text()
    assert "title &amp; &lt;more&gt;" in text and text.count("<polyline") == 1
    (tmp_path / "d.svg").write_text(metrics.svg_plot(
        [dict(name="a", x=[1.25], y=[0.7], err=[0.02]), dict(name="b", x=[1.25], y=[0.7], err=[0.03])],
        "L, %", "DSC", "dodged", xlog=True, dodge=8))
    (a,), (b,) = svg_points(tmp_path / "d.svg").values()
    assert b[2] - a[2] == pytest.approx(8) and a[:2] == b[:2]     # side by side, the same values


def test_report_draws_the_tables_numbers(tuned, tmp_path, capsys):
    runs = tmp_path / "runs"
    seed0 = runs / "ideal" / "L20" / "seed0"
    shutil.copytree(tuned, seed0, ignore=shutil.ignore_patterns("eval-*"))
    assert run_main(capsys, "eval", "--run", seed0, "--quiet")[0] == 0
    shutil.copytree(seed0, runs / "ideal" / "L20" / "seed1")
    assert run_main(capsys, "report", "--runs", runs, "--out", tmp_path / "t")[0] == 0
    table = json.loads((tmp_path / "t.json").read_text())["results"][0]
    (point,) = svg_points(tmp_path / "t.svg")["ideal"]
    assert point[:2] == (20.0, pytest.approx(table["dsc"]["mean"], abs=1e-12))
    x_axis = re.search(r'<line x1="([\d.]+)" y1="([\d.]+)" x2="([\d.]+)" y2="\2"', (tmp_path / "t.svg").read_text())
    assert point[2] == pytest.approx((float(x_axis[1]) + float(x_axis[3])) / 2)   # one fraction: mid-axis
    assert "t.svg" in (tmp_path / "t.md").read_text()


def test_eval_with_both_frames_scores_ed_and_es_apart_and_draws_bland_altman(tuned_both):
    ev = tuned_both
    summary = json.loads((ev / "summary.json").read_text())
    rows = csv_rows(ev / "metrics.csv")
    for frame in ("ED", "ES"):
        dsc = [float(r["dsc"]) for r in rows if r["id"].endswith(frame) and r["label"] == "3"]
        assert summary["frames"][frame]["3"]["dsc"]["mean"] == pytest.approx(np.mean(dsc))
    clinical = csv_rows(ev / "clinical.csv")
    points = svg_points(ev / "bland-altman-lv_ef.svg")
    (series,) = points.values()
    want = sorted(((float(r["lv_ef_pred"]) + float(r["lv_ef_gt"])) / 2, float(r["lv_ef_pred"]) - float(r["lv_ef_gt"]))
                  for r in clinical if not math.isnan(float(r["lv_ef_pred"]) + float(r["lv_ef_gt"])))
    assert sorted(p[:2] for p in series) == pytest.approx(want)
    import xml.etree.ElementTree as ET
    lines = [float(e.get("data-y")) for e in ET.parse(ev / "bland-altman-lv_ef.svg").getroot().iter()
             if e.get("class") == "hline"]
    a = summary["clinical"]["lv_ef"]
    assert lines == pytest.approx([a["bias"], a["loa_low"], a["loa_high"]])


def test_cine_indices_pick_ed_and_es_by_the_lv_volume():
    frames = [{1: 50.0, 2: 40.0, 3: v} for v in (100.0, 140.0, 80.0, 60.0, 90.0)]
    got = metrics.cine_indices(frames)
    assert (got["ed"], got["es"], got["lv_edv"], got["lv_esv"], got["lv_sv"]) == (1, 3, 140.0, 60.0, 80.0)
    assert got["lv_ef"] == pytest.approx(100 * 80 / 140) and got["rv_ef"] == 0.0 and got["myo_mass"] == 42.0
    assert metrics.cine_warnings(got) == []
    grown = metrics.cine_indices([{**f, 1: 70.0 if t == 3 else 50.0} for t, f in enumerate(frames)])
    (warning,) = metrics.cine_warnings(grown)
    assert grown["rv_ef"] == pytest.approx(-40.0) and "RV EF -40.0 % < 0" in warning and "(frame 4)" in warning


def beating_cine_segmented_as(tmp_path, monkeypatch, edit=lambda labels, truth: None):
    """A beating phantom cine in tmp_path/in whose segmentation is its own labels, after edit(labels, truth) changes
    them in place; the phantom's truth."""
    truth = data.write_cine(tmp_path / "in" / "heart.nii.gz", frames=6, seed=3)
    (tmp_path / "in" / "heart_gt.nii.gz").rename(tmp_path / "heart_gt.nii.gz")
    labels = np.asarray(nib.load(tmp_path / "heart_gt.nii.gz").dataobj).copy()
    edit(labels, truth)
    monkeypatch.setattr(ideal, "segment", lambda model, vols, *a, **k: (
        [labels[..., t] for t in range(len(vols))], None))
    return truth


def test_predict_on_a_beating_cine_writes_its_volume_curve_ed_es_and_ef(tuned, tmp_path, monkeypatch):
    """With the segmentation replaced by the phantom's own labels, predict's volumes, ED, ES and EF are the truth."""
    truth = beating_cine_segmented_as(tmp_path, monkeypatch)
    assert ideal.main(["predict", "--run", str(tuned), "--input", str(tmp_path / "in"), "--out",
                       str(tmp_path / "out"), "--quiet"]) == 0
    rows = csv_rows(tmp_path / "out" / "heart_volumes.csv")
    assert [int(r["frame"]) for r in rows] == list(range(1, 7))
    assert [float(r["LV_ml"]) for r in rows] == pytest.approx(truth["lv_ml"])
    assert [float(r["RV_ml"]) for r in rows] == pytest.approx(truth["rv_ml"])
    summary = json.loads((tmp_path / "out" / "heart_summary.json").read_text())
    lv = truth["lv_ml"]
    assert (summary["ed"], summary["es"]) == (truth["ed"] + 1, truth["es"] + 1) and summary["warnings"] == []
    assert summary["lv_ef"] == pytest.approx(100 * (lv[truth["ed"]] - lv[truth["es"]]) / lv[truth["ed"]])
    points = svg_points(tmp_path / "out" / "heart_volumes.svg")
    assert [p[1] for p in points["LV"]] == pytest.approx(lv)
    assert points["ES"][0][:2] == (truth["es"] + 1, pytest.approx(min(lv)))


def test_predict_warns_of_an_rv_larger_at_es_than_at_ed(tuned, tmp_path, monkeypatch, capsys):
    """Labels a heart cannot have (RV painted over the background at ES): the progress line and summary say so."""
    def paint_rv_at_es(labels, truth):
        es = labels[..., truth["es"]]
        es[es == 0] = 1

    beating_cine_segmented_as(tmp_path, monkeypatch, paint_rv_at_es)
    code, _, err = run_main(capsys, "predict", "--run", tuned, "--input", tmp_path / "in", "--out", tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "heart_summary.json").read_text())
    assert code == 0 and summary["rv_ef"] < 0 and len(summary["warnings"]) == 1
    assert f"warning: RV EF {summary['rv_ef']:.1f} % < 0" in err


def test_clinical_report_tabulates_ed_es_and_the_indices(tuned, tuned_both, tmp_path, capsys):
    runs = tmp_path / "runs"
    run = runs / "ideal" / "L20" / "seed0"
    shutil.copytree(tuned, run, ignore=shutil.ignore_patterns("eval-test", "eval-test-final"))
    assert run_main(capsys, "report", "--clinical", "--runs", runs, "--out", tmp_path / "c")[0] == 0
    summary = json.loads((run / "eval-test-both" / "summary.json").read_text())
    (row,) = json.loads((tmp_path / "c.json").read_text())["results"]
    assert row["row"] == "ideal, ED only" and row["ES 3"]["mean"] == summary["frames"]["ES"]["3"]["dsc"]["mean"]
    assert row["clinical"]["lv_ef"]["r"]["mean"] == pytest.approx(summary["clinical"]["lv_ef"]["r"], nan_ok=True)
    text = (tmp_path / "c.md").read_text()
    assert "| ideal, ED only | 20 |" in text and "Bernard" in text
    assert (tmp_path / "c-bland-altman-lv_ef.svg").exists()

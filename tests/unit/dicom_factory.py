"""Small synthetic CT datasets for unit tests (valid UIDs, file meta, 16-bit pixels)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)


def make_ct_dataset(
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    rows: int = 16,
    columns: int = 16,
    instance_number: int = 1,
    patient_name: str = "TEST^PATIENT",
    patient_id: str = "TEST-0001",
    modality: str = "CT",
    seed: int = 0,
) -> Dataset:
    """Return a CT Image Storage dataset with file meta and random 16-bit pixels."""
    sop_uid = sop_uid or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.Modality = modality
    ds.StudyDate = "20260101"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [0.0, 0.0, float(instance_number)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = 1.0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 4096, size=(rows, columns), dtype=np.uint16)
    ds.PixelData = pixels.tobytes()
    return ds


def write_ct_file(path: Path, **kwargs: object) -> Path:
    """Write :func:`make_ct_dataset` as a DICOM Part 10 file at ``path``."""
    ds = make_ct_dataset(**kwargs)  # type: ignore[arg-type]
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def split_multiframe(path: Path, folder: Path) -> list[Path]:
    """Write the first and second half of the frames of ``path`` as two new instances."""
    ds = pydicom.dcmread(path)
    frames = ds.pixel_array
    half = frames.shape[0] // 2
    out = []
    for part, selection in enumerate((slice(0, half), slice(half, None)), start=1):
        piece = copy.deepcopy(ds)
        piece.PerFrameFunctionalGroupsSequence = DicomSequence(
            list(ds.PerFrameFunctionalGroupsSequence[selection])
        )
        piece.NumberOfFrames = len(piece.PerFrameFunctionalGroupsSequence)
        piece.PixelData = np.ascontiguousarray(frames[selection]).tobytes()
        piece.SOPInstanceUID = generate_uid()
        piece.file_meta.MediaStorageSOPInstanceUID = piece.SOPInstanceUID
        piece.InstanceNumber = part
        target = folder / f"part{part}.dcm"
        piece.save_as(target, enforce_file_format=True)
        out.append(target)
    return out

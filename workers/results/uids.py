"""Deterministic UIDs for the result objects (SEG, SR) that radnode writes.

A job that is retried (worker crash, redelivered Celery task, re-run after a
failed C-STORE) must produce the *same* Series Instance UID and SOP Instance
UID as the first attempt, so that the PACS receives a duplicate of an instance
it may already hold instead of a second, different result. The UIDs are
therefore derived from the inputs that define a result (source series, model
name and version, kind of output) rather than drawn at random.

Sources
-------
* DICOM PS3.5 section 9.1 "UID Encoding Rules": a UID is at most 64
  characters of digits and dots, no component has a leading zero.
* DICOM PS3.5 Annex B "Creating a Unique Identifier": a UID is an
  organisation root followed by a suffix that the organisation keeps unique.
* :func:`pydicom.uid.generate_uid`: with ``entropy_srcs`` the suffix is the
  decimal SHA-512 hash of the joined sources, truncated so that the UID fits
  in 64 characters (about 38 decimal digits, ~126 bits, after the default
  prefix).
"""

from __future__ import annotations

import json

from pydicom.uid import PYDICOM_ROOT_UID, generate_uid

__all__ = ["UID_NAMESPACE", "device_observer_uid", "result_uid", "segment_tracking_uid"]

UID_NAMESPACE = "radnode-result-uid/v1"
"""Constant mixed into every hash so radnode's UIDs cannot collide with other
users of ``generate_uid(entropy_srcs=...)`` that hash similar strings. Changing
it changes every result UID: never change it in a released version."""


def result_uid(
    source_series_uid: str,
    model_name: str,
    model_version: str,
    output_kind: str,
    part: str,
    *,
    prefix: str = PYDICOM_ROOT_UID,
) -> str:
    """Return a deterministic UID for one part of one result object.

    The same arguments always give the same UID; changing any argument (for
    example a new ``model_version``) gives a different UID.

    Parameters
    ----------
    source_series_uid : str
        Series Instance UID (0020,000E) of the analysed (source) series.
    model_name : str
        Algorithm Name of the model that produced the result.
    model_version : str
        Algorithm Version of the model.
    output_kind : str
        Kind of result object, e.g. ``"seg"`` or ``"sr"``.
    part : str
        Which UID of that object, e.g. ``"series"`` for the Series Instance
        UID or ``"instance"`` for the SOP Instance UID.
    prefix : str, optional
        Organisation root, ending in ``"."``, at most 54 characters. The
        default is pydicom's root ``1.2.826.0.1.3680043.8.498.``, which pydicom
        provides for exactly this purpose (PS3.5 B.2); a site with its own
        registered root may pass it instead.

    Returns
    -------
    str
        A valid DICOM UID of at most 64 characters (PS3.5 9.1).

    Raises
    ------
    ValueError
        If an argument is empty, or ``prefix`` is not a valid UID prefix.

    Notes
    -----
    ``generate_uid`` hashes the *concatenation* of its entropy sources, so
    ``["ab", "c"]`` and ``["a", "bc"]`` would collide. The arguments are
    therefore serialised as one JSON array, which is unambiguous.
    """
    fields = {
        "source_series_uid": source_series_uid,
        "model_name": model_name,
        "model_version": model_version,
        "output_kind": output_kind,
        "part": part,
    }
    for name, value in fields.items():
        if not value:
            raise ValueError(f"{name} must be a non-empty string")
    entropy = json.dumps(
        [UID_NAMESPACE, source_series_uid, model_name, model_version, output_kind, part],
        ensure_ascii=True,
        separators=(",", ":"),
    )
    return str(generate_uid(prefix=prefix, entropy_srcs=[entropy]))


def segment_tracking_uid(
    source_series_uid: str,
    model_name: str,
    model_version: str,
    segment_number: int,
    *,
    prefix: str = PYDICOM_ROOT_UID,
) -> str:
    """Return the deterministic Tracking UID of one segment.

    The SEG (Tracking UID (0062,0021) in the Segment Sequence) and the SR
    (TID 4108 "Tracking Unique Identifier", DCM 112040) use the same value, so
    a reader can match the SR measurement group to the SEG segment.

    Parameters
    ----------
    source_series_uid : str
        Series Instance UID of the analysed series.
    model_name : str
        Algorithm Name.
    model_version : str
        Algorithm Version.
    segment_number : int
        1-based Segment Number (0062,0004).
    prefix : str, optional
        Organisation root, see :func:`result_uid`.

    Returns
    -------
    str
        A valid DICOM UID (PS3.5 9.1).

    Raises
    ------
    ValueError
        If ``segment_number`` is below 1 or another argument is empty.
    """
    if segment_number < 1:
        raise ValueError(f"segment_number must be >= 1, got {segment_number}")
    return result_uid(
        source_series_uid,
        model_name,
        model_version,
        "segment",
        f"tracking-{segment_number}",
        prefix=prefix,
    )


def device_observer_uid(
    model_name: str, model_version: str, *, prefix: str = PYDICOM_ROOT_UID
) -> str:
    """Return the deterministic Device Observer UID of a model.

    Used for TID 1004 "Device Observer UID" (DCM 121012) in the SR observer
    context: the "device" is the model, so the UID depends on its name and
    version only, not on the analysed series.

    Parameters
    ----------
    model_name : str
        Algorithm Name.
    model_version : str
        Algorithm Version.
    prefix : str, optional
        Organisation root, see :func:`result_uid`.

    Returns
    -------
    str
        A valid DICOM UID (PS3.5 9.1).

    Raises
    ------
    ValueError
        If an argument is empty.
    """
    if not model_name or not model_version:
        raise ValueError("model_name and model_version must be non-empty strings")
    entropy = json.dumps(
        [UID_NAMESPACE, "device-observer", model_name, model_version],
        ensure_ascii=True,
        separators=(",", ":"),
    )
    return str(generate_uid(prefix=prefix, entropy_srcs=[entropy]))

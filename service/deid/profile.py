"""De-identification of DICOM data sets: PS3.15 E.1 Basic Application Level Confidentiality Profile.

The profile's attribute actions (Table E.1-1: D, Z, X, U, Z/D, X/Z, X/D,
X/Z/D, X/Z/U*, private attributes removed) come from the ``dicom-anonymizer``
library (KitwareMedical, BSD-3-Clause), whose table is generated from the
standard (:data:`STANDARD_VERSION`). radnode adds what that library leaves to
the caller:

* the table is applied at every nesting level, not only the top level of the
  data set (PS3.15 E.1.1: attributes are handled wherever they occur);
* UIDs (action U) are replaced through the persistent mapping of
  :mod:`service.deid.mapping`, so references stay consistent across objects,
  processes and retries (the library keeps a random, per-process dictionary);
* sequences: X/Z/U* sequences (Source Image, Referenced Image) keep their
  items with the profile applied inside and their UIDs replaced (the "U"
  choice), so a SEG still references its sources; D sequences (Content
  Sequence, Verifying Observer) keep their structure with the profile applied
  inside (for Content Sequence this is the Clean Structured Content option,
  E.3.9: codes, numbers and references kept, names, dates and UIDs handled as
  anywhere else, Text Value cleaned); X and X/Z sequences are removed and Z
  sequences emptied;
* Patient ID and Patient's Name become one pseudonym per patient and scope;
* the Retain Longitudinal Temporal Information option (E.3.6, Full Dates or
  Modified Dates) and the Clean Descriptors option (E.3.5);
* Patient Identity Removed, De-identification Method (Code Sequence, CID 7050)
  and Longitudinal Temporal Information Modified (E.1.1 and E.3.6).

Nothing here logs attribute values: logs name UIDs only.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Iterable
from datetime import date, timedelta
from io import BytesIO
from pathlib import Path
from typing import Any

from dicomanonymizer import simpledicomanonymizer as library
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag, Tag
from sqlalchemy.orm import Session

from service.config import DeidOptions
from service.deid import mapping

log = logging.getLogger("radnode.deid")

#: The dicom-anonymizer table used: DICOM 2026c, Table E.1-1.
STANDARD_VERSION = "dicomfields_2026c"

Action = Callable[[Dataset, tuple[int, int]], None]

_PATIENT_NAME = (0x0010, 0x0010)
_PATIENT_ID = (0x0010, 0x0020)
_TEXT_VALUE = (0x0040, 0xA160)
#: Not covered by the Retain Longitudinal options: birth date and time stay as the profile says.
_BIRTH = {(0x0010, 0x0030), (0x0010, 0x0032)}

#: Descriptors with action C in the Clean Descriptors column of Table E.1-1
#: (those of them that the library's table lists are used).
CLEAN_DESCRIPTOR_KEYWORDS = (
    "AcquisitionComments", "AcquisitionDeviceProcessingDescription",
    "AcquisitionFieldOfViewLabel", "AcquisitionProtocolDescription",
    "AdditionalPatientHistory", "AdmittingDiagnosesDescription", "Allergies",
    "ClinicalTrialSeriesDescription", "ClinicalTrialTimePointDescription",
    "CommentsOnRadiationDose", "CommentsOnThePerformedProcedureStep", "ContrastBolusAgent",
    "ContributionDescription", "DecompositionDescription", "DerivationDescription",
    "DeviceSettingDescription", "DischargeDiagnosisDescription", "FrameComments",
    "ImageComments", "ImagingServiceRequestComments", "Impressions", "MedicalAlerts",
    "PatientComments", "PatientState", "PerformedProcedureStepDescription", "ProtocolName",
    "ReasonForStudy", "ReasonForTheRequestedProcedure", "RequestedContrastAgent",
    "RequestedProcedureDescription", "ResultsComments", "ScheduledProcedureStepDescription",
    "SeriesDescription", "ServiceEpisodeDescription", "StudyComments", "StudyDescription",
    "VisitComments",
)

#: Patient attributes kept in the mapping so that re-identification can restore them.
PATIENT_KEYWORDS = ("PatientName", "PatientID", "IssuerOfPatientID", "OtherPatientIDsSequence",
                    "PatientBirthDate", "PatientBirthTime", "PatientSex", "PatientAge",
                    "PatientSize", "PatientWeight", "EthnicGroup", "PatientComments")
#: Study attributes kept likewise (with the de-identification attributes, restored as they were).
STUDY_KEYWORDS = ("AccessionNumber", "StudyID", "StudyDate", "StudyTime", "StudyDescription",
                  "ReferringPhysicianName", "PatientIdentityRemoved", "DeidentificationMethod",
                  "DeidentificationMethodCodeSequence", "LongitudinalTemporalInformationModified")
#: Values that the Clean options remove from free text: the data set's own identifiers.
_IDENTIFYING_KEYWORDS = ("PatientName", "PatientID", "OtherPatientNames", "PatientBirthName",
                         "PatientMotherBirthName", "AccessionNumber", "StudyID",
                         "PatientBirthDate", "PatientAddress", "InstitutionName",
                         "InstitutionAddress", "InstitutionalDepartmentName",
                         "ReferringPhysicianName", "PerformingPhysicianName",
                         "NameOfPhysiciansReadingStudy", "OperatorsName", "PhysiciansOfRecord",
                         "RequestingPhysician", "StationName", "DeviceSerialNumber",
                         "IssuerOfPatientID", "MedicalRecordLocator")

#: CID 7050 De-identification Method codes (DICOM PS3.16), scheme DCM.
_METHOD_CODES = {
    "basic": ("113100", "Basic Application Confidentiality Profile"),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
    "full": ("113106", "Retain Longitudinal Temporal Information Full Dates Option"),
    "modified": ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
}
METHOD_TEXT = "DICOM PS3.15 E.1 Basic Profile (radnode)"
#: Dummy values (action D) of dates and times.
_DUMMY_DATE_TIME = {"DA": "19000101", "TM": "000000", "DT": "19000101000000"}


class DeidentificationError(ValueError):
    """A data set that cannot be de-identified (not DICOM, no Study Instance UID...)."""


@functools.cache
def _table() -> tuple[dict[tuple[int, int], Action], list[tuple[tuple[int, ...], Action]]]:
    """The library's Table E.1-1 actions: single tags, and masked (repeating group) tags."""
    actions = library.initialize_actions(STANDARD_VERSION)
    single: dict[tuple[int, int], Action] = {}
    masked: list[tuple[tuple[int, ...], Action]] = []
    for tag, action in actions.items():
        if len(tag) == 2:
            single[(tag[0], tag[1])] = action
        else:
            masked.append((tuple(tag), action))
    return single, masked


@functools.cache
def _clean_descriptor_tags() -> frozenset[tuple[int, int]]:
    single, _ = _table()
    tags = set()
    for keyword in CLEAN_DESCRIPTOR_KEYWORDS:
        tag = Tag(keyword)
        key = (tag.group, tag.element)
        if key in single:
            tags.add(key)
    return frozenset(tags)


def _action_for(tag: BaseTag) -> Action | None:
    single, masked = _table()
    found = single.get((tag.group, tag.element))
    if found is not None:
        return found
    for (group, element, group_mask, element_mask), action in masked:  # type: ignore[misc]
        if tag.group & group_mask == group & group_mask and \
                tag.element & element_mask == element & element_mask:
            return action
    return None


def options_of(value: bool | DeidOptions) -> DeidOptions | None:
    """The options a destination's ``deidentify`` setting means; None when it is off."""
    if isinstance(value, DeidOptions):
        return value
    return DeidOptions() if value else None


def scope_of(options: DeidOptions, destination_name: str) -> str:
    """The mapping scope: ``options.scope``, else the destination's name."""
    return options.scope or destination_name


def _text_values(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple, MultiValue)):
        return [text for item in value for text in _text_values(item)]
    text = str(value).strip()
    if not text:
        return []
    parts = [text, *(p for p in re.split(r"[\^=]", text) if p)]
    if re.fullmatch(r"\d{8}", text):
        parts.append(f"{text[:4]}-{text[4:6]}-{text[6:]}")
    return [p.strip() for p in parts if len(p.strip()) >= 3]


def identifying_values(dataset: Dataset) -> list[str]:
    """The data set's own identifying values (names, IDs, dates of birth...), longest first."""
    found: set[str] = set()
    for keyword in _IDENTIFYING_KEYWORDS:
        element = dataset.get(keyword)
        if element is not None:
            found.update(_text_values(element))
    return sorted(found, key=len, reverse=True)


def clean_text(text: str, identifiers: Iterable[str]) -> str:
    """``text`` without any of ``identifiers`` (case-insensitive), spaces collapsed."""
    for identifier in identifiers:
        text = re.sub(re.escape(identifier), "", text, flags=re.IGNORECASE)
    return re.sub(r"\s{2,}", " ", text).strip(" ,;:-_^")


def _shift_date(value: str, days: int) -> str:
    text = value.strip()
    if not re.fullmatch(r"\d{8}", text[:8]):
        return ""
    try:
        shifted = date(int(text[:4]), int(text[4:6]), int(text[6:8])) + timedelta(days=days)
    except (ValueError, OverflowError):
        return ""
    return shifted.strftime("%Y%m%d") + text[8:]


def _map_values(value: Any, function: Callable[[str], str]) -> Any:
    if isinstance(value, (list, tuple, MultiValue)):
        return [function(str(v)) for v in value]
    return function(str(value)) if value not in (None, "") else value


class _Run:
    """One data set being de-identified in one scope."""

    def __init__(self, session: Session, scope: str, options: DeidOptions,
                 dataset: Dataset) -> None:
        self.session = session
        self.scope = scope
        self.options = options
        self.identifiers = identifying_values(dataset)
        self.date_shift = 0
        self.patient_pseudonym = ""

    def uid(self, original: str) -> str:
        original = original.strip().rstrip("\x00")
        if not original:
            return original
        return mapping.get_or_create(self.session, self.scope, mapping.UID_KIND, original,
                                     mapping.new_uid).pseudonym

    # -- the walk -----------------------------------------------------------------------

    def process(self, dataset: Dataset) -> None:
        for tag in list(dataset.keys()):
            element = dataset[tag]
            if tag.is_private:
                del dataset[tag]
                continue
            key = (tag.group, tag.element)
            if key in (_PATIENT_NAME, _PATIENT_ID):
                element.value = self.patient_pseudonym
                continue
            if key == _TEXT_VALUE:  # Clean Structured Content: free text of SR content items
                element.value = clean_text(str(element.value or ""), self.identifiers) or "-"
                continue
            action = _action_for(tag)
            if action is None:
                if element.VR == "SQ":
                    for item in element.value:
                        self.process(item)
                continue
            self.apply(dataset, element, key, action)

    def apply(self, dataset: Dataset, element: DataElement, key: tuple[int, int],
              action: Action) -> None:
        if element.VR == "SQ":
            self.sequence(dataset, element, action)
            return
        if element.VR in ("DA", "DT", "TM") and key not in _BIRTH and \
                self.options.retain_longitudinal != "off":
            if self.options.retain_longitudinal == "modified" and element.VR != "TM":
                days = self.date_shift
                element.value = _map_values(element.value,
                                            lambda v: _shift_date(v, days))
            return  # full dates (and times): kept
        if self.options.clean_descriptors and key in _clean_descriptor_tags():
            values = _map_values(element.value, lambda v: clean_text(v, self.identifiers))
            if values and any(values if isinstance(values, list) else [values]):
                element.value = values
                return
        if element.VR in ("DA", "DT", "TM"):
            self.date_time(dataset, element, action)
            return
        if element.VR == "UI":
            if action in (library.empty, library.delete_or_empty):
                element.value = ""
            elif action is library.delete:
                del dataset[element.tag]
            else:  # U, D and every choice that allows replacing: the persistent mapping
                element.value = _map_values(element.value, self.uid)
            return
        try:
            action(dataset, key)
        except NotImplementedError:  # a VR the library has no dummy for: remove it
            del dataset[element.tag]

    @staticmethod
    def date_time(dataset: Dataset, element: DataElement, action: Action) -> None:
        """Dates and times without the options: X removed, Z emptied, D a valid dummy.

        The library's dummy date, 00010101, is not accepted by dciodvfy.
        """
        if action is library.delete:
            del dataset[element.tag]
        elif action in (library.empty, library.delete_or_empty):
            element.value = ""
        else:
            element.value = _DUMMY_DATE_TIME[element.VR]

    def sequence(self, dataset: Dataset, element: DataElement, action: Action) -> None:
        if action in (library.delete_or_empty_or_replace_UID, library.replace,
                      library.empty_or_replace, library.replace_UID):
            for item in element.value:  # keep the items, the profile applied inside
                self.process(item)
        elif action is library.delete:
            del dataset[element.tag]
        else:  # Z, X/Z, X/D, X/Z/D: emptied (a zero-length sequence is valid for Type 2 and 3)
            element.value = DicomSequence([])


def _patient_key(dataset: Dataset) -> str:
    patient_id = str(dataset.get("PatientID", "") or "").strip()
    if patient_id:
        return patient_id
    return f"study:{str(dataset.get('StudyInstanceUID', '')).strip()}"


def _subset_json(dataset: Dataset, keywords: Iterable[str]) -> dict[str, Any]:
    subset = Dataset()
    for keyword in keywords:
        if keyword in dataset:
            subset[Tag(keyword)] = dataset[keyword]
    return subset.to_json_dict()


def _restore_json(dataset: Dataset, stored: dict[str, Any], keywords: Iterable[str]) -> None:
    restored = Dataset.from_json(stored)
    for keyword in keywords:
        if keyword in restored:
            dataset[Tag(keyword)] = restored[keyword]
        elif keyword in dataset:
            del dataset[keyword]


def _add_method(dataset: Dataset, options: DeidOptions) -> None:
    """Patient Identity Removed, De-identification Method (and codes), PS3.15 E.1.1."""
    dataset.PatientIdentityRemoved = "YES"
    methods = [str(v) for v in _text_values_raw(dataset.get("DeidentificationMethod"))]
    if METHOD_TEXT not in methods:
        methods.append(METHOD_TEXT)
    dataset.DeidentificationMethod = methods if len(methods) > 1 else methods[0]
    wanted = ["basic"]
    if options.clean_descriptors:
        wanted.append("clean_descriptors")
    if options.retain_longitudinal != "off":
        wanted.append(options.retain_longitudinal)
    items = list(dataset.get("DeidentificationMethodCodeSequence") or [])
    have = {(str(i.get("CodeValue", "")), str(i.get("CodingSchemeDesignator", "")))
            for i in items}
    for name in wanted:
        value, meaning = _METHOD_CODES[name]
        if (value, "DCM") in have:
            continue
        item = Dataset()
        item.CodeValue = value
        item.CodingSchemeDesignator = "DCM"
        item.CodeMeaning = meaning
        items.append(item)
    dataset.DeidentificationMethodCodeSequence = DicomSequence(items)
    if options.retain_longitudinal == "off":
        dataset.LongitudinalTemporalInformationModified = "REMOVED"
    elif options.retain_longitudinal == "modified":
        dataset.LongitudinalTemporalInformationModified = "MODIFIED"
    elif "LongitudinalTemporalInformationModified" not in dataset:
        dataset.LongitudinalTemporalInformationModified = "UNMODIFIED"


def _text_values_raw(element: Any) -> list[Any]:
    if element is None:
        return []
    value = element.value if isinstance(element, DataElement) else element
    if isinstance(value, (list, tuple, MultiValue)):
        return [v for v in value if str(v)]
    return [value] if str(value or "") else []


def deidentify_dataset(dataset: Dataset, session: Session, *, scope: str,
                       options: DeidOptions) -> Dataset:
    """De-identify ``dataset`` in place (DICOM PS3.15 E.1, Basic Profile and options).

    The pseudonyms come from (and new ones go to) the ``deid_mappings``
    table of ``scope``: the same original UID or patient always gets the same
    pseudonym there. The caller commits ``session`` before the result leaves
    the node.

    Parameters
    ----------
    dataset : pydicom.dataset.Dataset
        A complete data set (with its file meta information, if any).
    session : sqlalchemy.orm.Session
        An open session on the node's database.
    scope : str
        The mapping to use (see :func:`scope_of`).
    options : DeidOptions
        Retain Longitudinal Temporal Information, Clean Descriptors, the
        patient pseudonym's prefix.

    Returns
    -------
    pydicom.dataset.Dataset
        ``dataset`` itself.

    Raises
    ------
    DeidentificationError
        If the data set has no Study Instance UID or SOP Instance UID.

    Notes
    -----
    Source: DICOM PS3.15 Annex E (E.1, Table E.1-1; E.3.5 Clean Descriptors;
    E.3.6 Retain Longitudinal Temporal Information; E.3.9 Clean Structured
    Content for the SR Content Sequence).
    """
    study_uid = str(dataset.get("StudyInstanceUID", "") or "").strip()
    sop_uid = str(dataset.get("SOPInstanceUID", "") or "").strip()
    if not study_uid or not sop_uid:
        raise DeidentificationError("the data set has no Study or SOP Instance UID")
    run = _Run(session, scope, options, dataset)
    patient = mapping.get_or_create(
        session, scope, mapping.PATIENT_KIND, _patient_key(dataset),
        lambda: mapping.new_patient_id(options.patient_id_prefix),
        attributes={"dicom": _subset_json(dataset, PATIENT_KEYWORDS)},
        date_shift_days=mapping.new_date_shift())
    run.patient_pseudonym = patient.pseudonym
    run.date_shift = patient.date_shift_days or 0
    mapping.get_or_create(
        session, scope, mapping.UID_KIND, study_uid, mapping.new_uid,
        attributes={"dicom": _subset_json(dataset, STUDY_KEYWORDS),
                    "patient": patient.original,
                    "retain_longitudinal": options.retain_longitudinal})

    run.process(dataset)
    dataset.PatientName = patient.pseudonym
    dataset.PatientID = patient.pseudonym
    _add_method(dataset, options)
    meta = getattr(dataset, "file_meta", None)
    if meta is not None:
        new_meta = FileMetaDataset()
        for keyword in ("MediaStorageSOPClassUID", "TransferSyntaxUID"):
            if keyword in meta:
                new_meta[Tag(keyword)] = meta[keyword]
        new_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        dataset.file_meta = new_meta
    log.debug("de-identified %s as %s (scope %s)", sop_uid, dataset.SOPInstanceUID, scope)
    return dataset


def deidentify_file(path: Path, session: Session, *, scope: str,
                    options: DeidOptions) -> Dataset:
    """Read a DICOM file and de-identify it (see :func:`deidentify_dataset`).

    For sending the source series of a result to a de-identifying destination
    with the same scope, so that the result's references resolve there.

    Parameters
    ----------
    path : pathlib.Path
        A DICOM Part 10 file.
    session : sqlalchemy.orm.Session
        An open session; commit it before the data set leaves the node.
    scope : str
        The mapping to use.
    options : DeidOptions
        The profile's options.

    Returns
    -------
    pydicom.dataset.Dataset
        The de-identified data set, ready for ``save_as(..., enforce_file_format=True)``.

    Raises
    ------
    DeidentificationError
        If the file cannot be read as DICOM or lacks its UIDs.
    """
    try:
        dataset = dcmread(BytesIO(path.read_bytes()))
    except Exception as exc:  # pydicom raises many types on bad files
        raise DeidentificationError(
            f"cannot read {path.name}: {type(exc).__name__}") from exc
    return deidentify_dataset(dataset, session, scope=scope, options=options)


def _all_uid_elements(dataset: Dataset) -> list[DataElement]:
    found: list[DataElement] = []

    def visit(ds: Dataset, element: DataElement) -> None:
        if element.VR == "UI" and element.value:
            found.append(element)

    dataset.walk(visit)
    return found


def reidentify(session: Session, dataset: Dataset, scope: str | None = None) -> bool:
    """Map a returning data set's pseudonyms back to the originals, in place.

    For results that come back from a de-identifying destination (e.g. a
    reader's SR on a de-identified study). Works when the Study Instance UID
    is a pseudonym that the table knows: every UID that is a known pseudonym
    of that scope (Study, Series, SOP Instance, Frame of Reference, the
    referenced UIDs in sequences) gets its original back; UIDs the table does
    not know (new objects made by the recipient) stay. The patient's
    attributes and the study's (Accession Number, Study ID, Study Date...)
    are restored; with the Modified Dates option, other dates are shifted back.

    Parameters
    ----------
    session : sqlalchemy.orm.Session
        An open session on the node's database (read only).
    dataset : pydicom.dataset.Dataset
        The returning data set; changed in place.
    scope : str, optional
        The mapping; None finds it from the Study Instance UID.

    Returns
    -------
    bool
        True if the data set was re-identified, False if its Study Instance
        UID is not a known pseudonym (nothing changed).
    """
    study = str(dataset.get("StudyInstanceUID", "") or "").strip()
    row = mapping.lookup(session, scope, study) if study else None
    if row is None or row.kind != mapping.UID_KIND:
        return False
    elements = _all_uid_elements(dataset)
    values = [str(v) for e in elements for v in _text_values_raw(e)]
    meta = getattr(dataset, "file_meta", None)
    originals = mapping.original_uids(session, values, row.scope)
    for element in elements:
        element.value = _map_values(element.value, lambda v: originals.get(v, v))
    attributes = row.attributes or {}
    if attributes.get("retain_longitudinal") == "modified":
        patient = mapping.find(session, row.scope, mapping.PATIENT_KIND,
                               str(attributes.get("patient", "")))
        if patient is not None and patient.date_shift_days:
            _unshift(dataset, -patient.date_shift_days)
    patient_key = str(attributes.get("patient", ""))
    patient = mapping.find(session, row.scope, mapping.PATIENT_KIND, patient_key)
    if patient is not None and patient.attributes:
        _restore_json(dataset, patient.attributes.get("dicom", {}), PATIENT_KEYWORDS)
    if "dicom" in attributes:
        _restore_json(dataset, attributes["dicom"], STUDY_KEYWORDS)
    if meta is not None and "SOPInstanceUID" in dataset:
        meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    log.info("re-identified %s (scope %s)", dataset.get("SOPInstanceUID", ""), row.scope)
    return True


def _unshift(dataset: Dataset, days: int) -> None:
    def visit(ds: Dataset, element: DataElement) -> None:
        key = (element.tag.group, element.tag.element)
        if element.VR in ("DA", "DT") and key not in _BIRTH and element.value and \
                _action_for(element.tag) is not None:
            element.value = _map_values(element.value, lambda v: _shift_date(v, days))

    dataset.walk(visit)

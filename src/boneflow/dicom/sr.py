"""The TID 1500 Measurement Report (Comprehensive SR) of one analysed study.

The content tree, its codes and the reasons for each choice are listed in
``docs/conformance.md``; change both together.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from boneflow import PRODUCT_NAME, __version__
from boneflow.findings import Finding, FindingStatus

log = logging.getLogger(__name__)

MANUFACTURER = "boneflow project"
# A private coding scheme for what no standard code says; declared in the SR itself
# (Coding Scheme Identification Sequence) and in docs/conformance.md.
PRIVATE_SCHEME = "99BONEFLOW"
OPERATING_THRESHOLD = Code("OPERATING-THRESHOLD", PRIVATE_SCHEME, "Operating threshold")
NOT_ANALYSED_REASON = codes.DCM.Comment
PIXEL_DATA = 0x7FE00010

PROCEDURE_REPORTED = Code("363680008", "SCT", "Radiographic imaging procedure")
FRACTURE = Code("125605004", "SCT", "Fracture of bone")
PRESENT = codes.SCT.Present
ABSENT = codes.SCT.Absent
INDETERMINATE = codes.SCT.Indeterminate
NOT_DONE = Code("385660001", "SCT", "Not done")
PROBABILITY = codes.DCM.CertaintyOfFinding  # DCM 111012; no standard code for P(fracture)
NO_UNITS = codes.UCUM.NoUnits
ILLUSTRATION = codes.DCM.IllustrationOfROI  # DCM 121200: the Grad-CAM SC of this image

# Finding sites: SNOMED CT codes of CID 4031 "Common Anatomic Regions".
BODY_PART_CODES: Mapping[str, Code] = {
    "hand": codes.cid4031.Hand,
    "wrist": codes.cid4031.WristJoint,
    "forearm": codes.cid4031.Forearm,
    "elbow": codes.cid4031.ElbowJoint,
    "humerus": codes.cid4031.Humerus,
    "shoulder": codes.cid4031.Shoulder,
    "lower_leg": codes.cid4031.LowerLeg,
}
LATERALITY_CODES: Mapping[str, Code] = {"L": codes.SCT.Left, "R": codes.SCT.Right}


@contextmanager
def names_copied_as_sent() -> Iterator[None]:
    """Silence highdicom's warning about one-component person names.

    Names are copied from the source exactly as the PACS sent them ("ward" as a referring
    physician is common); rewriting them would break matching in the PACS.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person")
        yield


def device_uid(ae_title: str = PRODUCT_NAME) -> str:
    """A stable UID naming this boneflow device in the observer context."""
    return str(generate_uid(entropy_srcs=[PRODUCT_NAME, "device", ae_title]))


def build_structured_report(
    sources: Sequence[Dataset],
    findings: Sequence[Finding],
    secondary_captures: Mapping[str, Dataset],
    *,
    series_instance_uid: str,
    series_number: int,
    series_description: str,
    predecessor: Dataset | None = None,
    sop_instance_uid: str | None = None,
    ae_title: str = PRODUCT_NAME,
) -> Dataset:
    """Build the Comprehensive SR (TID 1500) with one finding group per image.

    Args:
        sources: the source radiographs of one study, one per finding.
        findings: what boneflow found, matched to ``sources`` by SOP Instance UID.
        secondary_captures: the Grad-CAM SC of each analysed image, by source SOP UID.
        series_instance_uid: the new series of the report.
        series_number: its series number.
        series_description: names boneflow and the model versions (at most 64 characters).
        predecessor: the SR this one supersedes on re-analysis (Predecessor Documents).
        sop_instance_uid: a UID to use; a new one by default.
        ae_title: our AE title, recorded as the observer device's name.

    Returns:
        A validated Comprehensive SR dataset: complete, unverified.

    Raises:
        ValueError: the findings and sources do not match one to one.
    """
    sources = [header_of(ds) for ds in sources]  # highdicom copies what it is given
    captures = {uid: header_of(sc) for uid, sc in secondary_captures.items()}
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    if len(by_uid) != len(sources) or sorted(by_uid) != sorted(
        f.sop_instance_uid for f in findings
    ):
        raise ValueError("findings and sources must match one to one by SOP Instance UID")
    groups: list[
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
        | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = []
    for number, finding in enumerate(findings, start=1):
        source = by_uid[finding.sop_instance_uid]
        if finding.status is FindingStatus.ANALYSED:
            sc = captures.get(finding.sop_instance_uid)
            groups.append(_analysed_group(number, source, finding, sc))
        else:
            groups.append(_not_analysed_group(number, source, finding))
    with names_copied_as_sent():
        report = hd.sr.MeasurementReport(
            observation_context=_observation_context(ae_title),
            procedure_reported=PROCEDURE_REPORTED,
            imaging_measurements=groups,
            title=codes.DCM.ImagingMeasurementReport,
            referenced_images=[_library_header(ds) for ds in sources],
        )
        sr = hd.sr.ComprehensiveSR(
            evidence=[*sources, *captures.values()],
            content=report[0],
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid or generate_uid(),
            instance_number=1,
            manufacturer=MANUFACTURER,
            is_complete=True,
            is_final=False,
            is_verified=False,
            previous_versions=[predecessor] if predecessor is not None else None,
        )
    _describe(sr, series_description)
    log.debug("built SR %s with %d finding groups", sr.SOPInstanceUID, len(groups))
    return sr


def header_of(ds: Dataset) -> Dataset:
    """``ds`` without its pixel data: a shallow view sharing the other elements.

    The SR needs only the identities and study attributes of its evidence; handing
    highdicom whole images made it copy and scan megabytes of pixels per object.
    """
    if PIXEL_DATA not in ds:
        return ds
    header = Dataset({e.tag: e for e in ds.elements() if e.tag != PIXEL_DATA})
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        header.file_meta = meta
    return header


def _observation_context(ae_title: str) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_uid(ae_title),
        name=ae_title,
        manufacturer_name=MANUFACTURER,
        model_name=f"{PRODUCT_NAME} {__version__}",
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device
    )
    return hd.sr.ObservationContext(observer_person_context=None, observer_device_context=observer)


def _tracking(number: int, source: Dataset, finding: Finding) -> hd.sr.TrackingIdentifier:
    # Deterministic per (source image, number): a re-analysis tracks the same finding.
    uid = generate_uid(entropy_srcs=[PRODUCT_NAME, "finding", str(source.SOPInstanceUID)])
    label = f"Finding {number}: fracture, {finding.body_part or 'unknown part'}"
    return hd.sr.TrackingIdentifier(uid=uid, identifier=label[:64])


def _finding_sites(finding: Finding) -> list[hd.sr.FindingSite]:
    code = BODY_PART_CODES.get(finding.body_part or "")
    if code is None:
        return []
    laterality = LATERALITY_CODES.get(finding.laterality or "")
    return [hd.sr.FindingSite(anatomic_location=code, laterality=laterality)]


def _algorithm(finding: Finding) -> hd.sr.AlgorithmIdentification:
    model = finding.fracture_model
    parameters = [f"router {finding.router}"]
    if finding.threshold is not None:
        parameters.append(f"threshold {finding.threshold:.4f}")
    return hd.sr.AlgorithmIdentification(
        name=model.name if model else finding.router.name,
        version=model.version if model else finding.router.version,
        parameters=parameters,
        manufacturer=MANUFACTURER,
    )


def _analysed_group(
    number: int, source: Dataset, finding: Finding, sc: Dataset | None
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    algorithm = _algorithm(finding)
    sites = _finding_sites(finding)
    measurements = []
    if finding.fracture_probability is not None:
        measurements.append(
            hd.sr.Measurement(
                name=PROBABILITY,
                value=float(finding.fracture_probability),
                unit=NO_UNITS,
                algorithm_id=algorithm,
                finding_sites=sites or None,
            )
        )
    if finding.threshold is not None:
        measurements.append(
            hd.sr.Measurement(
                name=OPERATING_THRESHOLD,
                value=float(finding.threshold),
                unit=NO_UNITS,
                algorithm_id=algorithm,
            )
        )
    if finding.fracture_present is True:
        decision = PRESENT
    elif finding.fracture_present is False:
        decision = ABSENT
    else:
        decision = INDETERMINATE
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(number, source, finding),
        referenced_region=_region(source, finding),
        finding_type=FRACTURE,
        algorithm_id=algorithm,
        finding_sites=sites or None,
        measurements=measurements or None,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=FRACTURE, value=decision)],
    )
    if sc is not None:
        group[0].ContentSequence.append(
            hd.sr.ImageContentItem(
                name=ILLUSTRATION,
                referenced_sop_class_uid=sc.SOPClassUID,
                referenced_sop_instance_uid=sc.SOPInstanceUID,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    return group


def _not_analysed_group(
    number: int, source: Dataset, finding: Finding
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(number, source, finding),
        finding_type=FRACTURE,
        algorithm_id=_algorithm(finding),
        finding_sites=_finding_sites(finding) or None,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=FRACTURE, value=NOT_DONE)],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )
    reason = finding.reason or "not analysed"
    if finding.body_part:
        reason = f"{reason} (router: {finding.body_part}, {finding.body_part_confidence:.2f})"
    group[0].ContentSequence.append(
        hd.sr.TextContentItem(
            name=NOT_ANALYSED_REASON,
            value=reason[:1024],
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    return group


def _region(source: Dataset, finding: Finding) -> hd.sr.ImageRegion:
    """The Grad-CAM hot spot, or the whole analysed image, as a closed POLYLINE."""
    rows, cols = int(source.Rows), int(source.Columns)
    top, left, bottom, right = 0, 0, rows, cols
    box = finding.hotspot
    if box is not None:  # end-exclusive pixel indices are pixel-edge coordinates (C.18.6.1.1)
        clipped = (
            max(0, box.row_min),
            max(0, box.col_min),
            min(rows, box.row_max),
            min(cols, box.col_max),
        )
        if clipped[2] > clipped[0] and clipped[3] > clipped[1]:  # else: no area, whole image
            top, left, bottom, right = clipped
        else:
            log.warning("%s: hot spot %s lies outside the image", finding.sop_instance_uid, box)
    corners = [(left, top), (right, top), (right, bottom), (left, bottom), (left, top)]
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=np.array(corners, dtype=np.float64),
        source_image=hd.sr.SourceImageForRegion.from_source_image(source),
    )


def _library_header(source: Dataset) -> Dataset:
    """The source as the Image Library sees it.

    highdicom describes a projection radiograph (TID 1603) from its Patient Orientation
    and Imager Pixel Spacing and fails without them; many CRs lack the spacing. Such an
    image is listed without the TID 1603 descriptors rather than with invented values.
    """
    orientation = source.get("PatientOrientation")
    spacing = source.get("ImagerPixelSpacing")
    complete = (
        orientation is not None
        and not isinstance(orientation, str)
        and len(orientation) == 2
        and spacing is not None
        and len(spacing) == 2
    )
    if complete:
        return source
    header = Dataset()  # a new dataset: the caller's source must stay untouched
    for keyword in ("SOPClassUID", "SOPInstanceUID", "Rows", "Columns", "FrameOfReferenceUID"):
        if keyword in source:
            setattr(header, keyword, source[keyword].value)
    header.Modality = "OT"  # only chooses highdicom's descriptors; the SOP class says CR/DX
    return header


def _describe(sr: Dataset, series_description: str) -> None:
    sr.SpecificCharacterSet = "ISO_IR 192"
    sr.SeriesDescription = series_description[:64]
    sr.ManufacturerModelName = PRODUCT_NAME
    sr.SoftwareVersions = __version__
    scheme = Dataset()
    scheme.CodingSchemeDesignator = PRIVATE_SCHEME
    scheme.CodingSchemeName = "boneflow private codes"
    scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
    sr.CodingSchemeIdentificationSequence = [scheme]

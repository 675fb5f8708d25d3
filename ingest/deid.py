"""De-identification helpers: keyed pseudonyms, the PS3.15 basic-profile keyword list, and a
whitelist of acquisition header fields that are safe to keep in stores, logs and model cards.

Nothing in a store names a person or an exam: subjects and series are keyed hashes
(:func:`pseudonym`), and the only DICOM header content that is copied is
:func:`safe_header_fields` (a whitelist, not a blacklist), with strings scrubbed of anything
that looks like a date or a DICOM person name as a defence in depth.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "CLEANED_DESCRIPTORS",
    "DEVELOPMENT_KEY_SOURCE",
    "KEY_ENV",
    "PHI_KEYWORDS",
    "SAFE_FIELDS",
    "load_key",
    "pseudonym",
    "safe_header_fields",
    "scan_for_phi",
    "scrub_identities",
    "scrub_text",
]

KEY_ENV = "QSNET_PSEUDONYM_KEY"
DEVELOPMENT_KEY_SOURCE = "development-key"
MIN_KEY_BYTES = 16
# Public on purpose: pseudonyms made with it are reproducible by anyone, which is fine for
# the phantom and wrong for real patients (callers must warn when load_key returns it).
_DEVELOPMENT_KEY = b"qsnet-development-key: NOT for real patient data"


def pseudonym(key: bytes, *parts: str, prefix: str = "sub-") -> str:
    """``prefix`` + 12 hex digits of HMAC-SHA256(key, parts). The parts are length-prefixed
    before hashing, so ("ab", "c") and ("a", "bc") differ. Stable for the same key and parts;
    without the key it can be neither reversed nor recomputed from the real ID."""
    if not isinstance(key, (bytes, bytearray)) or not key:
        raise ValueError("pseudonym: key must be non-empty bytes")
    if not parts:
        raise ValueError("pseudonym: need at least one part")
    msg = bytearray()
    for p in parts:
        if not isinstance(p, str):
            raise TypeError(f"pseudonym: parts must be str, got {type(p).__name__}")
        b = p.encode("utf-8")
        msg += len(b).to_bytes(4, "big") + b
    return prefix + hmac.new(bytes(key), bytes(msg), hashlib.sha256).hexdigest()[:12]


def load_key(explicit: str | os.PathLike[str] | None = None) -> tuple[bytes, str]:
    """The pseudonym key and where it came from, in this order:

    1. ``$QSNET_PSEUDONYM_KEY`` (the key itself, UTF-8) -> source ``"env:QSNET_PSEUDONYM_KEY"``;
    2. the key file ``explicit`` (its bytes, surrounding whitespace stripped) -> ``"file:<path>"``;
    3. the built-in development key -> ``"development-key"``: callers must warn (fine for the
       phantom, not for real patient data).

    A key from 1 or 2 shorter than 16 bytes, or a key file that cannot be read, is an error
    (never a silent fall back to the development key).
    """
    env = os.environ.get(KEY_ENV, "").strip()
    if env:
        key, source = env.encode("utf-8"), f"env:{KEY_ENV}"
    elif explicit is not None:
        path = Path(explicit)
        try:
            key = path.read_bytes().strip()
        except OSError as exc:
            raise ValueError(f"{path}: cannot read the pseudonym key file ({exc.strerror or exc})") from None
        source = f"file:{path}"
    else:
        return _DEVELOPMENT_KEY, DEVELOPMENT_KEY_SOURCE
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"pseudonym key from {source} is {len(key)} bytes; use at least {MIN_KEY_BYTES} random bytes")
    return key, source


# DICOM keywords of every attribute in PS3.15 (2024b) Table E.1-1 that the Basic Application
# Level Confidentiality Profile removes, empties or replaces (actions D, Z, X, U and their
# combinations): names, IDs, birth date, addresses, institution, physicians, operators,
# accession and study IDs, dates and times, UIDs, free-text comments and descriptions,
# device serial numbers and labels ... Repeating-group attributes (overlays, curves) are not
# listed: nothing here copies them. SeriesDescription and ProtocolName are in the profile
# (see CLEANED_DESCRIPTORS): they are kept only after scrub_text, as the profile's Clean
# Descriptors Option allows.
PHI_KEYWORDS: frozenset[str] = frozenset(
    """
    AccessionNumber AcquisitionComments AcquisitionContextSequence AcquisitionDate
    AcquisitionDateTime AcquisitionDeviceProcessingDescription AcquisitionFieldOfViewLabel
    AcquisitionProtocolDescription AcquisitionTime AcquisitionUID ActualHumanPerformersSequence
    AdditionalPatientHistory AddressTrial AdmissionID AdmittingDate
    AdmittingDiagnosesCodeSequence AdmittingDiagnosesDescription AdmittingTime
    AffectedSOPInstanceUID Allergies AnnotationGroupDescription AnnotationGroupLabel
    AnnotationGroupUID ApprovalStatusDateTime Arbitrary AssertionDateTime
    AssertionExpirationDateTime AttributeModificationDateTime AuthorObserverSequence
    BarcodeValue BeamDescription BeamHoldTransitionDateTime BolusDescription BranchOfService
    CalibrationDate CalibrationDateTime CalibrationTime CameraOwnerName CassetteID
    CertificateOfSigner CertifiedTimestamp ClinicalTrialCoordinatingCenterName
    ClinicalTrialProtocolEthicsCommitteeApprovalNumber ClinicalTrialProtocolEthicsCommitteeName
    ClinicalTrialProtocolID ClinicalTrialProtocolName ClinicalTrialSeriesDescription
    ClinicalTrialSeriesID ClinicalTrialSiteID ClinicalTrialSiteName ClinicalTrialSponsorName
    ClinicalTrialSubjectID ClinicalTrialSubjectReadingID ClinicalTrialTimePointDescription
    ClinicalTrialTimePointID CommentsOnRadiationDose CommentsOnThePerformedProcedureStep
    CompensatorDescription ConcatenationUID ConceptualVolumeCombinationDescription
    ConceptualVolumeDescription ConceptualVolumeUID
    ConfidentialityConstraintOnPatientDataDescription ConstituentConceptualVolumeUID
    ConsultingPhysicianIdentificationSequence ConsultingPhysicianName ContainerComponentID
    ContainerDescription ContainerIdentifier ContentCreatorIdentificationCodeSequence
    ContentCreatorName ContentDate ContentSequence ContentTime ContextGroupLocalVersion
    ContextGroupVersion ContrastBolusAgent ContrastBolusStartTime ContrastBolusStopTime
    ContributionDateTime ContributionDescription CountryOfResidence CreationDate CreationTime
    CurrentObserverTrial CurrentPatientLocation CurveDate CurveTime
    CustodialOrganizationSequence DataSetTrailingPadding Date
    DateOfDocumentOrVerbalTransactionTrial DateOfInstallation DateOfLastCalibration
    DateOfLastDetectorCalibration DateOfManufacture DateOfSecondaryCapture DateTime
    DateTimeOfLastCalibration DecayCorrectionDateTime DecompositionDescription
    DerivationDescription DestinationAE DetectorID DeviceAlternateIdentifier DeviceDescription
    DeviceLabel DeviceSerialNumber DeviceSettingDescription DeviceUID DigitalSignatureDateTime
    DigitalSignatureUID DigitalSignaturesSequence DimensionOrganizationUID DischargeDate
    DischargeDiagnosisDescription DischargeTime DisplacementReferenceLabel DistributionAddress
    DistributionName DoseReferenceDescription DoseReferenceUID DosimetricObjectiveUID
    EffectiveDateTime EncapsulatedDocument EndAcquisitionDateTime EntityDescription EntityLabel
    EntityLongLabel EntityName EquipmentFrameOfReferenceDescription
    EthicsCommitteeApprovalEffectivenessEndDate EthicsCommitteeApprovalEffectivenessStartDate
    EthnicGroup ExclusionStartDateTime ExpectedCompletionDateTime FailedSOPInstanceUIDList
    FiducialUID FillerOrderNumberImagingServiceRequest FilterLookupTableDescription
    FindingsGroupRecordingDateTrial FindingsGroupRecordingTimeTrial FirstTreatmentDate
    FixationDeviceDescription FlowIdentifier FlowIdentifierSequence FractionGroupDescription
    FractionationNotes FrameAcquisitionDateTime FrameComments FrameOfReferenceUID
    FrameOriginTimestamp FrameReferenceDateTime FunctionalSyncPulse GPSAltitude GPSAltitudeRef
    GPSAreaInformation GPSDOP GPSDateStamp GPSDestBearing GPSDestBearingRef GPSDestDistance
    GPSDestDistanceRef GPSDestLatitude GPSDestLatitudeRef GPSDestLongitude GPSDestLongitudeRef
    GPSDifferential GPSImgDirection GPSImgDirectionRef GPSLatitude GPSLatitudeRef GPSLongitude
    GPSLongitudeRef GPSMapDatum GPSMeasureMode GPSProcessingMethod GPSSatellites GPSSpeed
    GPSSpeedRef GPSStatus GPSTimeStamp GPSTrack GPSTrackRef GPSVersionID GantryID GeneratorID
    GraphicAnnotationSequence HL7DocumentEffectiveTime HangingProtocolCreationDateTime
    HumanPerformerName HumanPerformerOrganization IconImageSequence IdentifyingComments
    ImageComments ImagePresentationComments ImagingServiceRequestComments
    ImpedanceMeasurementDateTime Impressions InformationIssueDateTime InstanceCoercionDateTime
    InstanceCreationDate InstanceCreationTime InstanceCreatorUID InstanceOriginStatus
    InstitutionAddress InstitutionCodeSequence InstitutionName InstitutionalDepartmentName
    InstitutionalDepartmentTypeCodeSequence InstructionPerformedDateTime
    InsurancePlanIdentification IntendedFractionStartTime IntendedPhaseEndDate
    IntendedPhaseStartDate IntendedRecipientsOfResultsIdentificationSequence InterlockDateTime
    InterlockDescription InterlockOriginDescription InterpretationApprovalDate
    InterpretationApprovalTime InterpretationApproverSequence InterpretationAuthor
    InterpretationDiagnosisDescription InterpretationID InterpretationIDIssuer
    InterpretationRecordedDate InterpretationRecordedTime InterpretationRecorder
    InterpretationText InterpretationTranscriber InterpretationTranscriptionDate
    InterpretationTranscriptionTime InterventionDrugStartTime InterventionDrugStopTime
    IrradiationEventUID IssueDateOfImagingServiceRequest IssueTimeOfImagingServiceRequest
    IssuerOfAdmissionID IssuerOfAdmissionIDSequence IssuerOfClinicalTrialProtocolID
    IssuerOfClinicalTrialSeriesID IssuerOfClinicalTrialSiteID IssuerOfClinicalTrialSubjectID
    IssuerOfClinicalTrialSubjectReadingID IssuerOfClinicalTrialTimePointID IssuerOfPatientID
    IssuerOfServiceEpisodeID IssuerOfServiceEpisodeIDSequence
    IssuerOfTheContainerIdentifierSequence IssuerOfTheSpecimenIdentifierSequence LabelText
    LargePaletteColorLookupTableUID LastMenstrualDate LensMake LensModel LensSerialNumber
    LensSpecification LongDeviceDescription MAC MakerNote ManufacturerDeviceClassUID
    ManufacturerDeviceIdentifier MediaStorageSOPInstanceUID MedicalAlerts MedicalRecordLocator
    MilitaryRank ModifiedAttributesSequence ModifiedImageDate ModifiedImageDescription
    ModifiedImageTime ModifyingDeviceID ModifyingSystem MostRecentTreatmentDate
    MultienergyAcquisitionDescription MultiplexGroupUID NameOfPhysiciansReadingStudy
    NamesOfIntendedRecipientsOfResults NetworkID NonconformingDataElementValue
    NonconformingModifiedAttributesSequence ObservationDateTime ObservationDateTrial
    ObservationStartDateTime ObservationSubjectUIDTrial ObservationTimeTrial ObservationUID
    Occupation OperatorIdentificationSequence OperatorsName OrderCallbackPhoneNumber
    OrderCallbackTelecomInformation OrderEnteredBy OrderEntererLocation
    OriginalAttributesSequence Originator OtherClinicalTrialProtocolIDsSequence OtherPatientIDs
    OtherPatientIDsSequence OtherPatientNames OverlayDate OverlayTime OverrideDateTime
    PaletteColorLookupTableUID ParticipantSequence ParticipationDateTime PatientAddress
    PatientAge PatientBirthDate PatientBirthName PatientBirthTime PatientComments PatientID
    PatientInstitutionResidence PatientInsurancePlanCodeSequence PatientMotherBirthName
    PatientName PatientPrimaryLanguageCodeSequence PatientPrimaryLanguageModifierCodeSequence
    PatientReligiousPreference PatientSetupPhotoDescription PatientSetupUID PatientSex
    PatientSexNeutered PatientSize PatientState PatientTelecomInformation
    PatientTelephoneNumbers PatientTransportArrangements
    PatientTreatmentPreparationMethodDescription
    PatientTreatmentPreparationProcedureParameterDescription PatientWeight PerformedLocation
    PerformedProcedureStepDescription PerformedProcedureStepEndDate
    PerformedProcedureStepEndDateTime PerformedProcedureStepEndTime PerformedProcedureStepID
    PerformedProcedureStepStartDate PerformedProcedureStepStartDateTime
    PerformedProcedureStepStartTime PerformedStationAETitle
    PerformedStationGeographicLocationCodeSequence PerformedStationName
    PerformedStationNameCodeSequence PerformingPhysicianIdentificationSequence
    PerformingPhysicianName PersonAddress PersonIdentificationCodeSequence PersonName
    PersonTelecomInformation PersonTelephoneNumbers PhysicianApprovingInterpretation
    PhysiciansOfRecord PhysiciansOfRecordIdentificationSequence
    PhysiciansReadingStudyIdentificationSequence PlacerOrderNumberImagingServiceRequest PlateID
    PositionAcquisitionTemplateDescription PositionAcquisitionTemplateName PreMedication
    PregnancyStatus PrescriptionDescription PrescriptionNotes PrescriptionNotesSequence
    PresentationCreationDate PresentationCreationTime PresentationDisplayCollectionUID
    PresentationSequenceCollectionUID PriorTreatmentDoseDescription
    ProcedureStepCancellationDateTime ProductExpirationDateTime ProtocolName PyramidDescription
    PyramidLabel PyramidUID ROICreatorSequence ROIDateTime ROIDescription
    ROIGenerationDescription ROIInterpreter ROIInterpreterSequence ROIName
    ROIObservationDateTime ROIObservationDescription ROIObservationLabel
    RTAccessoryDeviceSlotID RTAccessoryHolderSlotID RTPhysicianIntentNarrative RTPlanDate
    RTPlanDescription RTPlanLabel RTPlanName RTPlanTime RTPrescriptionLabel RTToleranceSetLabel
    RTTreatmentApproachLabel RTTreatmentPhaseUID RadiationDoseIdentificationLabel
    RadiationDoseInVivoMeasurementLabel RadiationGenerationModeDescription
    RadiationGenerationModeLabel RadiopharmaceuticalStartDateTime RadiopharmaceuticalStartTime
    RadiopharmaceuticalStopDateTime RadiopharmaceuticalStopTime ReasonForOmissionDescription
    ReasonForRequestedProcedureCodeSequence ReasonForStudy ReasonForSuperseding
    ReasonForTheAttributeModification ReasonForTheImagingServiceRequest
    ReasonForTheRequestedProcedure ReasonForVisit ReasonForVisitCodeSequence ReceivingAE
    RecordedRTControlPointDateTime ReferencedConceptualVolumeUID ReferencedDateTime
    ReferencedDigitalSignatureSequence ReferencedDoseReferenceUID
    ReferencedDosimetricObjectiveUID ReferencedFiducialsUID ReferencedFrameOfReferenceUID
    ReferencedGeneralPurposeScheduledProcedureStepTransactionUID ReferencedImageSequence
    ReferencedObservationUIDTrial ReferencedPatientAliasSequence ReferencedPatientPhotoSequence
    ReferencedPatientSequence ReferencedPerformedProcedureStepSequence
    ReferencedSOPInstanceMACSequence ReferencedSOPInstanceUID ReferencedSOPInstanceUIDInFile
    ReferencedStudySequence ReferencedTreatmentPositionGroupUID ReferringPhysicianAddress
    ReferringPhysicianIdentificationSequence ReferringPhysicianName
    ReferringPhysicianTelephoneNumbers RegionOfResidence RelatedFrameOfReferenceUID
    RequestAttributesSequence RequestedContrastAgent RequestedProcedureComments
    RequestedProcedureDescription RequestedProcedureID RequestedProcedureLocation
    RequestedSOPInstanceUID RequestedSeriesDescription RequestingAE RequestingPhysician
    RequestingService RespiratoryMotionCompensationTechniqueDescription ResponsibleOrganization
    ResponsiblePerson ResultsComments ResultsDistributionListSequence ResultsID ResultsIDIssuer
    RetrieveAETitle ReviewDate ReviewTime ReviewerName SOPAuthorizationDateTime SOPInstanceUID
    SafePositionExitDate SafePositionExitTime SafePositionReturnDate SafePositionReturnTime
    ScheduledAdmissionDate ScheduledAdmissionTime ScheduledDischargeDate ScheduledDischargeTime
    ScheduledHumanPerformersSequence ScheduledPatientInstitutionResidence
    ScheduledPerformingPhysicianIdentificationSequence ScheduledPerformingPhysicianName
    ScheduledProcedureStepDescription ScheduledProcedureStepEndDate
    ScheduledProcedureStepEndTime ScheduledProcedureStepExpirationDateTime
    ScheduledProcedureStepID ScheduledProcedureStepLocation
    ScheduledProcedureStepModificationDateTime ScheduledProcedureStepStartDate
    ScheduledProcedureStepStartDateTime ScheduledProcedureStepStartTime ScheduledStationAETitle
    ScheduledStationGeographicLocationCodeSequence ScheduledStationName
    ScheduledStationNameCodeSequence ScheduledStudyLocation ScheduledStudyLocationAETitle
    ScheduledStudyStartDate ScheduledStudyStartTime ScheduledStudyStopDate
    ScheduledStudyStopTime SelectorAEValue SelectorASValue SelectorDAValue SelectorDTValue
    SelectorLOValue SelectorLTValue SelectorOBValue SelectorPNValue SelectorSHValue
    SelectorSTValue SelectorTMValue SelectorUNValue SelectorURValue SelectorUTValue SeriesDate
    SeriesDescription SeriesInstanceUID SeriesTime ServiceEpisodeDescription ServiceEpisodeID
    SetupTechniqueDescription ShieldingDeviceDescription SlideIdentifier SmokingStatus
    SourceConceptualVolumeUID SourceEndDateTime SourceFrameOfReferenceUID SourceIdentifier
    SourceImageSequence SourceManufacturer SourceOfPreviousValues SourceSerialNumber
    SourceStartDateTime SourceStrengthReferenceDate SourceStrengthReferenceTime SpecialNeeds
    SpecimenAccessionNumber SpecimenDetailedDescription SpecimenIdentifier
    SpecimenPreparationSequence SpecimenShortDescription SpecimenUID StartAcquisitionDateTime
    StationAETitle StationName StorageMediaFileSetUID StructureSetDate StructureSetDescription
    StructureSetLabel StructureSetName StructureSetTime StudyArrivalDate StudyArrivalTime
    StudyComments StudyCompletionDate StudyCompletionTime StudyDate StudyDescription StudyID
    StudyIDIssuer StudyInstanceUID StudyReadDate StudyReadTime StudyTime StudyVerifiedDate
    StudyVerifiedTime SubstanceAdministrationDateTime SynchronizationFrameOfReferenceUID
    TargetUID TelephoneNumberTrial TemplateExtensionCreatorUID TemplateExtensionOrganizationUID
    TemplateLocalVersion TemplateVersion TextComments TextString Time
    TimeOfDocumentCreationOrVerbalTransactionTrial TimeOfLastCalibration
    TimeOfLastDetectorCalibration TimeOfSecondaryCapture TimezoneOffsetFromUTC TopicAuthor
    TopicKeywords TopicSubject TopicTitle TrackingUID TransactionUID
    TransducerIdentificationSequence TreatmentControlPointDate TreatmentControlPointTime
    TreatmentDate TreatmentMachineName TreatmentPositionGroupLabel TreatmentPositionGroupUID
    TreatmentSessionUID TreatmentSite TreatmentSites TreatmentTechniqueNotes TreatmentTime
    TreatmentToleranceViolationDateTime TreatmentToleranceViolationDescription UDISequence UID
    UniqueDeviceIdentifier UserContentLabel UserContentLongLabel
    VerbalSourceIdentifierCodeSequenceTrial VerbalSourceTrial VerificationDateTime
    VerifyingObserverIdentificationCodeSequence VerifyingObserverName VerifyingObserverSequence
    VerifyingOrganization VisitComments WaveformFilterDescription XRayDetectorID
    XRayDetectorLabel XRaySourceID
    """.split()
)

# In the basic profile, but kept (scrubbed) under the Clean Descriptors Option: a site's
# role detection needs them, and they carry no identity once dates and names are removed.
CLEANED_DESCRIPTORS: frozenset[str] = frozenset({"SeriesDescription", "ProtocolName"})

# DICOM keyword -> (store attribute name, kind). The store contract's names for the
# sequence parameters (vendor, model, tr, te, ti, flip_angle, sequence_name) are used as is.
SAFE_FIELDS: dict[str, tuple[str, str]] = {
    "Modality": ("modality", "str"),
    "Manufacturer": ("vendor", "str"),
    "ManufacturerModelName": ("model", "str"),
    "SoftwareVersions": ("software_versions", "strs"),
    "MagneticFieldStrength": ("field_strength", "float"),
    "SeriesDescription": ("series_description", "str"),
    "ProtocolName": ("protocol_name", "str"),
    "SeriesNumber": ("series_number", "int"),
    "SequenceName": ("sequence_name", "str"),
    "ScanningSequence": ("scanning_sequence", "strs"),
    "SequenceVariant": ("sequence_variant", "strs"),
    "ScanOptions": ("scan_options", "strs"),
    "MRAcquisitionType": ("mr_acquisition_type", "str"),
    "ImageType": ("image_type", "strs"),
    "RepetitionTime": ("tr", "float"),
    "EchoTime": ("te", "float"),
    "InversionTime": ("ti", "float"),
    "FlipAngle": ("flip_angle", "float"),
    "EchoTrainLength": ("echo_train_length", "int"),
    "NumberOfAverages": ("number_of_averages", "float"),
    "ImagingFrequency": ("imaging_frequency", "float"),
    "PixelBandwidth": ("pixel_bandwidth", "float"),
    "ReceiveCoilName": ("receive_coil", "str"),
    "PatientPosition": ("patient_position", "str"),
    "Rows": ("rows", "int"),
    "Columns": ("columns", "int"),
    "PixelSpacing": ("pixel_spacing", "floats"),
    "SliceThickness": ("slice_thickness", "float"),
    "SpacingBetweenSlices": ("spacing_between_slices", "float"),
}

_MONTHS = r"(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?"
_SCRUB_PATTERNS = [
    # a DICOM person name (Family^Given^Middle...) anywhere in the text
    re.compile(r"\S*\^\S*"),
    # YYYYMMDD, YYYY-MM-DD, YYYY.MM.DD, YYYY/MM/DD, optionally followed by a time (DICOM DT)
    re.compile(
        r"(?<!\d)(?:19|20)\d{2}([-./]?)(?:0[1-9]|1[0-2])\1(?:0[1-9]|[12]\d|3[01])"
        r"(?:[T _-]?[0-2]\d:?[0-5]\d(?::?[0-5]\d(?:\.\d+)?)?)?(?!\d)"
    ),
    # DD.MM.YYYY, MM/DD/YYYY, DD-MM-YYYY (4-digit year, so version numbers stay)
    re.compile(r"(?<![\d.])\d{1,2}([-./])\d{1,2}\1(?:19|20)\d{2}(?![\d.])"),
    # 12 Mar 2023, 12-Mar-2023, Mar 12, 2023
    re.compile(rf"(?i)(?<!\w)\d{{1,2}}[ -]?{_MONTHS}[ ,-]*(?:19|20)\d{{2}}(?!\d)"),
    re.compile(rf"(?i)(?<!\w){_MONTHS} \d{{1,2}},? (?:19|20)\d{{2}}(?!\d)"),
]


def scrub_text(text: str, identities: Iterable[str] = ()) -> str:
    """``text`` without anything that looks like a date or a DICOM person name, nor (see
    :func:`scrub_identities`) any of ``identities``: the exam's own patient ID, name, birth
    date and accession number, which the patterns cannot know (an operator types "Jane Doe"
    or the MRN into a series description)."""
    text = scrub_identities(text, identities)
    for pat in _SCRUB_PATTERNS:
        text = pat.sub(" ", text)
    return " ".join(text.split())


def scrub_identities(text: str, identities: Iterable[str]) -> str:
    """``text`` without ``identities``, case-insensitively, also in the variants
    :func:`scan_for_phi` looks for ("Jane Doe" and "JaneDoe" for ``Doe^Jane``, each ``=`` group of
    an ideographic or phonetic name, formatted birth dates), in Unicode NFC whatever form either
    came in. A whole identity goes anywhere in a word, not only as a whole word: an ID glued to
    a protocol name ("t1_MRN123") is still an ID. ASCII strings under 3 characters are left
    alone: removing every "1" of a one-digit ID would only mangle the text, and identifies no
    one; a 2-character name written in ideographs (a family name) is a name, and goes. The
    single words of a name (a PN component, or a :class:`PersonName` written as words) and of a
    :class:`PlaceName` go too, as whole tokens only (:func:`_bounded`), less the particles and
    generic words their kind keeps (``_NAME_PARTICLES``, ``_PLACE_WORDS``)."""
    pat = _identity_pattern(identities) if text else None
    if pat is None:
        return text
    return " ".join(pat.sub(" ", unicodedata.normalize("NFC", text)).split())


def _long_enough(v: str) -> bool:
    v = v.strip()
    return len(v) >= 3 or (len(v) == 2 and not v.isascii() and v.isalpha())


def _values(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        return [value]
    return list(value)


def _convert(value: Any, kind: str) -> Any:
    vals = [v for v in _values(value) if v is not None and str(v).strip() != ""]
    if not vals:
        return None
    if kind in ("str", "strs"):
        out = [scrub_text(v.decode("ascii", "replace") if isinstance(v, bytes) else str(v)) for v in vals]
        out = [s for s in out if s]
        if not out:
            return None
        return out if kind == "strs" else "\\".join(out)
    if kind in ("float", "floats"):
        nums = [float(v) for v in vals]
        if any(n != n or n in (float("inf"), float("-inf")) for n in nums):
            return None
        return nums if kind == "floats" else nums[0]
    if kind == "int":
        return int(float(vals[0]))
    raise ValueError(f"unknown kind {kind!r}")


def safe_header_fields(ds: Any) -> dict[str, Any]:
    """The whitelisted acquisition fields of a pydicom Dataset, as JSON-native values under
    store attribute names (``vendor``, ``model``, ``tr``, ``te``, ``ti``, ``flip_angle``,
    ``sequence_name``, ``pixel_spacing``, ...). Absent, empty or unparsable fields are left
    out; strings are scrubbed (:func:`scrub_text`). Nothing else of the header is copied."""
    out: dict[str, Any] = {}
    for keyword, (name, kind) in SAFE_FIELDS.items():
        try:
            raw = ds.get(keyword)
        except Exception:  # a malformed element: leave it out, never fail ingest over it
            continue
        raw = getattr(raw, "value", raw)  # a DataElement from a plain mapping
        try:
            value = _convert(raw, kind)
        except (TypeError, ValueError):
            continue
        if value is not None:
            out[name] = value
    return out


class PlaceName(str):
    """An institution's name, department or address (InstitutionName, InstitutionAddress,
    InstitutionalDepartmentName) as an identity to scrub: its distinctive words go on their own
    too, its generic ones (:data:`_PLACE_WORDS`) stay."""

    __slots__ = ()


class PersonName(str):
    """A person's name (a PN value) as an identity to scrub: each of its words goes on its own,
    also when it was typed as plain words ("JANE DOE") rather than with ``^`` separators; only
    particles (:data:`_NAME_PARTICLES`) stay. A plain ``str`` with ``^`` is read as one too."""

    __slots__ = ()


# Particles of names that identify no one on their own and are common words ("van", "de", "al").
_NAME_PARTICLES = frozenset("""
    van von der den ter ten de del della dei di da du la le les dos das bin bint ibn al el ben mac
""".split())

# Words of an institution's name or address that identify no one on their own: scrubbing them
# would only mangle descriptions ("Brain" of a "Brain Institute" from "BRAIN ROUTINE"). MR
# vocabulary is here too: an institution word that is also a sequence's name or a label of
# one ("Dixon", "Vista", "Post" of "Boston Post Road") stays, or every description of the
# site would lose it; so are words of ingest's own reasons. Names never use this list: a
# surname (Park, White, Green) is a name whatever else it means.
_PLACE_WORDS = _NAME_PARTICLES | frozenset("""
    hospital hospitals hopital hôpital hospitalier spital krankenhaus klinik kliniken klinikum
    university universitat universität universitaire universitario universitaria universidad
    università universita univ hosp college school faculty campus institute institut instituto
    istituto medical medicine medizin médical medico med center centre centro centrum zentrum ctr
    clinic clinics clinical clinique clinica health healthcare care imaging radiology radiologie
    radiologia neuroradiology neurology neuro neuroscience neurosciences brain spine head cancer
    oncology tumour tumor heart research diagnostic diagnostics department dept division unit
    service services general regional national community memorial royal children childrens women
    womens foundation trust nhs group system network inc ltd llc gmbh the and for der des die das
    und saint sainte san santa street road avenue ave lane drive boulevard blvd way place square
    suite ste str floor building north south east west upper lower new old city county state main
    central private public mri mrt irm scanner magnetic resonance image images computing map maps
    free wave vista dixon vibe space cube bravo flair swan swi propeller blade haste tse fse spgr
    tof pet mrac fusion fused diffusion perfusion localizer survey scout post pre sag cor ax tra
    axial sagittal coronal gad contrast star fat sat dark fluid bright blood time flight angio
    venous arterial phase mag magnitude real routine protocol study exam reading field echo frame
    frames slice slices series volume volumes pixel pixels header row rows column columns step
    steps range type number size order view file files data end part parts first last one two
    three other position positions missing high low long short left right top bottom front back
    not with from this that its are was has have all any can each more less than red green white
    black water bridge park hill gate
""".split())


def _words(text: str, common: frozenset) -> set[str]:
    """The distinctive words of a name or place written as several words ("Northgate" and
    "Eastport" of "Northgate University Hospital, 14 Harbour Road, Eastport"): an operator
    abbreviates a place to one word as readily as a patient to a family name. Numbers under
    5 digits (a house number) and the ``common`` words are left alone."""
    out = set()
    for w in re.findall(r"[^\W_]+", text):
        if w.casefold() in common or (w.isdigit() and len(w) < 5):
            continue
        if _long_enough(w):
            out.add(w)
    return out


def _word_variants(identity: str) -> set[str]:
    """The single words of a name or place, matched as whole tokens (:func:`_bounded`):
    each component of a PN value and each word of a multi-word component, or the words of a
    place. An identity of no such kind (an ID, a date) has none: "MRN" of "MRN-4471" is not
    a word of anyone's."""
    if not isinstance(identity, str):
        return set()
    is_place = isinstance(identity, PlaceName)
    if not (is_place or isinstance(identity, PersonName) or "^" in identity):
        return set()
    common = _PLACE_WORDS if is_place else _NAME_PARTICLES
    out: set[str] = set()
    for group in unicodedata.normalize("NFC", identity).split("="):
        parts = [group] if is_place else group.split("^")
        for part in (p.strip() for p in parts):
            if len(re.findall(r"[^\W_]+", part)) > 1:
                out |= _words(part, common)
            elif part and not is_place and _long_enough(part) and part.casefold() not in common:
                out.add(part)
    return out


def _wide(word: str) -> bool:
    return any(unicodedata.east_asian_width(ch) in "WF" for ch in word)


def _bounded(word: str) -> str:
    """``word`` as a whole token: not inside a longer word ("Ste" of "Suite 200" must not cut
    "Stealth", nor "Han" cut "enhanced"), while ``_``, digits and punctuation around it are
    separators ("Eastport_t2_tse"). A number must not be part of a longer number. Words in
    scripts written without spaces (Chinese, Japanese, Korean) are matched anywhere: there a
    name has no token boundary to look for."""
    e = re.escape(word)
    if _wide(word):
        return e
    if word.isdigit():
        return rf"(?<!\d){e}(?!\d)"
    if word.isalpha():
        return rf"(?<![^\W\d_]){e}(?![^\W\d_])"
    return rf"(?<![^\W_]){e}(?![^\W_])"


def _identity_pattern(identities: Iterable[str]) -> re.Pattern | None:
    whole: set[str] = set()
    words: set[str] = set()
    for ident in identities:
        whole.update(v for v in _variants(str(ident or "").strip()) if _long_enough(v))
        words.update(_word_variants(ident))   # the kind (PlaceName, PersonName) is the object's own
    folded = {v.casefold() for v in whole}
    alts = [(v, re.escape(v)) for v in whole] + [(w, _bounded(w)) for w in words if w.casefold() not in folded]
    if not alts:
        return None
    # longest first, so "Jane Doe" goes as a whole before "Jane" and "Doe" are looked for
    alts.sort(key=lambda a: (-len(a[0]), a[0]))
    return re.compile("|".join(a for _, a in alts), re.IGNORECASE)


def _variants(identity: str) -> set[str]:
    """Whole strings matched anywhere: the identity, each ``=`` group of a PN value, its
    names joined in the orders people write them, formatted dates."""
    identity = unicodedata.normalize("NFC", identity)
    if not identity:
        return set()
    v = {identity}
    # a PN value's alphabetic, ideographic and phonetic groups (PS3.5 6.2.1): each is a name
    for group in identity.split("="):
        group = group.strip()
        if not group:
            continue
        v.add(group)
        if "^" not in group:
            continue
        comps = [c.strip() for c in group.split("^") if c.strip()]
        # a component written in ideographs is matched anywhere (no spaces in that script);
        # others as whole tokens (_word_variants)
        v.update(c for c in comps if _long_enough(c) and _wide(c))
        if len(comps) >= 2:
            v.update({f"{comps[1]} {comps[0]}", f"{comps[0]} {comps[1]}", f"{comps[0]}, {comps[1]}",
                      # ideographic names are written without a space, family name first
                      f"{comps[0]}{comps[1]}", f"{comps[1]}{comps[0]}"})
    m = re.fullmatch(r"((?:19|20)\d{2})(\d{2})(\d{2})", identity)
    if m:
        y, mo, d = m.groups()
        v.update({f"{y}-{mo}-{d}", f"{y}/{mo}/{d}", f"{y}.{mo}.{d}", f"{d}.{mo}.{y}", f"{mo}/{d}/{y}", f"{d}/{mo}/{y}"})
    return v


def scan_for_phi(text: str, identities: list[str]) -> list[str]:
    """The identity strings (e.g. a patient name ``Doe^Jane``, ID, birth date ``19700101``,
    institution) that occur in ``text``, case-insensitively, also as the obvious variants (name
    components of 3+ characters, "Jane Doe", each `=` group, formatted dates) and as the single
    words the scrub removes (a distinctive word of a multi-word name or place, as a whole token).
    For tests and audits."""
    hay = unicodedata.normalize("NFC", text).casefold()
    found = []
    for ident in identities:
        value = str(ident).strip()
        if not value or value in found:
            continue
        if any(v.casefold() in hay for v in _variants(value)) or \
                any(re.search(_bounded(w.casefold()), hay) for w in _word_variants(ident)):
            found.append(value)
    return found

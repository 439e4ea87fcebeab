"""Issue 16 acceptance: every result object is conformant and carries its patient.

Each real source below is scored once per run (a module-wide cache) with the offline
scorer, ``dicom_node.score.score_run``, with ``parametric_map=True`` (and, for some
sources, ``jpeg=True``, and for the character-set cases with a model whose name is not
ASCII). Every object written (the SR, each Secondary Capture, each Parametric Map) is
then checked with real tools:

- dciodvfy (dicom3tools): no "Error" line that the source itself does not have;
- pixelmed's DicomSRValidator (libpixelmed-java, run by SRValidatorBatch.java):
  0 errors on the SR;
- the File Meta and the equipment name this project, never the libraries;
- the Patient and Study attributes of the source are carried identically;
- text is encoded in the declared Specific Character Set, and a non-ASCII model
  name reads back exactly;
- Lossy Image Compression is "01" exactly where lossy compression happened.

Both tools come from .ci/setup-system.sh; nothing here is skipped. A failure message
names the object and the exact tool message, so the failures list the defects.
The whole module takes about 70 s on 2 cores, most of it pixelmed's JVM, which
validates the reports beside the other tests.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO

import numpy as np
import pydicom.data
import pytest
from pydicom import dcmread
from pydicom.charset import convert_encodings, decode_bytes, python_encoding
from pydicom.config import strict_reading
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    Comprehensive3DSRStorage,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
    ParametricMapStorage,
    SecondaryCaptureImageStorage,
)
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID

from dicom_node.score import score_run
from inference import ModelArtifact, set_cpu_threads
from tests.factories import corpus_file, make_artifact

REPO = Path(__file__).resolve().parent.parent
DCIODVFY = Path("/usr/bin/dciodvfy")
PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")  # libpixelmed-java
SR_VALIDATOR = Path(__file__).with_name("SRValidatorBatch.java")

# highdicom.base.SOPClass writes this and f"highdicom{__version__}" (highdicom has
# no public name for it); pynetdicom's UIDs are <root>.<version>, so its root too.
HIGHDICOM_IMPLEMENTATION_UID = "1.2.826.0.1.3680043.9.7433.1.1"
PYNETDICOM_ROOT = PYNETDICOM_IMPLEMENTATION_UID.rsplit(".", 3)[0] + "."
LIBRARY_IMPLEMENTATION_UIDS = {
    HIGHDICOM_IMPLEMENTATION_UID: "highdicom",
    str(PYDICOM_IMPLEMENTATION_UID): "pydicom",
    str(PYNETDICOM_IMPLEMENTATION_UID): "pynetdicom",
}
LIBRARY_VERSION_NAMES = ("highdicom", "pydicom", "pynetdicom")

# The Patient and Study attributes every result object carries as in its source
# (ARCHITECTURE.md, Results in DICOM: "copied whole and identically").
IDENTITY = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "OtherPatientIDsSequence",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
)
GENERAL_EQUIPMENT = (
    "Manufacturer",
    "ManufacturerModelName",
    "SoftwareVersions",
    "DeviceUID",
)

# Umlauts (Latin-1), a hyphen and kanji: no single-byte character set and not
# ISO 2022 IR 87 (JIS X 0208 has no "ü") holds it all; ISO_IR 192 does.
NON_ASCII_NAME = "Lungenknötchen-Modell ü 検出"
# The ASCII start of the name: a text value holding it but not the whole name is
# a mangled copy (a "?" for a character, a hyphen lost, a byte cut).
NON_ASCII_STEM = "Lungenkn"

# Transfer syntaxes that are always lossy (PS3.5 8.2); JPEG 2000 (4.91) may be
# either, so for it the source's own Lossy Image Compression decides.
LOSSY_SYNTAXES = {JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless}


# --- the sources --------------------------------------------------------------


def _charset_file(name: str) -> Callable[[Path], Path]:
    def find(_: Path) -> Path:
        found = pydicom.data.get_charset_files(name)
        if not found:
            raise FileNotFoundError(f"pydicom's charset_files/{name}")
        return Path(found[0])

    return find


def _corpus(name: str) -> Callable[[Path], Path]:
    return lambda _: corpus_file(name)


def _sample_dx(_: Path) -> Path:
    # pydicom-data's radiographs (RG1_*, RG3_*) are all CR: there is no DX file
    # in the corpus, so the DX source is the project's own synthetic chest DX.
    found = sorted((REPO / "sample_dicoms" / "dx" / "dicom").rglob("*.dcm"))
    if not found:
        raise FileNotFoundError("sample_dicoms/dx/dicom/**/*.dcm")
    return found[0]


def _ct_with_patient_identifiers(folder: Path) -> Path:
    # No file in pydicom's corpus carries Issuer of Patient ID and its qualifiers,
    # so this is pydicom's real CT_small.dcm (which has Other Patient IDs) with
    # them added, and an issuer in one Other Patient IDs item: a PACS that keys
    # patients by issuer files results under another patient when they are lost.
    ds = dcmread(corpus_file("CT_small.dcm"))
    ds.IssuerOfPatientID = "HOSPITAL-A"
    qualifiers = Dataset()
    qualifiers.UniversalEntityID = "2.16.840.1.113883.19.5"
    qualifiers.UniversalEntityIDType = "ISO"
    qualifiers.IdentifierTypeCode = "MR"
    ds.IssuerOfPatientIDQualifiersSequence = [qualifiers]
    other = Dataset()
    other.PatientID = "B-7731"
    other.IssuerOfPatientID = "HOSPITAL-B"
    other.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = [*ds.OtherPatientIDsSequence, other]
    ds.StudyDescription = "CT chest"
    path = folder / "CT_small-patient-identifiers.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _charset_radiograph(name: str) -> Callable[[Path], Path]:
    # pydicom's CR character-set files are headers without Pixel Data, which
    # the scorer rightly passes over; these copies get a 32 x 32 image of 12-bit
    # values (a ramp) as their Rows, Columns and Bits Stored describe, and keep
    # every other attribute, their ISO 2022 names included.
    def find(folder: Path) -> Path:
        ds = dcmread(_charset_file(name)(folder))
        ramp = np.arange(ds.Rows * ds.Columns, dtype=np.uint16) % (1 << ds.BitsStored)
        ds.add_new("PixelData", "OW", ramp.reshape(ds.Rows, ds.Columns).tobytes())
        path = folder / name
        ds.save_as(path, enforce_file_format=True)
        return path

    return find


@dataclass(frozen=True, slots=True)
class Source:
    """A source file; ``lossy``: its pixels went through lossy compression."""

    find: Callable[[Path], Path]
    lossy: bool = False


SOURCES: dict[str, Source] = {
    "CT": Source(_corpus("CT_small.dcm")),
    "MR no-charset": Source(_corpus("MR_small.dcm")),
    "CR chest": Source(_corpus("RG1_UNCR.dcm")),  # no Imager Pixel Spacing
    "DX chest": Source(_sample_dx),
    "US": Source(_corpus("US1_UNCR.dcm")),
    "US multi-frame JPEG baseline": Source(_corpus("examples_ybr_color.dcm"), True),
    "enhanced MR": Source(_corpus("emri_small.dcm")),
    "enhanced CT": Source(_corpus("eCT_Supplemental.dcm")),
    # A bone scan as SC, 12-bit JPEG extended. (Not JPEG-lossy.dcm, the same
    # scan: neither pylibjpeg nor Pillow decodes it, so it is never scored.)
    "NM JPEG extended": Source(_corpus("JPGExtended.dcm"), True),
    "CT JPEG 2000": Source(_corpus("693_J2KR.dcm")),
    "MR big endian": Source(_corpus("MR_small_bigendian.dcm")),
    "CT patient identifiers": Source(_ct_with_patient_identifiers),
    # pydicom's character-set files (charset_files/FileInfo.txt), all SC or CR.
    "ISO_IR 127 chrArab": Source(_charset_file("chrArab.dcm")),
    "ISO_IR 100 chrFren": Source(_charset_file("chrFren.dcm")),
    "ISO_IR 100 chrFrenMulti": Source(_charset_file("chrFrenMulti.dcm")),
    "ISO_IR 100 chrGerm": Source(_charset_file("chrGerm.dcm")),
    "ISO_IR 126 chrGreek": Source(_charset_file("chrGreek.dcm")),
    "ISO 2022 IR 87 chrH31": Source(_charset_file("chrH31.dcm")),
    "ISO 2022 IR 13+87 chrH32": Source(_charset_file("chrH32.dcm")),
    "ISO_IR 138 chrHbrw": Source(_charset_file("chrHbrw.dcm")),
    "ISO 2022 IR 149 chrI2": Source(_charset_file("chrI2.dcm")),
    # (chrJapMultiExplicitIR6.dcm is chrJapMulti.dcm naming ISO 2022 IR 6 first.)
    "ISO 2022 IR 87 CR chrJapMulti": Source(_charset_radiograph("chrJapMulti.dcm")),
    "ISO 2022 IR 149 CR chrKoreanMulti": Source(
        _charset_radiograph("chrKoreanMulti.dcm")
    ),
    "ISO_IR 144 chrRuss": Source(_charset_file("chrRuss.dcm")),
    "ISO_IR 192 chrX1": Source(_charset_file("chrX1.dcm")),
    "GB18030 chrX2": Source(_charset_file("chrX2.dcm")),
}

# Sources scored a second time with JPEG baseline Secondary Captures.
# (Not the CR: its 1955 x 1841 capture costs 4 s a run, mostly the scorer's PNG.)
JPEG_SOURCES = ("CT", "DX chest", "US", "US multi-frame JPEG baseline")
# Sources scored with the non-ASCII model name: none, ISO_IR 144, ISO 2022 IR 87
# and ISO_IR 192 as Specific Character Set.
NAME_SOURCES = (
    "MR no-charset",
    "ISO_IR 144 chrRuss",
    "ISO 2022 IR 87 chrH31",
    "ISO_IR 192 chrX1",
)


@dataclass(frozen=True, slots=True)
class Run:
    """One scoring of one source: ``jpeg`` captures, ``non_ascii`` model name."""

    source: str
    jpeg: bool = False
    non_ascii: bool = False

    def __str__(self) -> str:
        extra = (" jpeg" if self.jpeg else "") + (
            " non-ascii" if self.non_ascii else ""
        )
        return self.source + extra


RUNS = [
    *(Run(name) for name in SOURCES),
    *(Run(name, jpeg=True) for name in JPEG_SOURCES),
    *(Run(name, non_ascii=True) for name in NAME_SOURCES),
]
JPEG_RUNS = [run for run in RUNS if run.jpeg]
NAME_RUNS = [run for run in RUNS if run.non_ascii]
LOSSY_SOURCE_RUNS = [r for r in RUNS if SOURCES[r.source].lossy and not r.jpeg]
LOSSLESS_SOURCE_RUNS = [r for r in RUNS if not SOURCES[r.source].lossy and not r.jpeg]


# --- the tools ----------------------------------------------------------------


def dciodvfy_errors(path: Path) -> list[str]:
    """Return dciodvfy's "Error - ..." lines for a file, as it prints them."""
    done = subprocess.run(
        [str(DCIODVFY), "-new", str(path)],
        capture_output=True,
        encoding="utf-8",
        errors="replace",  # it prints values' raw bytes
        timeout=60,
        check=False,
    )
    # dciodvfy prints the IOD's name, then one line per finding on stderr:
    # "Error - </Path(gggg,eeee)[i]/...> - what = <value> - Module=<name>" or the
    # same with "Warning - "; only errors fail the acceptance.
    return [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if line.startswith("Error")
    ]


_POSITION = re.compile(r"\[\d+\]")
_VALUE = re.compile(r"= <[^<>]*>")


def error_key(line: str) -> str:
    """Return a dciodvfy error without what differs between a source and a result.

    A result carries the source's Patient and Study values verbatim (the contract),
    so an invalid value in the source comes back as the same error in the result,
    at the same attribute path but possibly another item or value position
    ("[1]" / "[2]"), and with the value as dciodvfy prints it ("= <1997.04.24>").
    Both are removed; the attribute path, the message and the module name stay, so
    an error is forgiven only where the source has the same error on the same
    attribute. Everything else a result gets wrong counts.
    """
    return _VALUE.sub("= <>", _POSITION.sub("", line)).strip()


class SRValidator:
    """pixelmed's DicomSRValidator in one JVM, fed report paths as they are written.

    Reports are validated while the tests go on (the JVM takes about 5 s to start
    and 1 s a report); ``output`` waits for one report's result.
    """

    def __init__(self, log: Path) -> None:
        self.log = log
        self._out: IO[str] = log.open("w", encoding="utf-8")
        self.proc = subprocess.Popen(
            [
                "java",
                "-XX:+UseSerialGC",  # ~400 MB instead of ~1.1 GB, as fast here
                "-cp",
                str(PIXELMED_JAR),
                str(SR_VALIDATOR),
            ],
            stdin=subprocess.PIPE,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
        )

    def submit(self, path: Path) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{path}\n")
        self.proc.stdin.flush()

    def output(self, path: Path, timeout: float = 240.0) -> str:
        """Return what DicomSRValidator printed for ``path`` (submitted before)."""
        start = f"### {path}\n"
        deadline = time.monotonic() + timeout
        while True:
            text = self.log.read_text(encoding="utf-8", errors="replace")
            begin = text.find(start)
            end = text.find("### end\n", begin) if begin >= 0 else -1
            if end >= 0:
                return text[begin + len(start) : end]
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"DicomSRValidator exited ({self.proc.returncode}) before "
                    f"{path.name}: {text[-2000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"DicomSRValidator: no result for {path}")
            time.sleep(0.1)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._out.close()


def validator_errors(output: str) -> list[str]:
    """Return DicomSRValidator's errors: its "Error: ..." lines.

    It prints "Found <IOD> IOD", "Found Root Template ...", then one line per
    finding, "Error: ..." or "Warning: ..." ("Content Item not in template" is a
    warning), and "IOD validation complete" last; its exit status is always 0,
    even when it fails, so a report without that last line counts as an error.
    """
    errors = [line for line in output.splitlines() if line.startswith("Error")]
    if "IOD validation complete" not in output:
        errors.append(f"validation did not complete: {output.strip()[-500:]}")
    return errors


# --- scoring ------------------------------------------------------------------


@dataclass
class Scored:
    """One run's source (without pixels) and its result objects under ``folder``."""

    run: Run
    source_path: Path
    source: Dataset
    folder: Path
    paths: list[Path] = field(default_factory=list)

    _read: list[tuple[str, Dataset]] | None = None

    def name(self, path: Path) -> str:
        return str(path.relative_to(self.folder))

    def objects(self) -> list[tuple[str, Dataset]]:
        """Return (file name, data set without its pixels) of each object."""
        if self._read is None:
            self._read = [
                (self.name(path), dcmread(path, stop_before_pixels=True))
                for path in self.paths
            ]
        return self._read

    def of_class(self, sop_class: UID) -> list[tuple[str, Dataset]]:
        return [(n, ds) for n, ds in self.objects() if ds.SOPClassUID == sop_class]


def model_artifact(name: str) -> ModelArtifact:
    """Return the tests' small model, its outcome fixed whatever its weights.

    The first label's threshold 0 makes it Present on every image and the second's
    threshold 1 Absent, so each run writes both kinds of finding and at least one
    Secondary Capture (and a Parametric Map where the source has patient geometry).
    """
    artifact = make_artifact()
    present, absent = artifact.labels
    labels = (replace(present, threshold=0.0), replace(absent, threshold=1.0))
    return replace(artifact, name=name, labels=labels)


class Campaign:
    """Score each run once, on demand; hand each SR to the validator at once."""

    def __init__(self, root: Path, validator: SRValidator | None) -> None:
        self.root = root
        self.validator = validator
        self.models: dict[bool, Path] = {}
        for non_ascii, name in ((False, "test"), (True, NON_ASCII_NAME)):
            path = root / f"model-{int(non_ascii)}.safetensors"
            model_artifact(name).save(path)
            self.models[non_ascii] = path
        self._done: dict[Run, Scored | str] = {}
        self._source_errors: dict[Path, list[str]] = {}

    def get(self, run: Run) -> Scored:
        if run not in self._done:
            self._done[run] = self._score(run)
        scored = self._done[run]
        if isinstance(scored, str):
            pytest.fail(scored)
        return scored

    def _score(self, run: Run) -> Scored | str:
        folder = self.root / re.sub(r"[^A-Za-z0-9]+", "-", str(run))
        folder.mkdir()
        try:
            source_path = SOURCES[run.source].find(folder)
        except FileNotFoundError as exc:  # a failure of every test of the run
            return f"source of {run} not found: {exc}"
        out = folder / "out"
        try:
            scored_run = score_run(
                [source_path],
                self.models[run.non_ascii],
                out,
                device="cpu",
                jpeg=run.jpeg,
                parametric_map=True,
                any_image=True,  # every image storage instance, as issue 16 lists
            )
        except Exception as exc:  # noqa: BLE001 - each test of the run reports it
            return f"score_run raised on {run}: {type(exc).__name__}: {exc}"
        if scored_run.failed:
            return f"score_run failed {run}: {scored_run.failed}"
        summaries = scored_run.studies
        if len(summaries) != 1:
            # 0: the scorer passed over the source (no pixels, not an image).
            return f"score_run wrote {len(summaries)} result sets for {run}, not 1"
        written = summaries[0].folder
        source = dcmread(source_path, stop_before_pixels=True)
        scored = Scored(
            run, source_path, source, written, sorted(written.rglob("*.dcm"))
        )
        if self.validator is not None:
            for name, ds in scored.objects():
                if ds.SOPClassUID == Comprehensive3DSRStorage:
                    self.validator.submit(written / name)
        return scored

    def source_errors(self, path: Path) -> list[str]:
        if path not in self._source_errors:
            self._source_errors[path] = dciodvfy_errors(path)
        return self._source_errors[path]


@pytest.fixture(scope="module")
def campaign(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Campaign]:
    for tool in (DCIODVFY, PIXELMED_JAR, SR_VALIDATOR):
        assert tool.is_file(), f"{tool} is missing: run .ci/setup-system.sh"
    root = tmp_path_factory.mktemp("conformance")
    # Start the JVM only when the pixelmed test is among those selected.
    wants_sr = any(
        item.name.startswith("test_pixelmed_") for item in request.session.items
    )
    validator = SRValidator(root / "pixelmed.log") if wants_sr else None
    # One thread: the model is tiny, and two threads beside the JVM on a 2-core
    # machine made each forward pass 20 times slower (oversubscription).
    threads = set_cpu_threads(1)
    try:
        yield Campaign(root, validator)
    finally:
        set_cpu_threads(threads)
        if validator is not None:
            validator.close()


# --- value helpers ------------------------------------------------------------

PlainValue = str | list["PlainValue"] | dict[str, "PlainValue"]


def plain(elem: DataElement) -> PlainValue:
    """Return an element's decoded value as strings, lists and dicts."""
    if elem.VR == "SQ":
        return [
            {e.keyword or str(e.tag): plain(e) for e in item} for item in elem.value
        ]
    if elem.value is None:
        return ""
    if isinstance(elem.value, MultiValue):
        return [str(v) for v in elem.value]
    if isinstance(elem.value, bytes):
        return elem.value.hex()
    return str(elem.value)


TEXT_VRS = {"SH", "LO", "ST", "LT", "UT", "UC", "PN"}


def text_values(ds: Dataset) -> Iterator[tuple[str, str]]:
    """Yield (keyword, decoded text) for every text element, sequences included."""
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                yield from text_values(item)
        elif elem.VR in TEXT_VRS and elem.value is not None:
            values = elem.value if isinstance(elem.value, MultiValue) else [elem.value]
            for value in values:
                yield elem.keyword, str(value)


# Where PS3.5 6.1.2.5.3 sends an ISO 2022 value back to its initial character
# sets: CR, LF, TAB, FF, the value delimiter, and in PN also "^" and "=".
_DELIMITERS = frozenset(b"\r\n\t\f\\")
_PN_DELIMITERS = _DELIMITERS | frozenset(b"^=")
_ASCII_ONLY = ("", "ISO_IR 6", "ISO 2022 IR 6")


def charset_terms(ds: Dataset, inherited: list[str]) -> list[str]:
    if "SpecificCharacterSet" not in ds:
        return inherited
    value = ds.SpecificCharacterSet
    terms = [str(v) for v in value] if isinstance(value, MultiValue) else [value]
    return [t or "" for t in terms] or [""]


def encoding_problem(raw: bytes, terms: list[str], vr: str) -> str | None:
    """Return why ``raw`` is not a valid value under ``terms``; None when it is.

    pydicom decodes leniently (bytes outside a repertoire as Latin-1), so
    decoding back proves nothing: without code extensions the bytes must decode
    strictly with the character set's codec ("" and ISO_IR 6 are ASCII). With
    ISO 2022 code extensions, a byte >= 0x80 needs a G1 set in force: the first
    term's own G1 (none for "" / ISO 2022 IR 6), or one an escape sequence
    designated (ESC ) F, ESC - F, ESC $ ) F) since the last delimiter; and each
    escaped part must decode strictly (pydicom's strict reading).
    """
    if not any(t.startswith("ISO 2022") for t in terms):
        codec = "ascii" if terms[0] in _ASCII_ONLY else python_encoding.get(terms[0])
        if codec is None:
            return f"unknown Specific Character Set {terms[0]!r}"
        try:
            raw.decode(codec)
        except UnicodeDecodeError as exc:
            return (
                f"byte {raw[exc.start : exc.start + 1]!r} outside {terms[0] or 'ASCII'}"
            )
        return None
    initial_g1 = terms[0] not in _ASCII_ONLY
    delimiters = _PN_DELIMITERS if vr == "PN" else _DELIMITERS
    g1 = initial_g1
    i = 0
    while i < len(raw):
        byte = raw[i]
        if byte == 0x1B:
            g1 = g1 or raw[i + 1 : i + 2] in (b")", b"-") or raw[i + 1 : i + 3] == b"$)"
        elif byte in delimiters:
            g1 = initial_g1
        elif byte >= 0x80 and not g1:
            return f"byte {bytes([byte])!r} at {i} with no G1 set in force ({terms})"
        i += 1
    try:
        with strict_reading():
            decode_bytes(raw, convert_encodings(terms), set(delimiters))
    except (UnicodeError, ValueError) as exc:
        return f"does not decode strictly ({type(exc).__name__}: {exc})"
    return None


def badly_encoded(
    ds: Dataset, inherited: list[str], within: str = ""
) -> Iterator[tuple[str, bytes, str]]:
    """Yield (attribute path, raw bytes, why) for each text value that the
    Specific Character Set in force cannot hold.

    ``ds`` must be freshly read: only elements not yet accessed hold raw bytes.
    """
    terms = charset_terms(ds, inherited)
    for tag in list(ds.keys()):
        elem = ds.get_item(tag)
        name = within + (keyword_for_tag(tag) or str(tag))
        if elem.VR == "SQ":
            for item in ds[tag].value:
                yield from badly_encoded(item, terms, f"{name}/")
        elif elem.VR in TEXT_VRS and isinstance(elem.value, bytes):
            why = encoding_problem(elem.value, terms, elem.VR)
            if why is not None:
                yield name, elem.value, why


def contributing_equipment(ds: Dataset) -> Iterator[Dataset]:
    """Yield every Contributing Equipment item, at any depth."""
    for elem in ds:
        if elem.VR != "SQ":
            continue
        for item in elem.value:
            if elem.keyword == "ContributingEquipmentSequence":
                yield item
            yield from contributing_equipment(item)


def is_lossy(ds: Dataset) -> bool:
    syntax = ds.file_meta.get("TransferSyntaxUID")
    return ds.get("LossyImageCompression") == "01" or syntax in LOSSY_SYNTAXES


def lossy_flag_problems(ds: Dataset) -> list[str]:
    """Return what PS3.3 C.7.6.1.1.5 needs once lossy compression happened."""
    problems = []
    if ds.get("LossyImageCompression") != "01":
        problems.append(
            f"LossyImageCompression is {ds.get('LossyImageCompression')!r}, not '01'"
        )
    ratio = ds.get("LossyImageCompressionRatio")
    method = ds.get("LossyImageCompressionMethod")
    if not ratio:
        problems.append("LossyImageCompressionRatio (0028,2112) is missing")
    if not method:
        problems.append("LossyImageCompressionMethod (0028,2114) is missing")
    if ratio and method:
        ratios = ds["LossyImageCompressionRatio"].VM
        methods = ds["LossyImageCompressionMethod"].VM
        if ratios != methods:  # one ratio per method, in the order applied
            problems.append(f"{ratios} compression ratio(s) for {methods} method(s)")
    return problems


# --- the tests: every object of every run -------------------------------------


@pytest.mark.parametrize("run", RUNS, ids=str)
def test_dciodvfy_reports_no_error_the_source_does_not_have(
    campaign: Campaign, run: Run
) -> None:
    scored = campaign.get(run)
    known = {error_key(e) for e in campaign.source_errors(scored.source_path)}
    new = [
        f"{scored.name(path)}: {line}"
        for path in scored.paths
        for line in dciodvfy_errors(path)
        if error_key(line) not in known
    ]
    assert not new, "\n".join(new)


@pytest.mark.parametrize("run", RUNS, ids=str)
def test_file_meta_names_this_project(campaign: Campaign, run: Run) -> None:
    problems = []
    for name, ds in campaign.get(run).objects():
        uid = str(ds.file_meta.get("ImplementationClassUID", ""))
        version = str(ds.file_meta.get("ImplementationVersionName", ""))
        library = LIBRARY_IMPLEMENTATION_UIDS.get(uid) or (
            "pynetdicom" if uid.startswith(PYNETDICOM_ROOT) else None
        )
        if not uid:
            problems.append(f"{name}: no Implementation Class UID")
        elif library:
            problems.append(f"{name}: Implementation Class UID {uid} is {library}'s")
        if version.lower().startswith(LIBRARY_VERSION_NAMES):
            problems.append(f"{name}: Implementation Version Name {version!r}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("run", RUNS, ids=str)
def test_equipment_names_the_node_not_a_library(campaign: Campaign, run: Run) -> None:
    problems = []
    for name, ds in campaign.get(run).objects():
        missing = [k for k in GENERAL_EQUIPMENT if not ds.get(k)]
        if missing:
            problems.append(f"{name}: General Equipment lacks {', '.join(missing)}")
        if "highdicom" in str(ds.get("Manufacturer", "")).lower():
            problems.append(f"{name}: Manufacturer {ds.Manufacturer!r}")
        for item in contributing_equipment(ds):
            manufacturer = str(item.get("Manufacturer", ""))
            if "highdicom" in manufacturer.lower():
                problems.append(
                    f"{name}: Contributing Equipment item names {manufacturer!r}"
                )
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("run", RUNS, ids=str)
def test_patient_and_study_are_carried_identically(
    campaign: Campaign, run: Run
) -> None:
    scored = campaign.get(run)
    problems = []
    for name, ds in scored.objects():
        for keyword in IDENTITY:
            if keyword not in scored.source:
                continue
            expected = plain(scored.source[keyword])
            if keyword not in ds:
                problems.append(f"{name}: {keyword} missing (source: {expected!r})")
            elif plain(ds[keyword]) != expected:
                problems.append(
                    f"{name}: {keyword} {plain(ds[keyword])!r} != source {expected!r}"
                )
    assert not problems, "\n".join(problems)


# --- character sets -----------------------------------------------------------


@pytest.mark.parametrize("run", NAME_RUNS, ids=str)
def test_non_ascii_model_name_decodes_back_exactly(
    campaign: Campaign, run: Run
) -> None:
    scored = campaign.get(run)
    problems = []
    for name, ds in scored.objects():
        charset = ds.get("SpecificCharacterSet")
        values = list(text_values(ds))
        if not any(NON_ASCII_NAME in value for _, value in values):
            problems.append(
                f"{name} ({charset}): no text value holds the model name exactly"
            )
        problems += [
            f"{name} ({charset}): {keyword} {value!r}"
            for keyword, value in values
            if NON_ASCII_STEM in value and NON_ASCII_NAME not in value
        ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("run", RUNS, ids=str)
def test_text_is_encoded_in_the_declared_character_set(
    campaign: Campaign, run: Run
) -> None:
    # dciodvfy checks the default repertoire but not ISO 2022's (it let Latin-1
    # bytes pass under ISO 2022 IR 87), so the bytes are checked here as well.
    # A value copied byte for byte from a source that has the same fault is the
    # source's, not the result's.
    scored = campaign.get(run)
    source = dcmread(scored.source_path, stop_before_pixels=True)
    inherited = {raw for _, raw, _ in badly_encoded(source, [""])}
    problems = [
        f"{scored.name(path)}: {keyword} {raw[:80]!r}: {why}"
        for path in scored.paths
        for keyword, raw, why in badly_encoded(
            dcmread(path, stop_before_pixels=True), [""]
        )
        if raw not in inherited
    ]
    assert not problems, "\n".join(problems)


# --- Lossy Image Compression (PS3.3 C.7.6.1.1.5) ------------------------------


@pytest.mark.parametrize("run", LOSSY_SOURCE_RUNS, ids=str)
def test_capture_of_a_lossy_source_says_lossy(campaign: Campaign, run: Run) -> None:
    scored = campaign.get(run)
    assert is_lossy(scored.source), f"{run.source} is not a lossy source"
    captures = scored.of_class(SecondaryCaptureImageStorage)
    assert captures, "no Secondary Capture written"
    problems = [f"{n}: {p}" for n, ds in captures for p in lossy_flag_problems(ds)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("run", JPEG_RUNS, ids=str)
def test_jpeg_capture_says_lossy(campaign: Campaign, run: Run) -> None:
    captures = campaign.get(run).of_class(SecondaryCaptureImageStorage)
    assert captures, "no Secondary Capture written"
    problems = []
    for name, ds in captures:
        if ds.file_meta.TransferSyntaxUID != JPEGBaseline8Bit:
            problems.append(f"{name}: stored as {ds.file_meta.TransferSyntaxUID.name}")
        problems += [f"{name}: {p}" for p in lossy_flag_problems(ds)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("run", LOSSLESS_SOURCE_RUNS, ids=str)
def test_uncompressed_capture_of_a_lossless_source_is_not_called_lossy(
    campaign: Campaign, run: Run
) -> None:
    scored = campaign.get(run)
    assert not is_lossy(scored.source), f"{run.source} is a lossy source"
    captures = scored.of_class(SecondaryCaptureImageStorage)
    assert captures, "no Secondary Capture written"
    problems = []
    for name, ds in captures:
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            problems.append(f"{name}: stored as {ds.file_meta.TransferSyntaxUID.name}")
        if ds.get("LossyImageCompression") == "01":
            problems.append(f"{name}: LossyImageCompression '01'")
    assert not problems, "\n".join(problems)


# --- pixelmed, last: its JVM validates the reports while the tests above run ---


@pytest.mark.timeout(300)
@pytest.mark.parametrize("run", RUNS, ids=str)
def test_pixelmed_sr_validator_reports_no_error(campaign: Campaign, run: Run) -> None:
    scored = campaign.get(run)
    reports = scored.of_class(Comprehensive3DSRStorage)
    assert len(reports) == 1, f"{len(reports)} Comprehensive 3D SR written"
    assert campaign.validator is not None
    name, _ = reports[0]
    errors = validator_errors(campaign.validator.output(scored.folder / name))
    report = dcmread(scored.folder / name)
    errors = [e for e in errors if not pixelmed_misreads_a_tid_1501_group(e, report)]
    assert not errors, "\n".join(errors)


# pixelmed (20220618) decides whether TID 1500's "INCLUDE TID 1410" applies by
# counting Image Region SCOORDs across all Measurement Groups: exactly one, and it
# checks *every* group as TID 1410 (two or more, and it checks none). TID 1500
# allows TID 1410 and TID 1501 groups side by side (rows 6 and 8), as the node
# writes a present finding (a point) beside an absent one (a score). The one error
# it then reports on the TID 1501 group is forgiven, and only when the group is
# what the node declares: TID 1501, no SCOORD, and the report has exactly one.
_PIXELMED_1410 = re.compile(
    r"^Error: Template 1410 PlanarROIMeasurements/\[Row 1\] CONTAINER "
    r'\(125007,DCM,"Measurement Group"\)/\[Row (5|7)\] .*: within '
    r"1\.(\d+)\.(\d+): .*Missing conditional content item$"
)


def pixelmed_misreads_a_tid_1501_group(error: str, report: Dataset) -> bool:
    match = _PIXELMED_1410.match(error)
    if match is None:
        return False
    container = report.ContentSequence[int(match.group(2)) - 1]
    groups = [g for g in container.ContentSequence if g.ValueType == "CONTAINER"]
    group = container.ContentSequence[int(match.group(3)) - 1]
    template = group.get("ContentTemplateSequence")
    points = sum(
        1 for g in groups for item in g.ContentSequence if item.ValueType == "SCOORD"
    )
    return (
        template is not None
        and template[0].TemplateIdentifier == "1501"
        and not any(item.ValueType == "SCOORD" for item in group.ContentSequence)
        and points == 1
    )


def test_every_kind_of_result_object_is_checked(campaign: Campaign) -> None:
    # The runs above must write Parametric Maps and JPEG captures, or the checks
    # of those objects would pass by checking nothing.
    classes = {ds.SOPClassUID for _, ds in campaign.get(Run("CT")).objects()}
    assert {
        Comprehensive3DSRStorage,
        SecondaryCaptureImageStorage,
        ParametricMapStorage,
    } <= classes
    captures = campaign.get(Run("CT", jpeg=True)).of_class(SecondaryCaptureImageStorage)
    assert any(ds.file_meta.TransferSyntaxUID.is_compressed for _, ds in captures)

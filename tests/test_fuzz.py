"""Fuzz the two readers of untrusted bytes, vfx_ray.imaging.dicom.read_header and load_volume.

Property: they return data or raise VfxError; never another exception (it would become an error
row with a raw type, or crash a Ray worker), never a hang, never a large allocation. Inputs are
real files from ``write_series`` (4 slices of 32 x 32 in six transfer syntaxes, classic and
Enhanced, plus Deflated) mutated by byte flips, cuts, insertions, deletions, VR / length / value
overwrites at the tags that matter, out-of-range tag values and transfer-syntax swaps.

Bounded and reproducible: derandomized, no example database, a per-example deadline and an
alarm for hangs, the peak RSS of each example measured (Linux). ``VFX_FUZZ_EXAMPLES=5000`` runs
longer by hand. Inputs that once broke the property are replayed from tests/fuzz_regressions/.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import struct
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from phantoms import centred_geometry, series
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID

from vfx_ray.config import CropConfig
from vfx_ray.errors import VfxError
from vfx_ray.imaging.dicom import Volume, load_volume, read_header

REGRESSIONS = Path(__file__).parent / "fuzz_regressions"
EXAMPLES = int(os.environ.get("VFX_FUZZ_EXAMPLES", "0"))  # 0: the CI budget below
SHAPE = (4, 32, 32)
CFG = CropConfig(max_file_bytes=1 << 20)  # every fuzz input is < 64 KB; bigger must be refused
MAX_VOXELS = 4 * SHAPE[0] * SHAPE[1] * SHAPE[2]  # so any accepted size is small
MAX_PEAK_MB = 64  # per example, above the RSS at its start: far above 4 x 32 x 32 voxels
HANG_S = 20.0  # the alarm; hypothesis's deadline (below) flags slowness well before
SYNTAXES = ("explicit", "implicit", "big_endian", "rle", "jpegls", "jpeg2000")
TAGS = {  # keyword: (group, element); their VR, length and value bytes are overwritten
    "FileMetaInformationGroupLength": (0x0002, 0x0000), "TransferSyntaxUID": (0x0002, 0x0010),
    "SOPInstanceUID": (0x0008, 0x0018), "Modality": (0x0008, 0x0060),
    "SeriesInstanceUID": (0x0020, 0x000E), "ImagePositionPatient": (0x0020, 0x0032),
    "ImageOrientationPatient": (0x0020, 0x0037), "SamplesPerPixel": (0x0028, 0x0002),
    "PhotometricInterpretation": (0x0028, 0x0004), "NumberOfFrames": (0x0028, 0x0008),
    "Rows": (0x0028, 0x0010), "Columns": (0x0028, 0x0011), "PixelSpacing": (0x0028, 0x0030),
    "BitsAllocated": (0x0028, 0x0100), "BitsStored": (0x0028, 0x0101),
    "HighBit": (0x0028, 0x0102), "PixelRepresentation": (0x0028, 0x0103),
    "RescaleIntercept": (0x0028, 0x1052), "RescaleSlope": (0x0028, 0x1053),
    "SharedFunctionalGroupsSequence": (0x5200, 0x9229),
    "PerFrameFunctionalGroupsSequence": (0x5200, 0x9230), "PixelData": (0x7FE0, 0x0010),
    "Item": (0xFFFE, 0xE000), "SequenceDelimitationItem": (0xFFFE, 0xE0DD),
}
# Byte offsets from a tag: VR (explicit), short length, long length or implicit length, values.
FIELD_OFFSETS = (4, 6, 8, 12)
PATCHES = (  # VRs, lengths (undefined, huge, zero, odd) and small numbers in both byte orders
    b"SQ", b"UN", b"OB", b"OW", b"US", b"SS", b"DS", b"UL", b"XX", b"\x00\x00",
    b"\xff\xff\xff\xff", b"\xfe\xff\xff\xff", b"\xff\xff\xff\x7f", b"\x00\x00\x00\x80",
    b"\x00\x00\x00\x00", b"\x01\x00\x00\x00", b"\xff\xff", b"\x00\x00", b"\x01\x00", b"\x00\x01",
    b"\x03\x00", b"\x00\x10", b"\x10\x00", b"\x00\x20", b"\x20\x00", b"\x01\x10", b"\xff\x7f")
SWAP_SYNTAXES = (  # every syntax pydicom knows a decoder for, and some it does not
    "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.203", "1.2.840.10008.1.2.4.100",
    "1.2.840.10008.1.2.8.1", "1.2.3.4", "", "\xff")
US_KEYWORDS = ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "SamplesPerPixel",
               "PixelRepresentation")
TEXT_KEYWORDS = ("NumberOfFrames", "RescaleSlope", "RescaleIntercept", "ImagePositionPatient",
                 "ImageOrientationPatient", "PixelSpacing", "Modality", "SeriesInstanceUID",
                 "PhotometricInterpretation", "PixelPaddingValue")
US_VALUES = (0, 1, 2, 7, 8, 12, 15, 16, 17, 24, 31, 32, 33, 64, 255, 4096, 4097, 32768, 65535)
TEXT_VALUES = (b"", b"0", b"-1", b"1", b"3", b"1.5", b"1e308", b"-1e308", b"nan", b"inf",
               b"abc", b"1\\2", b"1\\0\\0\\0\\1\\0", b"0\\0\\0\\0\\0\\0", b"99999999999999",
               b"\xff\xfe", b"CT", b"MR", b"RGB", b"1.2.3", b"0\\0", b"\\\\\\",
               b"1e-6\\1e-6", b"-0.5\\0.5")

SEED = os.environ.get("VFX_FUZZ_SEED")  # by hand: explore other inputs than CI's fixed ones


def fuzz_settings(test: Callable[..., None]) -> Callable[..., None]:
    """Bounded, reproducible hypothesis settings: CI's examples are the same on every run."""
    test = settings(
        max_examples=EXAMPLES or 500, deadline=8000, derandomize=SEED is None, database=None,
        print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )(test)
    return test if SEED is None else seed(int(SEED))(test)


# ---------------------------------------------------------------- inputs


@cache
def bases() -> dict[str, list[tuple[str, bytes]]]:
    """Clean series, by '<syntax>' or '<syntax>+enhanced'; 'deflated' re-encodes 'explicit'."""
    g = centred_geometry((1, 0, 0), (0, 1, 0), shape=SHAPE, slice_mm=3.0)
    hu = np.linspace(-1000, 1500, np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    out = {}
    for syntax in SYNTAXES:
        out[syntax] = series(hu, g, transfer_syntax=syntax)
        out[f"{syntax}+enhanced"] = series(hu, g, transfer_syntax=syntax, enhanced=True)
    out["deflated"] = [(k, _deflate(d)) for k, d in out["explicit"]]
    return out


def _deflate(data: bytes) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def with_syntax(data: bytes, syntax: str, body: bytes | None = None) -> bytes:
    """The same dataset bytes (or ``body``) under another TransferSyntaxUID in the file meta."""
    fp = io.BytesIO(data)
    read_preamble(fp, False)
    meta = _read_file_meta_info(fp)
    rest = data[fp.tell():] if body is None else body
    meta["TransferSyntaxUID"] = DataElement(0x00020010, "UI", syntax)
    out = DicomBytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=False)
    return out.getvalue() + rest


def tag_offsets(data: bytes, tag: tuple[int, int]) -> list[int]:
    """Where ``tag`` appears, little or big endian (a fuzzer cares little for false hits)."""
    hits = []
    for fmt in ("<HH", ">HH"):
        pattern = struct.pack(fmt, *tag)
        hits += [m.start() for m in re.finditer(re.escape(pattern), data)]
    return sorted(set(hits))


def set_raw(data: bytes, keyword: str, raw: bytes) -> bytes:
    """Re-encode with every ``keyword`` element (nested too) holding the bytes ``raw`` under
    its dictionary VR: wrong lengths, counts and unparsable strings for that VR."""
    ds = pydicom.dcmread(io.BytesIO(data))
    tag = pydicom.datadict.tag_for_keyword(keyword)
    vr = pydicom.datadict.dictionary_VR(tag)[:2]
    little, implicit = ds.original_encoding[1], ds.original_encoding[0]

    def put(dataset: pydicom.Dataset, top: bool) -> None:
        for elem in list(dataset):  # first: iterating converts, and the raw value must not be
            if elem.VR == "SQ":
                for item in elem.value:
                    put(item, False)
        if tag in dataset or (top and keyword in ("NumberOfFrames", "PixelPaddingValue")):
            dataset[tag] = RawDataElement(tag, vr, len(raw), raw, 0, implicit, little)

    put(ds, True)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


Op = tuple[Any, ...]
ops = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(0, 7)),
    st.tuples(st.just("cut"), st.integers(0, 1 << 20)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 20), st.integers(1, 64)),
    st.tuples(st.just("tag"), st.sampled_from(sorted(TAGS)), st.integers(0, 64),
              st.sampled_from(FIELD_OFFSETS), st.one_of(st.sampled_from(PATCHES),
                                                        st.binary(min_size=1, max_size=8))),
)


def mutate(data: bytes, op: Op) -> bytes:
    """Apply one byte-level mutation; positions wrap around the file's length."""
    b, n = bytearray(data), max(len(data), 1)
    kind = op[0]
    if kind == "flip" and b:
        b[op[1] % n] ^= 1 << op[2]
    elif kind == "cut":
        del b[op[1] % n:]
    elif kind == "insert":
        b[op[1] % n:op[1] % n] = op[2]
    elif kind == "delete":
        del b[op[1] % n:op[1] % n + op[2]]
    elif kind == "tag":
        hits = tag_offsets(data, TAGS[op[1]])
        if hits:
            at = hits[op[2] % len(hits)] + op[3]
            b[at:at + len(op[4])] = op[4]
    return bytes(b)


# ---------------------------------------------------------------- the property


class Hang(BaseException):
    """Raised by the alarm; a BaseException so that no ``except Exception`` swallows it."""


def _peak_rss_mb() -> float | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024


def _reset_peak() -> bool:
    try:  # Linux: "5" resets the peak RSS (VmHWM) to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@contextmanager
def bounded(what: str) -> Iterator[None]:
    """No hang (an alarm), no large allocation (the peak RSS), no pydicom warning noise."""
    measure = _reset_peak()
    start = _peak_rss_mb() if measure else None

    def alarm(*_: Any) -> None:
        raise Hang(f"{what} ran over {HANG_S} s")

    old = signal.signal(signal.SIGALRM, alarm)
    pending, t0 = signal.setitimer(signal.ITIMER_REAL, HANG_S)[0], time.monotonic()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if pending:  # someone else's alarm (a test timeout plugin): give it back
            signal.setitimer(signal.ITIMER_REAL, max(pending - (time.monotonic() - t0), 1e-3))
    if start is not None:
        peak = _peak_rss_mb()
        assert peak is not None and peak - start < MAX_PEAK_MB, (
            f"{what} peaked at {peak - start:.0f} MB above its start")


def returns_or_vfx_error(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn``'s result, or the VfxError it raised; any other exception fails the test."""
    try:
        with bounded(fn.__name__):
            return fn(*args, **kwargs)
    except VfxError as err:
        assert err.stage and err.error_type and err.message, err.row()
        assert err.error_type.isidentifier() and err.error_type[0].isupper(), err.row()
        return err


def check_both(files: list[tuple[str, bytes]], index: int, prefix: int | None = None) -> None:
    """read_header on the mutated object (whole, and a prefix), then load_volume on the series."""
    key, data = files[index]
    h = returns_or_vfx_error(read_header, data, key, max_file_bytes=CFG.max_file_bytes)
    if isinstance(h, dict):
        assert h["object_key"] == key and h["size"] == len(data)
    if prefix is not None and 0 < prefix < len(data):
        returns_or_vfx_error(read_header, data[:prefix], key, object_size=len(data),
                             max_file_bytes=CFG.max_file_bytes)
    v = returns_or_vfx_error(load_volume, files, CFG, max_voxels=MAX_VOXELS)
    if isinstance(v, Volume):
        assert v.hu.dtype == np.float32 and v.hu.ndim == 3 and v.hu.size <= 4 * MAX_VOXELS
        assert np.isfinite(v.spacing).all() and (v.spacing > 0).all(), v.spacing
        assert np.isfinite(v.origin).all() and np.isfinite(v.direction).all()


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on corrupt values


@pytest.fixture(autouse=True)
def quiet_pydicom() -> Iterator[None]:
    """pydicom logs every oddity of a corrupt file; the fuzz makes thousands."""
    logger = logging.getLogger("pydicom")
    level, logger.level = logger.level, logging.CRITICAL
    yield
    logger.setLevel(level)


# ---------------------------------------------------------------- fuzz tests

BASE_NAMES = (*SYNTAXES, *(f"{s}+enhanced" for s in SYNTAXES), "deflated")  # keys of bases()
base_names = st.sampled_from(BASE_NAMES)


@pytest.mark.slow
@fuzz_settings
@given(base=base_names, index=st.integers(0, 3), edits=st.lists(ops, min_size=1, max_size=4),
       prefix=st.one_of(st.none(), st.integers(1, 4096)))
def test_byte_mutations(base: str, index: int, edits: list[Op], prefix: int | None) -> None:
    files = list(bases()[base])
    index %= len(files)
    key, data = files[index]
    for op in edits:
        data = mutate(data, op)
    files[index] = (key, data)
    check_both(files, index, prefix)


@pytest.mark.slow
@fuzz_settings
@given(base=base_names, index=st.integers(0, 3),
       edit=st.one_of(
           st.tuples(st.sampled_from(US_KEYWORDS), st.sampled_from(US_VALUES),
                     st.sampled_from(("<H", ">H", "<I", "<B"))),
           st.tuples(st.sampled_from(TEXT_KEYWORDS), st.sampled_from(TEXT_VALUES), st.none())),
       then=st.lists(ops, max_size=2))
def test_tag_values(base: str, index: int, edit: tuple[str, Any, str | None],
                    then: list[Op]) -> None:
    """Out-of-range, wrongly sized or unparsable values of the tags the readers trust."""
    files = list(bases()[base])
    index %= len(files)
    key, data = files[index]
    keyword, value, fmt = edit
    raw = value if fmt is None else struct.pack(fmt, value % (256 if fmt == "<B" else 1 << 16))
    data = set_raw(data, keyword, raw + b" " * (len(raw) % 2 if fmt is None else 0))
    for op in then:
        data = mutate(data, op)
    files[index] = (key, data)
    check_both(files, index)


@pytest.mark.slow
@fuzz_settings
@given(base=base_names, syntax=st.sampled_from(SWAP_SYNTAXES), every=st.booleans(),
       then=st.lists(ops, max_size=2))
def test_transfer_syntax_swaps(base: str, syntax: str, every: bool, then: list[Op]) -> None:
    """Dataset bytes read under the wrong syntax: decoders meet streams they do not expect."""
    files = [(k, with_syntax(d, syntax) if every or n == 0 else d)
             for n, (k, d) in enumerate(bases()[base])]
    key, data = files[0]
    for op in then:
        data = mutate(data, op)
    files[0] = (key, data)
    check_both(files, 0)


# ---------------------------------------------------------------- bombs and regressions


def _frame_with_size(files: list[tuple[str, bytes]], syntax: str, rows: int, cols: int
                     ) -> list[tuple[str, bytes]]:
    """The first file's codestream declaring ``rows`` x ``cols`` (the header still 32 x 32)."""
    ds = pydicom.dcmread(io.BytesIO(files[0][1]))
    frame = bytearray(next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1)))
    if syntax == "jpeg2000":  # SIZ: Xsiz, Ysiz at 8, 12; tile size XTsiz, YTsiz at 24, 28
        for at, v in ((8, cols), (12, rows), (24, cols), (28, rows)):
            frame[at:at + 4] = struct.pack(">I", v)
    else:  # SOF55 after SOI: marker, length, precision, then Y and X
        at = frame.index(b"\xff\xf7")
        frame[at + 5:at + 9] = struct.pack(">2H", rows, cols)
    ds.PixelData = pydicom.encaps.encapsulate([bytes(frame)])
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return [(files[0][0], buf.getvalue()), *files[1:]]


@pytest.mark.parametrize("syntax", ["jpeg2000", "jpegls"])
def test_codestream_bomb_is_refused_before_decoding(syntax: str) -> None:
    """A 2 KB frame declaring 60000 x 60000 once took 14-21 GB and minutes in the decoders."""
    bomb = _frame_with_size(bases()[syntax], syntax, 60000, 60000)
    err = returns_or_vfx_error(load_volume, bomb, CFG)
    assert isinstance(err, VfxError) and err.error_type == "TooManyVoxels", err
    assert "60000 x 60000" in err.message
    small = _frame_with_size(bases()[syntax], syntax, 16, 32)
    err = returns_or_vfx_error(load_volume, small, CFG)
    assert isinstance(err, VfxError) and err.error_type == "DecodeFailed", err


def test_deflate_bomb_is_refused_while_inflating() -> None:
    """A deflated dataset inflating past max_file_bytes stops at the limit (pydicom would
    inflate all of it: 64 KB of deflate can expand to 64 MB)."""
    [(key, data), *_] = bases()["explicit"]
    body = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zipped = body.compress(b"\0" * (8 << 20)) + body.flush()
    bomb = with_syntax(data, pydicom.uid.DeflatedExplicitVRLittleEndian, zipped)
    assert len(bomb) < 16 << 10
    cfg = CropConfig(max_file_bytes=1 << 20)
    for fn, args in ((read_header, (bomb, key)), (load_volume, ([(key, bomb)], cfg))):
        kwargs = {"max_file_bytes": cfg.max_file_bytes} if fn is read_header else {}
        err = returns_or_vfx_error(fn, *args, **kwargs)
        assert isinstance(err, VfxError) and err.error_type == "FileTooLarge", err


def test_deflated_series_still_decodes() -> None:
    """The deflate guard keeps genuine Deflated Explicit VR objects readable."""
    plain, deflated = load_volume(bases()["explicit"]), load_volume(bases()["deflated"], CFG)
    np.testing.assert_array_equal(plain.hu, deflated.hu)
    assert read_header(bases()["deflated"][0][1], "k")["transfer_syntax_uid"] == str(
        UID("1.2.840.10008.1.2.1.99"))


def regression_cases() -> list[Path]:
    return sorted(p for p in REGRESSIONS.iterdir() if p.is_dir()) if REGRESSIONS.exists() else []


@pytest.mark.parametrize("case", regression_cases(), ids=lambda p: p.name)
def test_regressions(case: Path) -> None:
    """Inputs that once broke the property (cases.json: what they did then, what they give now;
    ``fuzzed.dcm`` is the mutated object, ``other_*.dcm`` clean slices of its series)."""
    expected = json.loads((REGRESSIONS / "cases.json").read_text())[case.name]
    files = [(p.name, p.read_bytes()) for p in sorted(case.glob("*.dcm"))]
    for key, data in files:
        h = returns_or_vfx_error(read_header, data, key, max_file_bytes=CFG.max_file_bytes)
        if key == "fuzzed.dcm":
            assert (h.error_type if isinstance(h, VfxError) else "ok") == expected["read_header"]
    err = returns_or_vfx_error(load_volume, files, CFG, max_voxels=MAX_VOXELS)
    assert isinstance(err, VfxError), f"{case.name}: load_volume now succeeds"
    assert err.error_type == expected["load_volume"], err.row()


def test_every_regression_is_listed() -> None:
    listed = json.loads((REGRESSIONS / "cases.json").read_text())
    assert sorted(listed) == [p.name for p in regression_cases()]

"""Guards on untrusted DICOM bytes, so a corrupt or hostile object ends as a VfxError.

pydicom reads lazily and raises many exception types on corrupt data (ValueError, TypeError,
struct.error, NotImplementedError, BytesLengthException, OSError, ...), and the Rust decoders
panic (pyo3's PanicException derives from BaseException, so ``except Exception`` misses it).
Sizes are checked before anything is expanded: a Deflated dataset is inflated with a cap (pydicom
would inflate it whole), and every compressed frame's own codestream header must declare the
header's Rows x Columns, because the decoders allocate what the codestream declares (a 1 KB
JPEG 2000 frame declaring 60000 x 60000 took 21 GB and 150 s). Found by tests/test_fuzz.py.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from pydicom import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_partial, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import (
    HTJ2K,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
)

from vfx_ray.errors import VfxError

# What pydicom and numpy raise on corrupt values; anything else is a bug and stays visible.
BAD_DATA: tuple[type[BaseException], ...] = (
    InvalidDicomError, BytesLengthException, ValueError, TypeError, LookupError, ArithmeticError,
    struct.error, EOFError, OSError, NotImplementedError, zlib.error)
MAX_ABS_MM = 1e6  # positions and spacings beyond 1 km are corrupt headers, not patients
# Below this a pixel spacing is corrupt (or not in mm); it would also make the crops resample
# thickness / spacing sub-slices per slab (1e-6 mm: 3 million of 64 x 64 floats).
MIN_SPACING_MM = 0.01
PIXEL_DATA_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})  # Pixel, Float, Double Float
_SEQ_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"  # (FFFE,E0DD), length 0: PS3.5 7.5.2
_J2K = frozenset(JPEG2000TransferSyntaxes) | {HTJ2K, HTJ2KLossless, HTJ2KLosslessRPCL}
_JPEG = frozenset(JPEGTransferSyntaxes) | frozenset(JPEGLSTransferSyntaxes)
_SOF = frozenset({*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC),
                  *range(0xCD, 0xD0), 0xF7, 0xF9})  # ISO 10918-1 B.1.1.3, ISO 14495-1 C.2.2


def error(stage: str, error_type: str, message: str, key: str | None = None,
          uid: str | None = None) -> VfxError:
    return VfxError(stage, message, object_key=key, series_instance_uid=uid, error_type=error_type)


@contextmanager
def bad_values(stage: str, key: str | None = None, uid: str | None = None) -> Iterator[None]:
    """Turn what a corrupt value raises when read or converted into a BadValue VfxError."""
    try:
        yield
    except BAD_DATA as exc:
        where = key or f"series {uid}"
        raise error(stage, "BadValue", f"{where}: a header value is corrupt or of the wrong type "
                    f"({type(exc).__name__}: {exc}); check or re-export the object", key, uid
                    ) from exc


def is_decoder_failure(exc: BaseException) -> bool:
    """An Exception, or a Rust decoder's panic (each pyo3 module has its own PanicException)."""
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


def vector(value: Any, n: int, what: str, key: str, low: float | None = None) -> np.ndarray:
    """``n`` finite floats within :data:`MAX_ABS_MM` (and >= ``low``), else BadValue."""
    v = np.asarray([float(x) for x in value], float)
    if v.shape != (n,) or not np.all(np.abs(v) <= MAX_ABS_MM) or (low is not None
                                                                   and v.min() < low):
        raise error("decode", "BadValue", f"{key}: {what} is {list(value)!r}; expected {n} finite "
                    f"numbers{'' if low is None else f' >= {low}'}, the header is corrupt", key)
    return v


def items(ds: Dataset, keyword: str) -> list[Dataset]:
    """A sequence's items; TypeError (so BadValue) if a corrupt VR made it bytes or a number."""
    value = ds.get(keyword)
    if value is not None and not isinstance(value, Sequence):
        raise TypeError(f"{keyword} is a {type(value).__name__}, not a sequence (SQ)")
    return list(value or [])


def _inflate(data: bytes, key: str, stage: str, limit: int, size: int) -> bytes:
    """A Deflated Explicit VR object (PS3.5 A.5) as an Explicit VR Little Endian one, inflating
    at most ``limit`` bytes; other objects unchanged."""
    fp = io.BytesIO(data)
    try:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
        deflated = meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
    except BAD_DATA:
        return data  # read_partial says what is wrong
    if not deflated:
        return data
    if size > len(data):
        raise error(stage, "HeaderBeyondPrefix", f"{key}: a deflated object is read whole", key)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        body = inflater.decompress(data[fp.tell():], limit)
    except zlib.error as exc:
        raise error(stage, "NotDicom", f"{key}: corrupt deflated dataset ({exc})", key) from exc
    if inflater.unconsumed_tail:
        raise error(stage, "FileTooLarge", f"{key}: the deflated dataset inflates past {limit} "
                    "bytes; raise CropConfig.max_file_bytes if it is a genuine CT object", key)
    clean = FileMetaDataset()  # not the object's own: a corrupt element could not be written
    clean.TransferSyntaxUID = ExplicitVRLittleEndian
    out = DicomBytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, clean, enforce_standard=False)
    return out.getvalue() + body


def parse(data: bytes, key: str, stage: str, max_file_bytes: int,
          object_size: int | None = None) -> tuple[Dataset, bool, bytes]:
    """(dataset up to Pixel Data, has_pixel_data, the bytes to decode); ``data`` may be a prefix
    of ``object_size``. The header ends where (7FE0,0010) starts (PS3.5 7.1)."""
    size = len(data) if object_size is None else object_size
    if size > max_file_bytes:
        raise error(stage, "FileTooLarge", f"{key}: {size} bytes, above the {max_file_bytes}-byte "
                    "limit; raise CropConfig.max_file_bytes if it is a genuine CT object", key)
    deflated = (inflated := _inflate(data, key, stage, max_file_bytes, size)) is not data
    if deflated:
        data, size = inflated, len(inflated)
    seen: list[tuple[str | None, int]] = []

    def stop(tag: int, vr: str | None, length: int) -> bool:
        if tag in PIXEL_DATA_TAGS:
            seen.append((vr, length))
        return tag in PIXEL_DATA_TAGS

    fp = io.BytesIO(data)
    try:
        ds = read_partial(fp, stop_when=stop)
        if deflated:  # as the object says, though ``data`` is now its inflated copy
            ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        tags = [(tag, ds.get_item(tag)) for tag in ds.keys()]
    except BAD_DATA as exc:
        raise error(stage, "NotDicom", f"{key}: not a readable DICOM Part 10 file ({exc}); check "
                    "the object is DICOM and complete", key) from exc
    if not seen:
        if size > len(data):
            raise error(stage, "HeaderBeyondPrefix", f"{key}: the header continues past the "
                        f"first {len(data)} bytes; read the whole object", key)
        for tag, elem in tags:  # without pixel data, a cut inside the header must be found here
            tell, length = getattr(elem, "value_tell", None), getattr(elem, "length", 0)
            if tell is not None and length != 0xFFFFFFFF and tell + length > size:
                raise error(stage, "Truncated", f"{key}: element {tag} runs past the end of the "
                            f"file ({size} bytes); the file is truncated, copy it again", key)
        return ds, False, data
    vr, length = seen[0]
    start = fp.tell() + (8 if vr is None else 12)  # implicit: tag+length; explicit OB/OW: 12
    complete = (start + length <= size) if length != 0xFFFFFFFF else (
        size > len(data) or data.rfind(_SEQ_DELIMITER, start) != -1)
    if not complete:
        raise error(stage, "Truncated", f"{key}: the pixel data is cut short (file truncated at "
                    f"{size} bytes); copy the object again", key)
    return ds, True, data


def _j2k_size(frame: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) from the SIZ segment (ISO 15444-1 A.5.1), after a JP2
    wrapper's boxes if any (I.4); None if there is none."""
    at = 0
    if frame[4:8] == b"jP  ":
        while at + 8 <= len(frame) and frame[at + 4:at + 8] != b"jp2c":
            length = int.from_bytes(frame[at:at + 4], "big")
            if length == 1:
                length = int.from_bytes(frame[at + 8:at + 16], "big")
            if length < 8:
                return None
            at += length
        at += 8
    if frame[at:at + 4] != b"\xff\x4f\xff\x51" or len(frame) < at + 42:
        return None
    x, y, x0, y0 = struct.unpack(">4I", frame[at + 8:at + 24])
    return y - y0, x - x0, int.from_bytes(frame[at + 40:at + 42], "big")


def _jpeg_size(frame: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) from the SOFn or SOF55 segment; None if there is none."""
    if frame[:2] != b"\xff\xd8":
        return None
    at = 2
    while at + 10 <= len(frame) and frame[at] == 0xFF:
        if frame[at + 1] == 0xFF:  # fill byte
            at += 1
        elif frame[at + 1] in _SOF:
            rows, cols = struct.unpack(">2H", frame[at + 5:at + 9])
            return rows, cols, frame[at + 9]
        else:
            at += 2 + int.from_bytes(frame[at + 2:at + 4], "big")
    return None


def check_codestreams(data: bytes, ds: Dataset, key: str, n_frames: int) -> None:
    """Refuse a JPEG-family or JPEG 2000 frame whose codestream declares another size than
    (Rows, Columns, 1) before any decoder allocates it (RLE and native sizes come from Rows and
    Columns). A larger size is TooManyVoxels, any other mismatch DecodeFailed."""
    syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
    sizer = _j2k_size if syntax in _J2K else _jpeg_size if syntax in _JPEG else None
    if sizer is None:
        return
    pixels = read_partial(io.BytesIO(data), specific_tags=[0x7FE00010]).get("PixelData")
    want = (int(ds.Rows), int(ds.Columns), 1)
    eot = ((ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)  # as iter_pixels splits them
           if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds else None)
    frames = generate_frames(pixels or b"", number_of_frames=n_frames, extended_offsets=eot)
    for f, frame in enumerate(frames):
        got = sizer(frame)
        if got == want:
            continue
        bigger = got is not None and got[0] * got[1] * max(got[2], 1) > want[0] * want[1]
        raise error("decode", "TooManyVoxels" if bigger else "DecodeFailed",
                    f"{key}: cannot decode pixel data: frame {f}'s codestream declares "
                    f"{' x '.join(map(str, got)) if got else 'no size'} (rows x columns x "
                    f"components), the header {want[0]} x {want[1]} x 1", key)

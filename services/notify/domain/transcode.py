"""Decompress one instance for a receiver that accepts its SOP class only uncompressed.

What this process can decode is asked of pydicom at run time (:func:`decodable_syntaxes`):
each compressed transfer syntax whose pixel data decoder has a plugin importable here (RLE
needs only NumPy; JPEG and JPEG 2000 use Pillow or GDCM; JPEG Lossless and JPEG-LS need GDCM).

Decompressing changes the encoding, not the image (PS3.5 §8, PS3.3 C.7.6.1.1.5): the SOP
Instance UID stays; the Photometric Interpretation becomes that of the decoded pixels (a JPEG's
YBR_FULL or YBR_FULL_422 is decoded to RGB); an image that went through a lossy encoding says
so in Lossy Image Compression (0028,2110) "01", keeps the Lossy Image Compression Ratio and
Method (0028,2112/2114) it had, and gets the Method of that syntax when it had none (the
enhanced IODs require it with "01"). Which encodings were lossy (:func:`went_lossy`): the JPEG
DCT processes always; JPEG-LS near-lossless unless each scan's NEAR is 0; JPEG 2000 and HTJ2K
unless the sender says "00" and no frame uses the irreversible wavelet (``codestream.py``).
What only encapsulated Pixel Data may have goes: the Extended Offset Table (7FE0,0001/0002),
and an Icon Image Sequence (optional) whose icon is still compressed. An image whose decoded
pixels would pass :data:`MAX_DECODED_BYTES` is not decoded at all (decoding holds them twice).
Nothing here logs, and no error names a value from the data set.
"""

from __future__ import annotations

import importlib.util
import io
from collections.abc import Callable
from functools import cache

import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels import get_decoder
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    AllTransferSyntaxes,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
)

from services.notify.domain.codestream import (
    jpeg2000_is_irreversible,
    jpeg_ls_near_lossless_is_lossless,
)

# Decoded pixels above this are not decoded here: pydicom holds every decoded frame and then
# their joined copy, and a worker killed for its memory would replay the batch forever.
MAX_DECODED_BYTES = 1024**3

__all__ = [
    "LOSSY_SYNTAXES",
    "MAX_DECODED_BYTES",
    "UndecodablePixelData",
    "decodable_syntaxes",
    "decoded_size",
    "decompress",
    "decompressed_file",
    "went_lossy",
]

# The syntaxes whose encoding may lose information: JPEG's DCT processes always do, JPEG-LS
# near-lossless, JPEG 2000 and HTJ2K (not their "Lossless Only" variants) may (see went_lossy).
LOSSY_SYNTAXES = frozenset(
    {JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless, JPEG2000, HTJ2K}
)
# Lossy Image Compression Method (0028,2114) per lossy syntax (PS3.3 C.7.6.1.1.5.1).
_METHODS = {
    JPEGBaseline8Bit: "ISO_10918_1",
    JPEGExtended12Bit: "ISO_10918_1",
    JPEGLSNearLossless: "ISO_14495_1",
    JPEG2000: "ISO_15444_1",
    HTJ2K: "ISO_15444_15",
}
_EXTENDED_OFFSET_TABLE = (0x7FE00001, 0x7FE00002)


class UndecodablePixelData(Exception):
    """The Pixel Data could not be decoded: corrupt fragments, a variant no installed plugin
    handles (e.g. 12-bit JPEG Extended), or too large to decode here. The message names the
    error type only."""


def decoded_size(dataset: Dataset) -> int:
    """The bytes the decoded Pixel Data takes, from the header (0 when it does not say)."""
    try:
        frames = int(dataset.get("NumberOfFrames") or 1)
        return (
            int(dataset.Rows)
            * int(dataset.Columns)
            * int(dataset.get("SamplesPerPixel") or 1)
            * max(int(dataset.BitsAllocated) // 8, 1)
            * max(frames, 1)
        )
    except (AttributeError, TypeError, ValueError):
        return 0


@cache
def decodable_syntaxes() -> frozenset[UID]:
    """The compressed transfer syntaxes whose Pixel Data this process can decode."""
    if importlib.util.find_spec("numpy") is None:  # every pydicom decoder returns NumPy arrays
        return frozenset()
    found = set()
    for syntax in AllTransferSyntaxes:
        if not syntax.is_compressed:
            continue
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError:  # pydicom has no decoder at all (MPEG, H.264, ...)
            continue
        if decoder.is_available:
            found.add(syntax)
    return frozenset(found)


def decompress(dataset: Dataset) -> None:
    """Decode ``dataset`` (read from a file in a compressed transfer syntax) in place into
    Explicit VR Little Endian, as the module docstring says.

    Raises UndecodablePixelData; the data set is then in no state to send. MemoryError (a very
    large multi-frame image) is left to the caller: another attempt may have the memory.
    """
    if "PixelData" not in dataset:
        # No image: every other element of an encapsulated syntax is Explicit VR LE already.
        dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        return
    size = decoded_size(dataset)
    if size > MAX_DECODED_BYTES:
        raise UndecodablePixelData(
            f"pixel data too large to decompress here ({size // 1024**2} MiB decoded)"
        )
    stored = UID(dataset.file_meta.TransferSyntaxUID)
    lossy = went_lossy(dataset)  # asks the codestreams, which decoding replaces
    try:
        # Whole or not at all: pydicom decodes every frame before it replaces the Pixel Data.
        dataset.decompress(as_rgb=True, generate_instance_uid=False)
    except MemoryError:
        raise
    except Exception as exc:
        # Plugins raise RuntimeError, ValueError, NotImplementedError, ... on a bad codestream.
        raise UndecodablePixelData(f"pixel data not decodable ({type(exc).__name__})") from exc
    for tag in _EXTENDED_OFFSET_TABLE:  # only for encapsulated Pixel Data
        if tag in dataset:
            del dataset[tag]
    icons = dataset.get("IconImageSequence")
    if icons is not None and any(
        "PixelData" in icon and icon["PixelData"].is_undefined_length for icon in icons
    ):
        del dataset.IconImageSequence  # optional, and still compressed: invalid as it is now
    if lossy:
        dataset.LossyImageCompression = "01"
        if "LossyImageCompressionMethod" not in dataset:
            dataset.LossyImageCompressionMethod = _METHODS[stored]


def went_lossy(dataset: Dataset) -> bool:
    """Whether the image of ``dataset``, in its compressed transfer syntax, went through a
    lossy encoding (so that, decoded, it must say Lossy Image Compression "01"):

    * the JPEG DCT processes: always;
    * JPEG-LS near-lossless: unless every scan of every frame has NEAR 0, which is lossless;
    * JPEG 2000 and HTJ2K: unless the data set says "00" (its sender's word that it was not
      lossy compressed) and no frame uses the irreversible 9-7 wavelet. The reversible one can
      still have lost quality layers, so without that word it counts as lossy;
    * every other syntax: no (whatever the data set says of its history stays as it is).

    A codestream that cannot be read counts as lossy."""
    stored = UID(dataset.file_meta.TransferSyntaxUID)
    if stored not in LOSSY_SYNTAXES:
        return False
    proves_lossless: Callable[[bytes], bool]
    if stored == JPEGLSNearLossless:
        proves_lossless = _near_0
    elif stored in (JPEG2000, HTJ2K) and dataset.get("LossyImageCompression") == "00":
        proves_lossless = _reversible
    else:
        return True
    frames = _frames(dataset)
    return not frames or not all(map(proves_lossless, frames))


def _near_0(frame: bytes) -> bool:
    return jpeg_ls_near_lossless_is_lossless(frame) is True


def _reversible(frame: bytes) -> bool:
    return jpeg2000_is_irreversible(frame) is False


def _frames(dataset: Dataset) -> list[bytes]:
    """The encapsulated frames' codestreams, split as the decoder splits them (by the Extended
    Offset Table when there is one); none, which the caller judges lossy, when they cannot be
    told apart. A list of the frames' bytes is no more than the Pixel Data, which decoding
    holds several times over anyway. MemoryError is left to the caller (see decompress)."""
    offsets = None
    if "ExtendedOffsetTable" in dataset and "ExtendedOffsetTableLengths" in dataset:
        offsets = (dataset.ExtendedOffsetTable, dataset.ExtendedOffsetTableLengths)
    try:
        count = int(dataset.get("NumberOfFrames") or 1)
        frames = list(
            generate_frames(dataset.PixelData, number_of_frames=count, extended_offsets=offsets)
        )
    except MemoryError:
        raise
    except Exception:  # pydicom raises ValueError, KeyError, ... on odd encapsulation
        return []
    # (One fragment for several frames is given as one frame.)
    return frames if len(frames) == count else []


def decompressed_file(data: bytes) -> bytes:
    """A DICOM file (Part 10) in a compressed transfer syntax, decoded (:func:`decompress`) into
    a Part 10 file in Explicit VR Little Endian: for a DICOMweb receiver, which takes files.

    Raises UndecodablePixelData, also for bytes pydicom cannot read; MemoryError is left to
    the caller.
    """
    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
    except MemoryError:
        raise
    except Exception as exc:
        # pydicom raises many types on a corrupt file; the message may quote header values.
        raise UndecodablePixelData(f"not a readable DICOM file ({type(exc).__name__})") from exc
    decompress(dataset)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    del dataset  # the decoded pixels: not held beside the file's two copies below
    return buffer.getvalue()

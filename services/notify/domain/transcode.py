"""Decompress one instance for a receiver that accepts its SOP class only uncompressed.

What this process can decode is asked of pydicom at run time (:func:`decodable_syntaxes`):
each compressed transfer syntax whose pixel data decoder has a plugin importable here (RLE
needs only NumPy; JPEG and JPEG 2000 use Pillow or GDCM; JPEG Lossless and JPEG-LS need GDCM).

Decompressing changes the encoding, not the image (PS3.5 §8, PS3.3 C.7.6.1.1.5): the SOP
Instance UID stays; the Photometric Interpretation becomes that of the decoded pixels (a JPEG's
YBR_FULL or YBR_FULL_422 is decoded to RGB); an image that went through a lossy syntax says so
in Lossy Image Compression (0028,2110) "01", and keeps the Lossy Image Compression Ratio and
Method (0028,2112/2114) it had. Nothing here logs, and no error names a value from the data set.
"""

from __future__ import annotations

import importlib.util
from functools import cache

from pydicom.dataset import Dataset
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

__all__ = ["LOSSY_SYNTAXES", "UndecodablePixelData", "decodable_syntaxes", "decompress"]

# The syntaxes whose encoding may lose information: JPEG's DCT processes always do, JPEG-LS
# near-lossless, JPEG 2000 and HTJ2K (not their "Lossless Only" variants) may. The header cannot
# prove that a "may" did not, so an image decoded from one of them is marked lossy.
LOSSY_SYNTAXES = frozenset(
    {JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless, JPEG2000, HTJ2K}
)


class UndecodablePixelData(Exception):
    """The Pixel Data could not be decoded: corrupt fragments, or a variant no installed plugin
    handles (e.g. 12-bit JPEG Extended). The message names the error type only."""


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
    try:
        stored = UID(dataset.file_meta.TransferSyntaxUID)
        # Whole or not at all: pydicom decodes every frame before it replaces the Pixel Data.
        dataset.decompress(as_rgb=True, generate_instance_uid=False)
    except MemoryError:
        raise
    except Exception as exc:
        # Plugins raise RuntimeError, ValueError, NotImplementedError, ... on a bad codestream.
        raise UndecodablePixelData(f"pixel data not decodable ({type(exc).__name__})") from exc
    if stored in LOSSY_SYNTAXES:
        dataset.LossyImageCompression = "01"

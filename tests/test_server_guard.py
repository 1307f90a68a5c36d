"""Who may call the server: ``Host`` must name it, a browser's ``Origin`` must be its own or an
allowed one (checked before the body is read), the bearer scheme is case-insensitive, the UI
carries its security headers, and the protocol details of issue 14 item 8."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import pytest

import flowstate as fs
from flowstate.server import run_server
from flowstate.server.guard import CSP, HostGuard, bearer_matches, host_name
from flowstate.server.run import listen, settings
from flowstate.wire import codec
from tests import netserver
from tests.test_server import GO_COMMIT_TRANSIT, error_of

DRIVER = "/flowstate.v1.Driver/"
EXECUTE = "/flowstate.v1.Flow/Execute"
EVIL = "http://evil.example"
LIST = json.dumps({"getStates": {"limit": "10"}})


def serve(store: fs.Driver | None = None, **options: object) -> str:
    return netserver.serve(store or fs.MemoryDriver(), **options).url


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30.0) as client:
        yield client


def stored_ids(http: httpx.Client, url: str, **headers: str) -> list[str]:
    answer = http.post(
        url + DRIVER + "GetStates",
        content=LIST,
        headers={"content-type": "application/json", **headers},
    )
    assert answer.status_code == 200, answer.text
    return [s["id"] for s in answer.json()["getStates"]["result"].get("states", [])]


# --- Origin ----------------------------------------------------------------------------------


def test_a_foreign_origin_cannot_commit_without_content_type(http: httpx.Client) -> None:
    """What a page's ``fetch(url, {method: "POST", mode: "no-cors", body})`` sends."""
    url = serve()
    answer = http.post(
        url + DRIVER + "Commit",
        content=GO_COMMIT_TRANSIT,
        headers={"origin": EVIL, "content-type": ""},
    )
    assert answer.status_code == 403
    body = answer.json()
    assert body["code"] == "permission_denied"
    assert EVIL in body["message"]
    assert stored_ids(http, url) == []


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", DRIVER + "GetStates"),
        ("POST", DRIVER + "Nope"),
        ("POST", EXECUTE),
        ("GET", "/ui/api/states"),
        ("GET", "/ui/api/info"),
        ("POST", "/ui/api/end"),
        ("POST", "/ui/api/retry"),
        ("GET", "/health"),
    ],
)
def test_a_foreign_origin_is_refused_on_every_path(
    http: httpx.Client, method: str, path: str
) -> None:
    url = serve(cors_origins=["http://ui.example"])
    answer = http.request(
        method, url + path, content=b"{}", headers={"origin": EVIL, "content-type": "text/plain"}
    )
    assert answer.status_code == 403, answer.text
    assert EVIL in answer.json()["message"]
    assert "access-control-allow-origin" not in answer.headers


def test_the_refusal_comes_before_the_body_is_read() -> None:
    """The server answers after the head alone: the body never has to arrive."""
    url = serve()
    host, port = url.removeprefix("http://").split(":")
    import socket

    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(
            b"POST /flowstate.v1.Driver/Commit HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Origin: http://evil.example\r\nContent-Length: 1000000\r\n\r\n"
        )
        head = conn.recv(4096)
    assert head.startswith(b"HTTP/1.1 403 ")
    assert b"connection: close" in head.lower()


def test_the_servers_own_pages_may_call_it(http: httpx.Client) -> None:
    """The UI's own requests carry ``Origin`` equal to the server's scheme://host:port."""
    url = serve()
    port = url.rsplit(":", 1)[1]
    for origin in (url, f"http://localhost:{port}"):
        host = origin.removeprefix("http://")
        assert stored_ids(http, url, origin=origin, host=host) == []
        answer = http.get(url + "/ui/api/info", headers={"origin": origin, "host": host})
        assert answer.status_code == 200, answer.text
    # the same host on another port is another origin
    answer = http.get(url + "/ui/api/info", headers={"origin": "http://127.0.0.1:1"})
    assert answer.status_code == 403


def test_an_allowed_origin_gets_cors(http: httpx.Client) -> None:
    url = serve(cors_origins=["http://ui.example"])
    answer = http.post(
        url + DRIVER + "GetStates",
        content=LIST,
        headers={"origin": "http://ui.example", "content-type": "application/json"},
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["access-control-allow-origin"] == "http://ui.example"
    any_origin = serve(cors_origins=["*"])
    assert stored_ids(http, any_origin, origin=EVIL) == []


def test_the_go_client_without_origin_or_content_type_still_commits(http: httpx.Client) -> None:
    url = serve()
    answer = http.post(url + DRIVER + "Commit", content=GO_COMMIT_TRANSIT)
    assert answer.status_code == 200, answer.text
    assert stored_ids(http, url) == ["aTID"]


# --- Host ------------------------------------------------------------------------------------


def test_a_foreign_host_is_refused(http: httpx.Client) -> None:
    """DNS rebinding: the page's own name resolved to 127.0.0.1 arrives as Host."""
    url = serve()
    for path, method in (("/ui/api/info", "GET"), ("/health", "GET"), (DRIVER + "Commit", "POST")):
        answer = http.request(
            method, url + path, content=GO_COMMIT_TRANSIT, headers={"host": "evil.test:8080"}
        )
        assert answer.status_code == 421, (path, answer.text)
        code, message = error_of(answer)
        assert code == "permission_denied" and "evil.test" in message
    assert stored_ids(http, url) == []


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "LOCALHOST:8080",
        "localhost.",
        "127.0.0.1:9",
        "[::1]:8080",
        "10.1.2.3",
        "[fe80::1]",
    ],
)
def test_loopback_names_and_addresses_are_served(http: httpx.Client, host: str) -> None:
    url = serve()
    answer = http.get(url + "/health", headers={"host": host})
    assert answer.status_code == 200, answer.text


def test_allowed_hosts_add_names(http: httpx.Client) -> None:
    url = serve(allowed_hosts=["flow.internal", "*.corp.example"])
    for host, status in [
        ("flow.internal:8080", 200),
        ("a.corp.example", 200),
        ("corp.example", 421),
        ("evilcorp.example", 421),
        ("other.internal", 421),
    ]:
        assert http.get(url + "/health", headers={"host": host}).status_code == status, host
    anything = serve(allowed_hosts=["*"])
    assert http.get(anything + "/health", headers={"host": "evil.test"}).status_code == 200


def test_the_host_check_applies_to_h2c() -> None:
    url = serve()
    # prior knowledge, what the Go client and NetDriver(http2=True) speak
    with httpx.Client(http1=False, http2=True, timeout=30.0) as h2:
        bad = h2.get(url + "/health", headers={"host": "evil.test"})
        good = h2.get(url + "/health")
    assert (bad.http_version, bad.status_code) == ("HTTP/2", 421)
    assert (good.http_version, good.status_code) == ("HTTP/2", 200)


def test_host_names() -> None:
    assert host_name("Example.COM.:80") == "example.com"
    assert host_name("[::1]:8080") == "::1"
    guard = HostGuard(["Flow.Internal:8080"])
    assert guard.host_allowed(b"flow.internal")
    assert guard.host_allowed(None) and guard.host_allowed(b"")  # HTTP/1.0 without Host
    assert guard.refusal(b"x.test", None) is not None


def test_settings_take_allowed_hosts_from_the_environment() -> None:
    s = settings(env={"FLOWSTATE_ALLOWED_HOSTS": "a.example, b.example"})
    assert s.allowed_hosts == ("a.example", "b.example")
    assert settings(allowed_hosts=["c"], env={"FLOWSTATE_ALLOWED_HOSTS": "a"}).allowed_hosts == (
        "c",
    )


# --- bearer ----------------------------------------------------------------------------------


def test_the_bearer_scheme_is_case_insensitive(http: httpx.Client) -> None:
    url = serve(token="s3cret")
    for scheme in ("Bearer", "bearer", "BEARER", "bEaReR"):
        auth = {"authorization": f"{scheme} s3cret"}
        assert stored_ids(http, url, **auth) == []  # the lean route
        assert http.get(url + "/ui/api/info", headers=auth).status_code == 200  # Starlette
    for wrong in ("Basic s3cret", "Bearers3cret", "Bearer s3cret2", "s3cret", "Bearer"):
        answer = http.get(url + "/ui/api/info", headers={"authorization": wrong})
        assert answer.status_code == 401, wrong
    assert bearer_matches(b"bearer   tok", b"tok")
    assert not bearer_matches(None, b"tok")


# --- UI headers ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/ui/static/app.js", "/ui/static/style.css"])
def test_the_page_and_its_files_carry_security_headers(http: httpx.Client, path: str) -> None:
    url = serve(token="s3cret")  # public paths: served without the token
    answer = http.get(url + path)
    assert answer.status_code == 200
    assert answer.headers["content-security-policy"] == CSP
    assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["x-frame-options"] == "DENY"


# --- protocol details ------------------------------------------------------------------------


async def test_executing_an_unknown_flow_is_404() -> None:
    """On a server with a flow registry shared through the store (what ``serve`` runs)."""
    store = fs.MemoryDriver()
    sock = listen("127.0.0.1", 0)
    stop = asyncio.Event()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = asyncio.create_task(run_server(store, sock, http_host=url, stop=stop))
    try:
        async with httpx.AsyncClient(base_url=url, timeout=30.0) as client:
            for _ in range(600):
                try:
                    await client.get("/health")
                    break
                except httpx.TransportError:
                    assert not server.done(), server
                    await asyncio.sleep(0.05)
            body = {"current": {"id": "s1", "transition": {"to": "nowhere"}}}
            answer = await client.post(EXECUTE, json=body)
            assert answer.status_code == 404, answer.text
            assert answer.json()["code"] == "not_found"
            assert "nowhere" in answer.json()["message"]
    finally:
        stop.set()
        await asyncio.wait_for(server, 60)
        sock.close()


def test_a_null_label_value_is_refused(http: httpx.Client) -> None:
    url = serve()
    ctx = {"current": {"id": "n1", "labels": {"k": None}, "transition": {"to": "x"}}}
    body = {
        "stateCtxs": [ctx],
        "commit": {"commands": [{"transit": {"stateRef": {"idx": 0}, "to": "x"}}]},
    }
    answer = http.post(url + DRIVER + "Commit", json=body)
    assert answer.status_code == 400, answer.text
    assert "labels" in answer.json()["message"]
    assert stored_ids(http, url) == []


@pytest.mark.parametrize("ref", [" 1_0", "1_0", "+1", "\u0661", "1 ", "0x1", "01x"])
def test_a_data_reference_must_be_a_plain_decimal(http: httpx.Client, ref: str) -> None:
    store = fs.MemoryDriver()
    url = serve(store)

    async def seed() -> None:
        ctx = fs.StateCtx(current=fs.State("d1"))
        for _ in range(10):  # data revs 1..10: " 1_0" would find rev 10
            await store.store_data(fs.Data(b"payload"))
        await fs.Engine(store, recovery=False, delayer=False).do(fs.commit(fs.transit(ctx, "x")))

    asyncio.run(seed())
    state = {
        "id": "d1",
        "rev": "1",
        "annotations": {"flowstate.data.doc": ref},
        "transition": {"to": "x"},
    }
    body = {"stateCtxs": [{"current": state}], "getData": {"stateRef": {"idx": 0}, "alias": "doc"}}
    answer = http.post(url + DRIVER + "GetData", json=body)
    assert answer.status_code == 400, (ref, answer.text)
    assert "flowstate.data.doc" in answer.json()["message"]


def test_codec_error_names_the_label() -> None:
    raw = json.dumps({"stateCtxs": [{"current": {"id": "a", "labels": {"k": None}}}]}).encode()
    with pytest.raises(fs.ValidationError) as err:
        codec.decode_command(raw, json=True)
    assert "labels['k']" in str(err.value) and "null" in str(err.value)


def test_serve_takes_allowed_hosts_from_its_flag_and_the_environment() -> None:
    from tests.test_server_stalls import served

    with (
        served("--allowed-host", "flow.test", extra_env={"FLOWSTATE_ALLOWED_HOSTS": "x.test"}) as (
            port,
            _,
        ),
        httpx.Client(timeout=30.0) as http,
    ):
        url = f"http://127.0.0.1:{port}/health"
        for host, status in [
            ("flow.test", 200),  # the flag (it wins over the variable)
            ("x.test", 421),
            ("localhost", 200),
            ("evil.test", 421),
        ]:
            assert http.get(url, headers={"host": host}).status_code == status, host
    with served(extra_env={"FLOWSTATE_ALLOWED_HOSTS": "x.test, y.test"}) as (port, _):
        url = f"http://127.0.0.1:{port}/health"
        assert httpx.get(url, headers={"host": "y.test"}, timeout=30.0).status_code == 200


def test_a_server_answers_to_its_listen_and_advertised_names() -> None:
    import socket

    from flowstate.server.run import server_names

    assert server_names("127.0.0.1", "http://billing.internal:8081", ["x"]) == [
        "x",
        "billing.internal",
    ]
    assert socket.gethostname() in server_names("0.0.0.0", "http://localhost:8080")

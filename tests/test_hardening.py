"""A server that one bad client cannot break (issue 14): authentication hygiene so far.

Each test plays the attacker of one row of docs/deployment.md's bad-input table against a
server on loopback and checks the answer and that nothing changed.
"""

from __future__ import annotations

import shutil

import httpx
import pytest

from latentfuse.http.app import BackgroundServer, create_app
from latentfuse.http.auth import Credential, TokenBook, issue_tokens, parse_client_id
from latentfuse.http.remote import RemoteServer, read_token
from tests.test_http_app import make_service, world  # noqa: F401  (fixture, by name)


@pytest.fixture(scope="module")
def tiny(request: pytest.FixtureRequest) -> dict:
    """The tiny run of tests/test_http_app.py with its client tokens."""
    return request.getfixturevalue("world")


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    """A sampling-only server and its URL."""
    service = make_service(tiny, tmp_path_factory.mktemp("state"))
    with BackgroundServer(service) as url:
        yield service, url


def get(url: str, path: str, token: str | None = None, method: str = "GET") -> httpx.Response:
    """One request with an optional bearer token."""
    headers = {}
    if token is not None:  # raw bytes, as an attacker sends them (latin-1 where it fits)
        value = f"Bearer {token}"
        try:
            headers["Authorization"] = value.encode("latin-1")
        except UnicodeEncodeError:
            headers["Authorization"] = value.encode()
    return httpx.request(method, f"{url}{path}", headers=headers, timeout=30)


@pytest.mark.parametrize(
    "token", ["lf².abc", "lf٣.abc", "lf00.abc", "lf+0.abc", "lf0x1.abc", "lf" + "9" * 5000 + ".a"]
)
def test_a_malformed_token_prefix_is_401_not_500(server, token):
    _, url = server
    response = get(url, "/v1/status", token)
    assert response.status_code == 401
    assert response.json()["error"] == "unauthorized"


@pytest.mark.parametrize("spelling", ["00", "+0", "0.0", "٠", "²", "-0", " 0", "1" * 12])
def test_a_client_id_has_one_spelling(server, tiny, spelling):
    _, url = server
    response = get(url, f"/v1/clients/{spelling}/uploads", tiny["tokens"][0])
    assert response.status_code == 404
    assert set(response.json()) == {"error", "detail"}


@pytest.mark.parametrize(
    ("text", "expected"), [("0", 0), ("17", 17), ("00", None), ("+1", None), ("١", None)]
)
def test_parse_client_id_is_strict(text, expected):
    assert parse_client_id(text) == expected


def test_unknown_client_and_bad_token_look_the_same_and_cost_the_same(server, tiny, monkeypatch):
    _, url = server
    derivations = []
    original = Credential.matches
    monkeypatch.setattr(
        Credential, "matches", lambda self, token: derivations.append(1) or original(self, token)
    )
    token = tiny["tokens"][0]
    unknown = get(url, "/v1/clients/7/uploads", token + "x")
    unknown_cost, derivations[:] = len(derivations), []
    wrong = get(url, "/v1/clients/0/uploads", token + "x")
    assert (unknown.status_code, wrong.status_code) == (401, 401)
    assert unknown.json()["error"] == wrong.json()["error"] == "unauthorized"
    assert unknown.json()["detail"].replace("7", "0") == wrong.json()["detail"]
    assert unknown_cost == len(derivations) == 1  # one key derivation each


def test_a_reissued_token_takes_effect_without_a_restart(tiny, tmp_path):
    root = tmp_path / "deploy"
    shutil.copytree(tiny["root"], root, ignore=shutil.ignore_patterns("state*"))
    service = make_service({**tiny, "root": root}, tmp_path / "state")
    old = read_token(root / "tokens" / "client-0.token")
    with BackgroundServer(service) as url:
        assert get(url, "/v1/clients/0/uploads", old).status_code == 200
        issue_tokens(root / "clients.json", root / "tokens", [0], iterations=1000)
        new = read_token(root / "tokens" / "client-0.token")
        assert get(url, "/v1/clients/0/uploads", old).status_code == 401  # revoked at once
        assert get(url, "/v1/clients/0/uploads", new).status_code == 200
        (root / "clients.json").write_text("{not json")  # a broken file keeps the last book
        assert get(url, "/v1/clients/0/uploads", new).status_code == 200


def test_api_docs_are_off_unless_enabled(server, tiny):
    service, url = server
    for path in ("/docs", "/openapi.json", "/redoc"):
        response = get(url, path)
        assert response.status_code == 404 and set(response.json()) == {"error", "detail"}
    from fastapi.testclient import TestClient

    enabled = TestClient(create_app(service, api_docs=True))  # no `with`: no lifespan
    assert enabled.get("/openapi.json").status_code == 200


def test_unknown_paths_and_methods_answer_in_the_documented_shape(server):
    _, url = server
    for method, path, status in [("GET", "/nope", 404), ("DELETE", "/healthz", 405)]:
        response = get(url, path, method=method)
        assert response.status_code == status
        assert set(response.json()) == {"error", "detail"}


def test_tls_ca_with_a_plain_http_url_is_an_error():
    with pytest.raises(ValueError, match="--tls-ca applies to https://"):
        RemoteServer("http://127.0.0.1:1", "lf0.x", 0, tls_ca="cert.pem")


def test_token_book_without_a_file_never_reloads():
    book = TokenBook({})
    assert book.refresh() is False

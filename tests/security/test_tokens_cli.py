"""``flext-mesh tokens``: the real command on a real file, and its tokens used against a
real control plane by the real CLI."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from flext_mesh.cli import main
from flext_mesh.security.tokens import TokenFile, TokensFileError, hash_token, load_entries
from flext_mesh.server import create_server
from tests.conftest import BIN
from tests.security.test_auth import config_for


def tokens_process(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``flext-mesh tokens ARGS`` as a process, as a user does."""
    return subprocess.run(
        [str(BIN / "flext-mesh"), "tokens", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def tokens(capsys: pytest.CaptureFixture[str]) -> Callable[..., Ran]:
    """Run ``flext-mesh tokens ARGS`` through the CLI's entry point in this process
    (the same code as the command, without a Python start-up per call)."""

    def run(*args: str) -> Ran:
        capsys.readouterr()
        try:
            main(["tokens", *args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return Ran(code, out, err)

    return run


async def cli(*args: str) -> tuple[int, str, str]:
    """Run ``flext-mesh ARGS`` without blocking the loop of an in-process control plane."""
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "flext-mesh"),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def test_create_prints_the_token_once_and_stores_only_its_hash(
    tmp_path: Path, tokens: Callable[..., Ran]
) -> None:
    path = tmp_path / "secrets" / "tokens.yaml"
    created = tokens_process(
        "create", "payment-sidecar", "--scope", "service:payment", "--file", str(path)
    )
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert created.stdout == token + "\n"  # stdout is the token alone: `TOKEN=$(...)`
    assert token.startswith("fm_")
    assert len(token) == 3 + 43
    assert "printed once" in created.stderr
    assert token not in created.stderr
    assert path.stat().st_mode & 0o777 == 0o600
    text = path.read_text()
    assert token not in text
    assert token[3:] not in text
    assert hash_token(token) in text
    [entry] = load_entries(path)
    assert (entry.name, entry.scopes) == ("payment-sidecar", ("service:payment",))
    # The control plane's view of the file knows the token by its hash.
    view = TokenFile(path)
    view.load()
    identity = view.identify(token)
    assert identity is not None
    assert (identity.name, identity.scopes) == ("payment-sidecar", frozenset({"service:payment"}))
    assert view.identify(token + "x") is None

    second = tokens("create", "ci", "--scope", "read", "--scope", "workflow", "--file", str(path))
    assert second.returncode == 0
    assert second.stdout.strip() != token
    listed = tokens("list", "--file", str(path))
    assert listed.returncode == 0
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["NAME", "SCOPES", "CREATED"]
    assert [line.split()[:2] for line in lines[1:]] == [
        ["payment-sidecar", "service:payment"],
        ["ci", "read,workflow"],
    ]
    as_json = json.loads(tokens("list", "--file", str(path), "-o", "json").stdout)
    assert [t["name"] for t in as_json["tokens"]] == ["payment-sidecar", "ci"]
    assert "sha256" not in listed.stdout
    assert hash_token(token) not in listed.stdout


def test_revoke_removes_the_entry_and_keeps_the_others(
    tmp_path: Path, tokens: Callable[..., Ran], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "tokens.json"
    monkeypatch.setenv("FLEXT_MESH_AUTH_TOKENS_FILE", str(path))  # serve reads it too
    for name in ("a", "b"):
        assert tokens("create", name, "--scope", "admin").returncode == 0
    assert json.loads(path.read_text())["tokens"][0]["name"] == "a"  # JSON stays JSON
    revoked = tokens("revoke", "a")
    assert revoked.returncode == 0
    assert revoked.stdout == "revoked token 'a' (admin)\n"
    assert [entry.name for entry in load_entries(path)] == ["b"]
    again = tokens("revoke", "a")
    assert again.returncode == 1
    assert again.stderr == f"flext-mesh: error: {path}: no token named 'a'\n"


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (
            ["create", "x", "--scope", "root"],
            2,
            "argument --scope: 'root' is not a scope: use one of admin, read, workflow, "
            "service:NAME",
        ),
        (["create", "x", "--scope", "service:bad name"], 2, "'bad name' is not a service name"),
        (["create", "dup", "--scope", "read"], 1, "a token named 'dup' exists; revoke it first"),
        (["create", "no spaces", "--scope", "read"], 1, "name must be 1 to 128 letters"),
        (["list", "--file", "/nonexistent/tokens.yaml"], 1, "no such tokens file"),
    ],
)
def test_mistakes_exit_non_zero_with_one_line(
    tmp_path: Path, tokens: Callable[..., Ran], args: list[str], code: int, message: str
) -> None:
    path = tmp_path / "tokens.yaml"
    assert tokens("create", "dup", "--scope", "read", "--file", str(path)).returncode == 0
    before = path.read_text()
    if "--file" not in args:
        args = [*args, "--file", str(path)]
    proc = tokens(*args)
    assert proc.returncode == code
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert proc.stdout == ""
    assert path.read_text() == before


def test_an_invalid_file_is_refused_naming_the_entry(
    tmp_path: Path, tokens: Callable[..., Ran]
) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text(f"tokens:\n  - name: short\n    sha256: {'a' * 63}\n    scopes: [read]\n")
    with pytest.raises(TokensFileError) as info:
        load_entries(path)
    assert str(info.value) == (
        f"{path}: tokens[0] (name 'short'): sha256 must be 64 hex digits (the token's SHA-256)"
    )
    proc = tokens("create", "new", "--scope", "read", "--file", str(path))
    assert proc.returncode == 1
    assert "tokens[0] (name 'short')" in proc.stderr


async def test_a_created_token_lets_the_cli_in(tmp_path: Path, tokens: Callable[..., Ran]) -> None:
    path = tmp_path / "tokens.yaml"
    token = tokens("create", "ops", "--scope", "read", "--file", str(path)).stdout.strip()
    plane, port = await create_server(config_for(tmp_path, auth_tokens_file=str(path)))
    address = f"127.0.0.1:{port}"
    try:
        code, out, err = await cli("services", "list", "--control-plane", address)
        assert code == 1
        assert err.startswith("flext-mesh: error: missing credentials: send the metadata")
        code, out, err = await cli("services", "list", "--control-plane", address, "--token", token)
        assert (code, err) == (0, "")
        assert out.split()[:3] == ["NAME", "INSTANCES", "HEALTHY"]
        assert tokens("revoke", "ops", "--file", str(path)).returncode == 0
        for _ in range(40):  # the control plane notices within a second
            code, out, err = await cli(
                "services", "list", "--control-plane", address, "--token", token
            )
            if code != 0:
                break
            await asyncio.sleep(0.1)
        assert (code, err) == (1, "flext-mesh: error: invalid bearer token: unknown or revoked\n")
    finally:
        await plane.stop(0.2)

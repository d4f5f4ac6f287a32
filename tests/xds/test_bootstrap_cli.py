"""``flext-mesh xds bootstrap``: the file a gRPC client reads, and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flext_mesh.cli import main


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        main(["xds", "bootstrap", *args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_the_node_always_carries_a_locality(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--node-id", "web-1", "--control-plane", "10.0.0.5:50051")
    assert code == 0
    assert json.loads(out) == {
        "xds_servers": [
            {
                "server_uri": "10.0.0.5:50051",
                "channel_creds": [{"type": "insecure"}],
                "server_features": ["xds_v3"],
            }
        ],
        "node": {"id": "web-1", "locality": {"region": "", "zone": ""}},
    }
    code, out, _ = run(capsys, "--node-id", "web-1", "--zone", "eu-1a")
    assert json.loads(out)["node"]["locality"]["zone"] == "eu-1a"


def test_tls_names_the_files_absolute_and_replicas_each_get_a_server(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("ca.crt", "me.crt", "me.key"):
        (tmp_path / name).write_text("x")
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(
        capsys, "--node-id", "n", "--control-plane", "a:1,[::1]:2",
        "--tls-ca", "ca.crt", "--tls-cert", "me.crt", "--tls-key", "me.key",
    )  # fmt: skip
    assert code == 0
    servers = json.loads(out)["xds_servers"]
    assert [s["server_uri"] for s in servers] == ["a:1", "[::1]:2"]
    assert servers[0]["channel_creds"] == [
        {
            "type": "tls",
            "config": {
                "ca_certificate_file": str(tmp_path / "ca.crt"),
                "certificate_file": str(tmp_path / "me.crt"),
                "private_key_file": str(tmp_path / "me.key"),
            },
        }
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--node-id", " "), "--node-id must be 1 to 256 characters"),
        (("--node-id", "n", "--control-plane", "nowhere"), "--control-plane"),
        (("--node-id", "n", "--tls-ca", "/no/such/ca.crt"), "no such file"),
        (("--node-id", "n", "--tls-cert", "c"), "--tls-cert and --tls-key go together"),
    ],
)
def test_bad_input_is_one_error_line(
    capsys: pytest.CaptureFixture[str], args: tuple[str, ...], message: str
) -> None:
    code, out, err = run(capsys, *args)
    assert code == 2
    assert out == ""
    assert err.startswith("flext-mesh: error: ")
    assert message in err
    assert err.count("\n") == 1

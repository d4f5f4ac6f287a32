"""Every ``flext-sidecar`` command of the documentation runs as printed, from the
repository root, and the sidecar it starts registers and serves.

The commands are read from README.md and docs/*.md (code blocks, ``\\``-continued lines joined, and
inline code in the prose); a command is one that names ``--app`` (``flext-sidecar
--zone`` in a sentence names a flag). Each runs through ``bash -c`` in the repository
root with no ``PYTHONPATH``, against a real control plane: the one the same code block
starts with ``flext-mesh serve`` (TLS, tokens), else a plain one. What changes, and
only this:

- addresses: ``--listen`` becomes ``127.0.0.1:0`` and ``--control-plane`` the test
  control plane's address (the default one is given as ``FLEXT_MESH_CONTROL_PLANE``);
- files: ``pki/`` and ``var/`` are a temporary directory's, filled by the README's own
  ``flext-mesh certs`` and ``flext-mesh tokens create`` commands;
- ``$PAYMENT_TOKEN`` and ``$OPS_TOKEN`` hold the tokens those commands printed.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from flext_mesh.rpc.channels import ClientSecurity, open_channel
from flext_mesh.v1 import processor_pb2, processor_pb2_grpc, registry_pb2, registry_pb2_grpc
from tests.conftest import BIN, REPO, ServeProcess, start_serve

pytestmark = pytest.mark.xdist_group("readme_commands")

#: README.md and the pages of docs/, one after the other (each page's fences are balanced).
README = "\n".join(
    path.read_text() for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
)
_SERVING = re.compile(r"serving service=\S+ instance=(?P<instance>\S+) listen=(?P<listen>\S+)")
#: A payload each demo app's first operation accepts.
CALLS = {
    "PAYMENT": ("charge", {"order_id": "o-1", "amount": 12.5}),
    "INVENTORY": ("reserve", {"order_id": "o-1", "items": ["book"]}),
}


@dataclass(frozen=True)
class Command:
    """A ``flext-sidecar`` command of the README and the control plane it talks to."""

    text: str
    serve: tuple[str, ...]
    """Arguments of the ``flext-mesh serve`` printed beside it (empty: a plain one)."""


def _split(text: str) -> tuple[list[str], str]:
    """The shell code blocks of ``text`` (fenced sh, bash, console or bare) and the
    prose outside every block."""
    blocks: list[str] = []
    prose: list[str] = []
    fence: str | None = None
    body: list[str] = []
    for line in text.splitlines():
        if line.startswith("```"):
            if fence is None:
                fence, body = line[3:].strip(), []
            else:
                if fence in ("", "sh", "bash", "console"):
                    blocks.append("\n".join(body))
                fence = None
        elif fence is None:
            prose.append(line)
        else:
            body.append(line)
    return blocks, "\n".join(prose)


SHELL_BLOCKS, PROSE = _split(README)


#: A command whose output a variable keeps: ``NAME=$(command)``.
_KEPT_IN_VARIABLE = re.compile(r"^[A-Z_]+=\$\((?P<command>[^)]*)\)$")


def _logical_lines(block: str) -> list[str]:
    """The block's commands: continued lines joined, ``$ `` prompts and a trailing ``&``
    (run in the background) dropped."""
    lines = block.replace("\\\n", " ").splitlines()
    return [
        line.strip().removeprefix("$ ").removesuffix("&").strip() for line in lines if line.strip()
    ]


def readme_commands() -> list[Command]:
    """Every ``flext-sidecar`` command the README prints, in order."""
    found: list[Command] = []
    for block in SHELL_BLOCKS:
        lines = _logical_lines(block)
        serve: tuple[str, ...] = ()
        for line in lines:
            if line.startswith("flext-mesh serve"):
                serve = tuple(shlex.split(line, comments=True)[2:])
        found += [
            Command(line, serve)
            for line in lines
            if line.startswith("flext-sidecar ") and "--app" in line
        ]
    for span in re.finditer(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", PROSE, flags=re.S):
        text = " ".join(span[2].split())
        if text.startswith("flext-sidecar ") and "--app" in text:
            found.append(Command(text, ()))
    return found


COMMANDS = readme_commands()


def _with_files(arg: str, directory: Path) -> str:
    for prefix in ("pki/", "var/"):
        if arg.startswith(prefix):
            return str(directory / arg)
    return arg


def _substituted(words: list[str], directory: Path, control_plane: str) -> list[str]:
    out: list[str] = []
    for word in words:
        flag = out[-1] if out else ""
        if flag == "--listen":
            out.append("127.0.0.1:0")
        elif flag == "--control-plane":
            out.append(control_plane)
        else:
            out.append(_with_files(word, directory))
    return out


@dataclass
class Setup:
    """The files the README's commands make, the tokens they printed, the control
    planes started so far (one per distinct ``flext-mesh serve``)."""

    directory: Path
    tokens: dict[str, str]
    planes: dict[tuple[str, ...], ServeProcess]

    def plane(self, serve: tuple[str, ...]) -> ServeProcess:
        if serve not in self.planes:
            args = [_with_files(arg, self.directory) for arg in serve]
            if "--listen" in args:  # start_serve listens on 127.0.0.1:0
                at = args.index("--listen")
                del args[at : at + 2]
            store = f"sqlite:///{self.directory / f'mesh-{len(self.planes)}.db'}"
            self.planes[serve] = start_serve(
                self.directory, *args, "--store", store, "--health-check-interval", "0.5"
            )
        return self.planes[serve]

    def security(self, serve: tuple[str, ...]) -> ClientSecurity:
        """How an operator of that control plane calls it (and its sidecars)."""
        pki = self.directory / "pki"
        if "--tls-client-auth" in serve:
            return ClientSecurity(
                tls_ca=str(pki / "ca.crt"),
                tls_cert=str(pki / "ops.crt"),
                tls_key=str(pki / "ops.key"),
            )
        if "--auth-tokens-file" in serve:
            return ClientSecurity(token=self.tokens["OPS_TOKEN"])
        return ClientSecurity()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """Runs the README's ``flext-mesh certs`` and ``flext-mesh tokens create`` commands
    in a temporary directory."""
    directory = tmp_path_factory.mktemp("readme-commands")
    tokens: dict[str, str] = {}
    for block in SHELL_BLOCKS:
        for line in _logical_lines(block):
            # `flext-mesh certs ...`, `flext-mesh tokens create ...`, or the token kept in
            # a variable: `PAYMENT_TOKEN=$(flext-mesh tokens create ...)`.
            kept = _KEPT_IN_VARIABLE.match(line)
            command = kept["command"] if kept else line
            if not command.startswith(("flext-mesh certs ", "flext-mesh tokens create ")):
                continue
            words = shlex.split(command, comments=True)
            done = subprocess.run(
                [str(BIN / "flext-mesh"), *words[1:]],
                cwd=directory,
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            )
            if words[2] == "create":  # payment-sidecar prints $PAYMENT_TOKEN
                tokens[f"{words[3].split('-')[0].upper()}_TOKEN"] = done.stdout.strip()
    state = Setup(directory, tokens, {})
    try:
        yield state
    finally:
        for plane in state.planes.values():
            if plane.proc.poll() is None:
                plane.kill()


def test_the_readme_prints_the_sidecar_commands_found_here() -> None:
    texts = [command.text for command in COMMANDS]
    assert len(texts) >= 5, texts
    assert all("--app" in text for text in texts)
    assert any("--app-dir" in text for text in texts), "the README shows --app-dir"
    assert any("--tls-cert" in text for text in texts)
    assert any("--token" in text for text in texts)


@pytest.mark.parametrize("command", COMMANDS, ids=[c.text[14:60] for c in COMMANDS])
def test_each_readme_sidecar_command_registers_and_serves(
    command: Command, setup: Setup, tmp_path: Path
) -> None:
    plane = setup.plane(command.serve)
    words = _substituted(shlex.split(command.text, comments=True), setup.directory, plane.address)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(setup.tokens)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["FLEXT_MESH_CONTROL_PLANE"] = plane.address
    log_path = tmp_path / "sidecar.log"
    # What a user types, after the substitutions of the module docstring; "exec" so
    # that the signal below reaches the sidecar, not the shell.
    line = " ".join(f'"{w}"' if w.startswith("$") else shlex.quote(w) for w in words)
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            ["bash", "-c", f"exec {line}"],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
    security = setup.security(command.serve)
    operation, payload = CALLS[words[words.index("--app") + 1].rsplit(":", 1)[1]]
    try:
        deadline = time.monotonic() + 30
        while not (match := _SERVING.search(log_path.read_text())):
            assert proc.poll() is None, f"{command.text}\n{log_path.read_text()}"
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        service = words[words.index("--service") + 1]
        with open_channel(plane.address, security, aio=False) as channel:
            registry = registry_pb2_grpc.RegistryServiceStub(channel)
            while True:
                try:
                    found = registry.Discover(
                        registry_pb2.DiscoverRequest(service_name=service, healthy_only=False),
                        timeout=5,
                    )
                except grpc.RpcError:
                    found = registry_pb2.DiscoverResponse()
                instances = {i.instance_id: i for i in found.instances}
                if match["instance"] in instances:
                    break
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
        endpoint = instances[match["instance"]].endpoint
        with open_channel(endpoint, security, aio=False) as channel:
            request = processor_pb2.InvokeRequest(operation=operation)
            request.payload.update(payload)
            reply = processor_pb2_grpc.ProcessorServiceStub(channel).Invoke(request, timeout=5)
        assert reply.HasField("result"), log_path.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            raise AssertionError(f"no exit 30 s after SIGTERM:\n{log_path.read_text()}") from None
    log = log_path.read_text()
    assert code == 0, log
    assert "Traceback" not in log, log
    assert "registered service=" in log, log

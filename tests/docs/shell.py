"""Read the shell blocks of a documentation page and run them in one bash session.

The conventions (docs/README.md says them for writers):

- A block fenced ```` ```sh ```` (or ``console``, ``bash``) is run. Other fences
  (``text``, ``python``, ``yaml``, bare) are not: ```` ```text ```` is for output shown
  without a command, or commands shown as a synopsis.
- In a block with ``$ `` prompts, a line starting ``$ `` is a command and the lines
  after it, up to the next prompt, are what it prints. Without prompts, every line is
  a command (a line starting with ``#`` is a comment) and nothing is checked but the
  exit status.
- A command goes on over several lines while a line ends with ``\\``, a quote is open,
  or a here-document (``<<'EOF'``) has not reached its end.
- Printed output is checked line by line, in order, not byte for byte: each printed
  line must match a later line of the real output word for word, where a word that
  holds a digit (an id, a time, a count, a port) matches any word, a word with ``...``
  matches any word that starts with what comes before the ``...``, and a line ``...``
  is skipped. Runs of spaces are one.
- A command is expected to exit 0, unless what it prints has a line starting
  ``ERROR:`` (grpcurl) or ``<program>: error:``, or the command ends with a comment
  ``# exits N``.
- A value the reader copies from earlier output is written as an UPPER_CASE
  placeholder that :data:`PLACEHOLDERS` knows (``LEASE_ID``, ``EXECUTION_ID``); the
  harness puts there the last such value printed earlier on the page.
- Long-running commands (``make run``, ``flext-mesh serve``, ``flext-sidecar``,
  ``etcd``) are started in the background, with or without a trailing ``&``, each with
  its output in a log file; the next command runs once the process says it serves
  (``serving grpc=``, ``registered service=``, ``ready to serve``). A new control plane
  on a port a running one holds (on any address) stops that one first (the page says
  "instead"; SIGKILL if it still runs 1 s after SIGTERM).
  Everything started is stopped (SIGTERM, then SIGKILL) when the page ends: sidecars
  first, then control planes, then etcd.
- What the harness changes, and only this: every ``HOST:PORT`` of 127.0.0.1,
  localhost, 0.0.0.0 or mesh.example.com gets a free port in place of the printed one
  (the same printed port, the same free port, across the page), mesh.example.com
  becomes localhost, ``FLEXT_MESH_CONTROL_PLANE`` points at the free port of
  127.0.0.1:50051 (the CLI's default), and ``make run`` is run as ``make -o
  .venv/.installed run`` (no reinstall in the middle of a test). Commands run in a
  temporary directory that links to the repository's files (``examples/``, ``.venv``,
  ``Makefile``, ...), so ``var/`` and ``pki/`` are the test's own, and with ``.venv/bin``
  off the ``PATH`` until a command activates it.
"""

from __future__ import annotations

import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import BIN, REPO

RUN_FENCES = ("sh", "bash", "console")
#: Values a reader copies from earlier output: placeholder -> a regex whose first
#: non-empty group is the value. The last match in the page's output so far is used.
PLACEHOLDERS = {
    "LEASE_ID": r'"lease_id": "([0-9a-f]+)"',
    "EXECUTION_ID": r'"execution_id": "(\w+)"|^execution (\w+)[: ]',
}
_ADDRESS = re.compile(r"\b(127\.0\.0\.1|localhost|0\.0\.0\.0|mesh\.example\.com):(\d{2,5})\b")
_ERROR_LINE = re.compile(r"^(ERROR:|[\w.-]+: error:)")
_EXITS = re.compile(r"#[^\n]*\bexits? (\d+)\s*$")
_HEREDOC = re.compile(r"<<-?\s*'?(\w+)'?")
#: Long-running programs and what each logs once it serves.
_DAEMONS = {
    "make run": r"serving grpc=",
    "flext-mesh serve": r"serving grpc=",
    "flext-sidecar": r"registered service=",
    "etcd": r"ready to serve client requests",
}
_SERVE = re.compile(r"^(make run|flext-mesh serve)\b")
_SKIP_ENTRIES = {".git", "var", "pki", ".pytest_cache", ".mypy_cache", ".ruff_cache"}


@dataclass
class Command:
    """One command of a page, what the page prints for it, and where it is."""

    text: str
    printed: list[str]
    line: int

    @property
    def expected_status(self) -> int | None:
        """0, a status the page names, or None for "not 0" (it prints an error)."""
        if match := _EXITS.search(self.text):
            return int(match[1])
        if any(_ERROR_LINE.match(line.strip()) for line in self.printed):
            return None
        return 0


def _complete(text: str) -> bool:
    if text.endswith("\\"):
        return False
    heredoc = _HEREDOC.search(text)
    if heredoc and not re.search(rf"^{heredoc[1]}$", text, re.M):
        return False
    try:
        shlex.split(text, comments=True)
    except ValueError:  # an open quote
        return False
    return True


def page_commands(text: str) -> Iterator[Command]:
    """The commands of the runnable blocks of a page, in order."""
    lines = text.splitlines()
    at = 0
    while at < len(lines):
        fence = lines[at]
        at += 1
        if not fence.startswith("```"):
            continue
        start = at
        while not lines[at].startswith("```"):
            at += 1
        body, at = lines[start:at], at + 1
        if fence[3:].strip() not in RUN_FENCES:
            continue
        prompts = any(line.startswith("$ ") for line in body)
        i = 0
        while i < len(body):
            line = body[i]
            if not line.strip() or (not prompts and line.lstrip().startswith("#")):
                i += 1
                continue
            if prompts and not line.startswith("$ "):
                raise AssertionError(f"line {start + i + 1}: output before any command: {line}")
            number = start + i + 1
            command = line.removeprefix("$ ") if prompts else line
            i += 1
            while not _complete(command):
                assert i < len(body), f"line {number}: the command never ends"
                command += "\n" + body[i]
                i += 1
            printed: list[str] = []
            while prompts and i < len(body) and not body[i].startswith("$ "):
                if body[i].strip():
                    printed.append(body[i])
                i += 1
            yield Command(command, printed, number)


def _words_match(expected: str, actual: str) -> bool:
    if re.search(r"\d", expected):
        return True
    if "..." in expected:
        return actual.startswith(expected.split("...", 1)[0])
    return expected == actual


def _line_matches(expected: str, actual: str) -> bool:
    want, got = expected.split(), actual.split()
    if want and "..." in want[-1] and len(got) >= len(want):
        got = got[: len(want)]
    return len(want) == len(got) and all(map(_words_match, want, got))


def missing_lines(printed: list[str], output: str) -> list[str]:
    """The printed lines not found, in order, in the real output."""
    actual = output.splitlines()
    at = 0
    missing: list[str] = []
    for line in printed:
        if line.strip() == "...":
            continue
        for j in range(at, len(actual)):
            if _line_matches(line, actual[j]):
                at = j + 1
                break
        else:
            missing.append(line)
    return missing


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Daemon:
    """A long-running command started in the background."""

    command: str
    pid: int
    log: Path
    address: str | None
    """The gRPC address of a control plane (rewritten), else None."""
    kind: str = ""
    """Which of :data:`_DAEMONS` it is."""

    @property
    def stop_order(self) -> int:
        """Sidecars first (a control plane holding their streams is slow to stop),
        control planes next, etcd last (the control planes on it stop cleanly)."""
        return 2 if self.kind == "etcd" else 1 if self.address else 0


@dataclass
class Result:
    """A command as run, its status and output."""

    command: Command
    ran: str
    status: int
    output: str


@dataclass
class PageShell:
    """One bash session in a directory that looks like a checkout, and what it
    started; see the module docstring."""

    directory: Path
    ports: dict[str, int] = field(default_factory=dict)
    daemons: list[Daemon] = field(default_factory=list)
    transcript: list[str] = field(default_factory=list)
    _proc: subprocess.Popen[str] | None = None
    _started: int = 0
    _lines: queue.Queue[str] = field(default_factory=queue.Queue)

    def __enter__(self) -> PageShell:
        for entry in REPO.iterdir():
            if entry.name not in _SKIP_ENTRIES:
                (self.directory / entry.name).symlink_to(entry)
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("FLEXT_MESH_", "OTEL_")) and key not in ("VIRTUAL_ENV",)
        }
        env["PATH"] = os.pathsep.join(
            part for part in env.get("PATH", "").split(os.pathsep) if Path(part) != BIN
        )
        env["FLEXT_MESH_CONTROL_PLANE"] = self.rewrite("127.0.0.1:50051")
        self._proc = subprocess.Popen(
            ["bash", "--noprofile", "--norc"],
            cwd=self.directory,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        self._send("set -m")  # each background job in its own process group
        return self

    def __exit__(self, *exc: object) -> None:
        started = {id(daemon): at for at, daemon in enumerate(self.daemons)}
        for daemon in sorted(self.daemons, key=lambda d: (d.stop_order, -started[id(d)])):
            self._stop(daemon)  # the latest first within each kind
        if self._proc is not None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()

    def _read(self) -> None:
        assert self._proc is not None
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self._lines.put(line)

    def _send(self, script: str, timeout: float = 60.0) -> tuple[int, str]:
        assert self._proc is not None
        assert self._proc.stdin is not None
        marker = f"__docs_done_{time.monotonic_ns()}__"
        self._proc.stdin.write(f"{script}\nprintf '\\n{marker} %s\\n' \"$?\"\n")
        self._proc.stdin.flush()
        out: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"no end after {timeout:.0f} s:\n{script}\n{''.join(out)}"
                ) from None
            if line.startswith(marker):
                text = "".join(out)
                return int(line.split()[1]), text.removesuffix("\n")
            out.append(line)

    def rewrite(self, text: str) -> str:
        """The page's addresses with the test's free ports."""

        def port(match: re.Match[str]) -> str:
            host = "localhost" if match[1] == "mesh.example.com" else match[1]
            if match[2] not in self.ports:
                self.ports[match[2]] = _free_port()
            return f"{host}:{self.ports[match[2]]}"

        return _ADDRESS.sub(port, text)

    def fill(self, text: str) -> str:
        """Placeholders replaced by the values printed earlier on the page."""
        for name, pattern in PLACEHOLDERS.items():
            if re.search(rf"\b{name}\b", text):
                values = [
                    next(group for group in match.groups() if group)
                    for match in re.finditer(pattern, "\n".join(self.transcript), re.M)
                ]
                assert values, f"{name}: no earlier output holds it"
                text = re.sub(rf"\b{name}\b", values[-1], text)
        return text

    def run(self, command: Command) -> Result:
        """Run one command of the page (in the background if it is long-running)."""
        ran = self.fill(self.rewrite(command.text))
        stripped = ran.rstrip().removesuffix("&").rstrip()
        bare = re.sub(r"^(\w+=\S+\s+)*", "", stripped)
        kind = next((name for name in _DAEMONS if bare.startswith(name)), None)
        if kind is None:
            status, output = self._send(f"{{ {ran}\n}} </dev/null")
            self.transcript.append(output)
            return Result(command, ran, status, output)
        return self._start(command, stripped, kind)

    def _start(self, command: Command, ran: str, kind: str) -> Result:
        if kind == "make run":
            ran = ran.replace("make run", "make -s -o .venv/.installed run", 1)
        address = None
        if _SERVE.match(ran.split("make -s -o .venv/.installed ")[-1]) or kind == "make run":
            listen = re.search(r"(?:--listen|LISTEN=)\s*(\S+)", ran)
            address = listen[1] if listen else self.rewrite("127.0.0.1:50051")
            if not listen:  # the default address, on the test's port
                ran = f"FLEXT_MESH_LISTEN={address} " + ran
            if not re.search(r"--http-listen|HTTP_LISTEN=", ran):
                ran = f"FLEXT_MESH_HTTP_LISTEN={self.rewrite('127.0.0.1:9464')} " + ran
            port = address.rsplit(":", 1)[-1]  # 0.0.0.0:P holds 127.0.0.1:P too
            for other in [d for d in self.daemons if d.address and d.address.endswith(f":{port}")]:
                # Its sidecars' streams hold its drain for up to its grace period;
                # the new one only needs the port.
                self._stop(other, patience=1.0)
        self._started += 1  # not len(self.daemons): a stopped one's log stays its own
        log = self.directory / f"daemon-{self._started}.log"
        log.touch()
        status, output = self._send(f"{{ {ran}\n}} >{log} 2>&1 </dev/null &\necho $!")
        assert status == 0, output
        daemon = Daemon(ran, int(output.split()[-1]), log, address, kind)
        self.daemons.append(daemon)
        deadline = time.monotonic() + 30
        while not re.search(_DAEMONS[kind], log.read_text()):
            if not self._alive(daemon):
                return Result(command, ran, 1, log.read_text())
            assert time.monotonic() < deadline, f"{ran}: not serving after 30 s\n{log.read_text()}"
            time.sleep(0.05)
        return Result(command, ran, 0, "")

    @staticmethod
    def _alive(daemon: Daemon) -> bool:
        """Whether its process group has a live member (zombies do not count)."""
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            if fields[2] == str(daemon.pid) and fields[0] != "Z":
                return True
        return False

    def _stop(self, daemon: Daemon, patience: float = 15.0) -> None:
        """SIGTERM, then SIGKILL when it still runs ``patience`` s later."""
        if daemon not in self.daemons:
            return
        self.daemons.remove(daemon)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(daemon.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + patience
            while self._alive(daemon) and time.monotonic() < deadline:
                time.sleep(0.05)
            if not self._alive(daemon):
                return

    def daemon_log(self) -> str:
        """Every background process's log, for a failure message."""
        return "\n".join(f"--- {d.command}\n{d.log.read_text()}" for d in self.daemons)

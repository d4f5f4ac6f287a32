"""``--help`` of every command of ``flext-mesh`` and ``flext-sidecar`` shows the defaults."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
from collections.abc import Iterator

import pytest

from flext_mesh.cli import _build_parser as build_mesh_parser
from flext_mesh.config import ServerConfig
from flext_mesh.flags import DefaultsHelpFormatter, shown_default
from sidecar.config import SidecarConfig
from sidecar.main import _parser as build_sidecar_parser
from tests.conftest import BIN


def _parsers(
    parser: argparse.ArgumentParser, path: str
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """``parser`` and every subparser under it (aliases once), with its command line."""
    yield path, parser
    seen: set[int] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if id(sub) not in seen:
                    seen.add(id(sub))
                    yield from _parsers(sub, f"{path} {name}")


def _every_parser() -> list[tuple[str, argparse.ArgumentParser]]:
    return [
        *_parsers(build_mesh_parser(), "flext-mesh"),
        ("flext-sidecar", build_sidecar_parser()),
    ]


def _effective_default(path: str, action: argparse.Action) -> object:
    """What the option is when left out: settings flags default to None so that the
    model applies its precedence, and the model's default is theirs."""
    if action.default is None:
        model = {"flext-mesh serve": ServerConfig, "flext-sidecar": SidecarConfig}.get(path)
        if model is not None and action.dest in model.model_fields:
            field = model.model_fields[action.dest]
            return None if field.is_required() else field.default
    return action.default


def _help_of(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """An option's help text as --help prints it, on one line."""
    formatter = parser._get_formatter()
    assert isinstance(formatter, DefaultsHelpFormatter)
    return " ".join(formatter._expand_help(action).split())


_PARSERS = _every_parser()


@pytest.mark.parametrize(("path", "parser"), _PARSERS, ids=[path for path, _ in _PARSERS])
def test_every_option_with_a_default_shows_it(path: str, parser: argparse.ArgumentParser) -> None:
    missing = []
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        text = _help_of(parser, action)
        default = _effective_default(path, action)
        shown = shown_default(default)
        # Its value, or words for a value that reads badly (0 for "all").
        if shown is not None and default is not True and "(default: " not in text:
            missing.append(f"{action.option_strings[-1]}: {text}")
        for bad in ("(default: None", "(default: False", "(default: )", "(default: [])"):
            assert bad not in text, f"{path} {action.option_strings[-1]}: {text}"
        # One way of saying it: "(default: X)" or "(default: X; env VARIABLE)".
        assert not re.search(r"\(default [^:]", text), f"{action.option_strings[-1]}: {text}"
    assert missing == [], f"{path}: options whose --help does not say their default"


def test_the_defaults_are_the_values_where_they_read_well() -> None:
    helps = {
        path: {action.dest: _help_of(parser, action) for action in parser._actions if action.help}
        for path, parser in _PARSERS
    }
    listed = helps["flext-mesh services list"]
    assert (
        listed["control_plane"].endswith("(default: 127.0.0.1:50051; env FLEXT_MESH_CONTROL_PLANE)")
        or "FLEXT_MESH_CONTROL_PLANE" in os.environ
    )
    assert listed["output"].endswith("(default: table)")
    assert helps["flext-mesh execution list"]["limit"].endswith("(default: 50)")
    assert helps["flext-mesh metrics report"]["window"].endswith("(default: 24h)")
    assert helps["flext-mesh serve"]["grace_period"].endswith(
        "(default: 10.0; env FLEXT_MESH_GRACE_PERIOD)"
    )
    sidecar = helps["flext-sidecar"]
    assert sidecar["listen"].endswith("(default: 127.0.0.1:0; env FLEXT_SIDECAR_LISTEN)")
    assert sidecar["control_plane"].endswith(
        "(default: 127.0.0.1:50051; env FLEXT_SIDECAR_CONTROL_PLANE, FLEXT_MESH_CONTROL_PLANE)"
    )
    # Empty defaults say what empty means, or nothing.
    assert sidecar["metrics_listen"].endswith(
        "(default: none, no /metrics; env FLEXT_SIDECAR_METRICS_LISTEN)"
    )
    assert sidecar["service"].endswith("(required; env FLEXT_SIDECAR_SERVICE)")


def test_a_token_from_the_environment_is_not_printed_by_help() -> None:
    env = {**os.environ, "FLEXT_MESH_TOKEN": "s3cret-token", "COLUMNS": "200"}
    proc = subprocess.run(
        [str(BIN / "flext-mesh"), "services", "list", "--help"],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
        env=env,
    )
    assert "s3cret-token" not in proc.stdout
    assert "(default: from the variable, not shown; env FLEXT_MESH_TOKEN)" in proc.stdout


@pytest.mark.parametrize(
    ("command", "line"),
    [
        (
            ["flext-mesh", "serve", "--help"],
            "--listen HOST:PORT gRPC listen address HOST:PORT; port 0 picks a free port "
            "(default: 127.0.0.1:50051; env FLEXT_MESH_LISTEN)",
        ),
        (
            ["flext-sidecar", "--help"],
            "--listen HOST:PORT Where ProcessorService is served "
            "(default: 127.0.0.1:0; env FLEXT_SIDECAR_LISTEN)",
        ),
        (
            ["flext-mesh", "services", "discover", "--help"],
            "--limit N at most N instances (default: all)",
        ),
    ],
    ids=["serve", "sidecar", "discover"],
)
def test_the_programs_print_them(command: list[str], line: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEXT_MESH_", "FLEXT_S"))}
    proc = subprocess.run(
        [str(BIN / command[0]), *command[1:]],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
        env={**env, "COLUMNS": "300"},
    )
    assert line in " ".join(proc.stdout.split())

"""Every shell command printed in README.md and docs/*.md runs, against real processes,
and prints what the page says it prints.

Each page runs in one bash session of its own (tests/docs/shell.py: the conventions a
page follows, and the only things the harness changes: ports, mesh.example.com, the
working directory, ``make run`` not reinstalling). A page of docs/ starts as its
opening line says: ``source .venv/bin/activate``, then, unless its first command starts
a control plane, ``make run`` on its default ports (rewritten like every address).
Long-running commands (``make run``, ``flext-mesh serve``, ``flext-sidecar``, ``etcd``)
are started in the background by the harness and stopped when the page ends. The
README's tour runs alone, exactly its commands in order, and must end with a call
counted by the control plane and a workflow execution that SUCCEEDED.

A block that cannot run here says so on the line before its fence, as an HTML comment
``<!-- not run: REASON -->`` (``make test`` would run this suite inside itself).
"""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest

from flext_mesh.v1 import metrics_pb2, metrics_pb2_grpc
from tests.conftest import REPO
from tests.docs.shell import Command, PageShell, missing_lines, page_commands

pytestmark = pytest.mark.xdist_group("docs")

_NOT_RUN = re.compile(r"^<!-- not run: .+ -->\n```\w*\n.*?^```\n", re.M | re.S)
README = (REPO / "README.md").read_text()
TOUR = README.split("## A five-minute tour", 1)[1].split("\n## ", 1)[0]
PAGES = ["README.md"] + [
    f"docs/{path.name}"
    for path in sorted((REPO / "docs").glob("*.md"))
    if path.name != "README.md" and "```sh" in path.read_text()
]


def runnable(text: str) -> list[Command]:
    """The page's commands, without the blocks marked not run."""
    return list(page_commands(_NOT_RUN.sub("", text)))


def run_all(shell: PageShell, commands: list[Command], where: str) -> dict[str, str]:
    """Run the commands in order, checking each; returns each command's output."""
    outputs: dict[str, str] = {}
    for command in commands:
        result = shell.run(command)
        context = (
            f"{where}:{command.line}: {result.ran}\n--- exit {result.status}, printed:\n"
            f"{result.output}\n{shell.daemon_log()}"
        )
        expected = command.expected_status
        if expected is None:
            assert result.status != 0, context
        else:
            assert result.status == expected, context
        missing = missing_lines(command.printed, result.output)
        assert not missing, "not printed:\n" + "\n".join(missing) + "\n" + context
        outputs[command.text] = result.output
    return outputs


def test_the_pages_have_commands_and_the_tour_is_short() -> None:
    assert {
        "README.md",
        "docs/grpcurl.md",
        "docs/cli.md",
        "docs/workflows.md",
        "docs/sidecar.md",
        "docs/traffic-policy.md",
        "docs/dashboard.md",
        "docs/observability.md",
        "docs/operations.md",
    } <= set(PAGES)
    tour = runnable(TOUR)
    assert 5 <= len(tour) < 10, [c.text for c in tour]
    assert tour[0].text == "make run"


@pytest.mark.parametrize("page", PAGES)
def test_the_commands_of_a_page_run_as_printed(page: str, tmp_path: Path) -> None:
    text = (REPO / page).read_text()
    if page == "README.md":  # the tour runs in the test below
        text = text.replace(TOUR, "")
    commands = runnable(text)
    with PageShell(tmp_path) as shell:
        if page != "README.md":  # what the page's opening line says
            run_all(shell, [Command("source .venv/bin/activate", [], 0)], page)
            if not re.match(r"(make run|flext-mesh serve)", commands[0].text):
                run_all(shell, [Command("make run", [], 0)], page)
        run_all(shell, commands, page)


def test_the_tour_calls_a_sidecar_through_the_mesh_and_runs_a_workflow(tmp_path: Path) -> None:
    commands = runnable(TOUR)
    with PageShell(tmp_path) as shell:
        outputs = run_all(shell, commands, "README.md (tour)")
        (run,) = [c.text for c in commands if c.text.startswith("flext-mesh workflow run")]
        assert re.search(r"^execution \w+: SUCCEEDED in ", outputs[run], re.M), outputs[run]
        (call,) = [c.text for c in commands if "mesh.call(" in c.text]
        assert outputs[call].startswith("captured "), outputs[call]
        with grpc.insecure_channel(shell.rewrite("127.0.0.1:50051")) as channel:
            report = metrics_pb2_grpc.MetricsServiceStub(channel).GetServiceReport(
                metrics_pb2.GetServiceReportRequest(service_name="payment", operation="charge"),
                timeout=10,
            )
        assert report.report.summary.total_calls == 1, report

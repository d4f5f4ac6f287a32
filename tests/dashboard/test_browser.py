"""The dashboard in a real headless browser, against real processes.

A ``flext-mesh serve`` subprocess, three ``flext-sidecar`` subprocesses (two payment
instances, one inventory) and Debian's Chromium driven by Playwright (its Python
package drives the browser installed at /usr/bin/chromium; nothing is downloaded). The
page is loaded once per test and never reloaded: what changes on screen comes from the
live streams. Screenshots are saved under the test's temporary directory.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import queue
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2

from flext_mesh.orchestrator.formats import workflow_from_dict
from flext_mesh.rpc.payloads import dict_to_struct
from flext_mesh.v1 import (
    metrics_pb2,
    metrics_pb2_grpc,
    orchestrator_pb2,
    orchestrator_pb2_grpc,
    processor_pb2,
    processor_pb2_grpc,
)
from tests.conftest import ServeProcess, start_serve
from tests.sidecar.test_sidecar_process import SidecarProcess, start_sidecar

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    _why = "Debian's chromium is not installed (`make chromium` installs it)"
    if os.environ.get("CI") == "true":
        pytest.fail(_why, pytrace=False)
    pytest.skip(_why, allow_module_level=True)

from playwright.sync_api import (  # noqa: E402
    Browser,
    ConsoleMessage,
    Page,
    Response,
    sync_playwright,
)

pytestmark = [pytest.mark.xdist_group("dashboard_browser"), pytest.mark.timeout(90)]

#: Lease TTL of the sidecars, seconds: a killed one must turn unhealthy on screen sooner.
TTL = 4.0
_HTTP = re.compile(r"serving grpc=\S+ http=(?P<addr>\S+)")
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CHECKOUT = {
    "name": "checkout",
    "description": "charge, reserve stock, then capture",
    "steps": [
        {"name": "charge", "service": "payment", "operation": "validate_payment"},
        {
            "name": "reserve",
            "service": "inventory",
            "operation": "reserve_inventory",
            "depends_on": ["charge"],
            "compensation": {"operation": "release_inventory"},
        },
        {
            "name": "capture",
            "service": "payment",
            "operation": "process_payment",
            "depends_on": ["reserve"],
            "compensation": {"operation": "refund_payment"},
        },
    ],
}


@dataclass
class Mesh:
    """The processes under test and where the dashboard is."""

    tmp: Path
    plane: ServeProcess
    http: str
    sidecars: dict[str, SidecarProcess] = field(default_factory=dict)

    def api(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(f"{self.http}/api/v1{path}", timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("dashboard")
    plane = start_serve(tmp, "--health-check-interval", "0.3", "--health-unhealthy-threshold", "2")
    match = _HTTP.search(plane.log())
    assert match, plane.log()
    mesh = Mesh(tmp, plane, f"http://{match['addr']}")
    apps = {
        "pay-1": ("payment", "PAYMENT"),
        "pay-2": ("payment", "PAYMENT"),
        "inv-1": ("inventory", "INVENTORY"),
    }
    try:
        with concurrent.futures.ThreadPoolExecutor(len(apps)) as pool:
            futures = {
                name: pool.submit(
                    start_sidecar,
                    tmp,
                    plane.address,
                    "--service",
                    service,
                    "--instance-id",
                    name,
                    "--ttl",
                    str(TTL),
                    app=f"tests.orchestrator.apps:{attr}",
                )
                for name, (service, attr) in apps.items()
            }
            for name, future in futures.items():
                mesh.sidecars[name] = future.result()
        yield mesh
    finally:
        for sidecar in mesh.sidecars.values():
            if sidecar.proc.poll() is None:
                sidecar.proc.kill()
                sidecar.proc.wait(10)
        plane.kill()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS
        )
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Browser, mesh: Mesh) -> Iterator[Page]:
    """A fresh page on the dashboard; fails the test on any script error it logged."""
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    page = context.new_page()
    page.set_default_timeout(15_000)
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))

    def console(message: ConsoleMessage) -> None:
        # A failed request is logged too; responses are checked below instead, since
        # the page asks the API for things that may not exist (a 404 it shows).
        if message.type == "error" and "Failed to load resource" not in message.text:
            problems.append(f"console: {message.text}")

    def response(answer: Response) -> None:
        if answer.status >= 400 and "/api/v1/" not in answer.url:
            problems.append(f"{answer.status} {answer.url}")

    page.on("console", console)
    page.on("response", response)
    page.goto(f"{mesh.http}/dashboard/")
    try:
        yield page
    finally:
        context.close()
    assert not problems, problems


def navigate(page: Page, fragment: str) -> None:
    """Go to a view by changing the URL fragment only: the page is not reloaded."""
    page.evaluate("(fragment) => { location.hash = fragment; }", fragment)


def invoke(sidecar: SidecarProcess, operation: str, payload: dict[str, Any]) -> bool:
    """Call a sidecar's processor directly; whether it succeeded."""
    with grpc.insecure_channel(sidecar.address) as channel:
        try:
            processor_pb2_grpc.ProcessorServiceStub(channel).Invoke(
                processor_pb2.InvokeRequest(operation=operation, payload=dict_to_struct(payload)),
                timeout=10,
            )
        except grpc.RpcError:
            return False
    return True


def backfill(mesh: Mesh) -> None:
    """Ten minutes of earlier calls, reported as a sidecar reports them
    (MetricsService.ReportCalls), so that the plots draw lines and not just the last
    few seconds' points: latency drifting around 8 ms, few errors, and a slow, failing
    minute five minutes ago."""
    now = time.time_ns()
    records = []
    for second in range(14, 614, 2):
        incident = 300 <= second < 360
        for i in range(10):
            duration = (6 + 2 * math.sin(second / 45) + (i % 7) * 1.2) * (3 if incident else 1)
            if i == 0 and (incident or second % 40 == 0):
                code = 14  # UNAVAILABLE: an infrastructure fault
            elif i == 1 and second % 30 == 0:
                code = 9  # FAILED_PRECONDITION: a business rejection
            else:
                code = 0
            records.append(
                metrics_pb2.CallRecord(
                    service_name="payment",
                    operation="validate_payment",
                    instance_id="pay-1",
                    duration_ms=duration,
                    success=code == 0,
                    status_code=code,
                    time_unix_nano=now - second * 1_000_000_000,
                )
            )
    with grpc.insecure_channel(mesh.plane.address) as channel:
        reply = metrics_pb2_grpc.MetricsServiceStub(channel).ReportCalls(
            metrics_pb2.ReportCallsRequest(records=records), timeout=10
        )
    assert reply.accepted == len(records)


def test_a_running_workflow_advances_on_screen(page: Page, mesh: Mesh) -> None:
    with grpc.insecure_channel(mesh.plane.address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        stub.PutWorkflow(
            orchestrator_pb2.PutWorkflowRequest(workflow=workflow_from_dict(CHECKOUT)), timeout=10
        )
        behaviour = {"reserve_inventory": {"sleep": 2.5}}
        started = stub.StartExecution(
            orchestrator_pb2.StartExecutionRequest(
                workflow_name="checkout",
                input=dict_to_struct({"key": "order-1", "behaviour": behaviour}),
            ),
            timeout=10,
        ).execution
    page.evaluate("window.notReloaded = true")
    navigate(page, f"#/executions/{started.execution_id}")

    row = ".tl-row[data-step='{}'][data-state='{}']"
    page.wait_for_selector(row.format("reserve", "RUNNING"))
    assert page.inner_text("[data-step='reserve'] .tl-state") == "RUNNING"
    assert page.is_visible(row.format("charge", "SUCCEEDED"))
    assert page.is_visible(row.format("capture", "PENDING"))
    assert page.is_visible(".graph .node[data-step='reserve'][data-state='RUNNING']")
    assert page.inner_text("#execution-state") == "RUNNING"
    page.screenshot(path=mesh.tmp / "execution-running.png", full_page=True)

    # The slow step ends and the next one runs: the screen follows, no reload.
    page.wait_for_selector(row.format("capture", "SUCCEEDED"), timeout=15_000)
    page.wait_for_selector("#execution-state:text-is('SUCCEEDED')")
    assert page.is_visible(row.format("reserve", "SUCCEEDED"))
    assert page.is_visible(".graph .node[data-step='capture'][data-state='SUCCEEDED']")
    bars = page.locator("[data-step='reserve'] .tl-bar.ok")
    assert bars.count() == 1
    # Which instance each attempt went to, and what went in and came out.
    instance = bars.first.get_attribute("data-instance")
    assert instance
    assert instance in (bars.first.get_attribute("title") or "")
    assert instance in page.inner_text("#event-log")
    assert "order-1" in page.inner_text("#execution-input")
    page.wait_for_function(
        "() => document.querySelector('#execution-output').textContent.includes('capture')"
    )
    assert page.evaluate("window.notReloaded") is True
    page.screenshot(path=mesh.tmp / "execution-done.png", full_page=True)

    # A retried step and a compensation: the timeline marks both.
    behaviour = {
        "reserve_inventory": {"unavailable_first": 1},
        "process_payment": {"fail": "FAILED_PRECONDITION", "message": "card declined"},
    }
    with grpc.insecure_channel(mesh.plane.address) as channel:
        failed = (
            orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            .StartExecution(
                orchestrator_pb2.StartExecutionRequest(
                    workflow_name="checkout",
                    input=dict_to_struct({"key": "order-2", "behaviour": behaviour}),
                ),
                timeout=10,
            )
            .execution
        )
    navigate(page, f"#/executions/{failed.execution_id}")
    page.wait_for_selector("#execution-state:text-is('COMPENSATED')")
    page.wait_for_selector(row.format("reserve", "COMPENSATED"))
    assert page.is_visible(row.format("capture", "FAILED"))
    assert page.locator("[data-step='reserve'] .tl-mark").count() == 1  # the retry
    assert page.locator("[data-step='reserve'] .tl-bar").count() == 3  # 2 attempts, 1 undo
    assert page.locator("[data-step='reserve'] .tl-bar.comp.ok").count() == 1
    assert "2 attempts" in page.inner_text("[data-step='reserve'] .tl-label")
    assert "card declined" in page.inner_text("#execution")
    page.screenshot(path=mesh.tmp / "execution-compensated.png", full_page=True)

    # The workflow's page draws its step graph and lists the executions.
    navigate(page, "#/workflows/checkout")
    page.wait_for_selector(f"tr[data-execution='{started.execution_id}']")
    assert page.is_visible(f"tr[data-execution='{failed.execution_id}']")
    edges = page.locator(".graph path.edge")
    assert edges.count() == 2
    assert page.locator(".graph .node").count() == 3


#: How many lines the text of an element takes on screen.
LINES_OF_TEXT = """(el) => {
  const range = document.createRange();
  range.selectNodeContents(el);
  return range.getClientRects().length;
}"""
#: The outermost elements that reach past the right edge of the window.
SPILLING = """(width) => {
  const right = (el) => el.getBoundingClientRect().right;
  return [...document.querySelectorAll("body *")]
    .filter((el) => right(el) > width + 1 && right(el.parentElement) <= width + 1)
    .slice(0, 5)
    .map((el) => `${el.tagName.toLowerCase()}.${el.className} ${Math.round(right(el))}px`);
}"""


def _fits(page: Page, width: int) -> None:
    """Nothing spills sideways out of the page at this width (wide tables scroll inside
    their card)."""
    spilling = page.evaluate(SPILLING, width)
    assert page.evaluate("document.documentElement.scrollWidth") <= width, spilling


def test_cancel_from_the_page_at_a_phones_width_and_a_wide_screen(page: Page, mesh: Mesh) -> None:
    """A running execution has a Cancel button (authentication is off here: anyone who
    reads may act); the page is usable at 420 px and at 1920 px."""
    with grpc.insecure_channel(mesh.plane.address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        stub.PutWorkflow(
            orchestrator_pb2.PutWorkflowRequest(workflow=workflow_from_dict(CHECKOUT)), timeout=10
        )
        started = stub.StartExecution(
            orchestrator_pb2.StartExecutionRequest(
                workflow_name="checkout",
                input=dict_to_struct(
                    {"key": "order-cancel", "behaviour": {"reserve_inventory": {"sleep": 8}}}
                ),
            ),
            timeout=10,
        ).execution
    page.set_viewport_size({"width": 420, "height": 860})
    navigate(page, f"#/executions/{started.execution_id}")
    page.wait_for_selector(".tl-row[data-step='reserve'][data-state='RUNNING']")
    headers = [th.inner_text().upper() for th in page.query_selector_all("#event-log thead th")]
    assert headers == ["TIME", "EVENT", "STEP", "ATTEMPT", "INSTANCE", "DETAIL"]
    _fits(page, 420)
    for cell in page.query_selector_all("#event-log td.when"):  # "+130 ms" on one line
        assert cell.evaluate(LINES_OF_TEXT) == 1
    page.screenshot(path=mesh.tmp / "execution-420.png", full_page=True)
    assert page.locator("#retry-button").count() == 0  # only once it failed or was cancelled

    page.click("#cancel-button")
    page.fill("#cancel-reason", "customer called")
    page.click("#cancel-confirm")
    page.wait_for_selector("#execution-state:text-is('CANCELLED')", timeout=20_000)
    assert page.locator("#cancel-button").count() == 0
    assert "customer called" in page.inner_text("#event-log")

    # Cancelled: it can be retried from its first unfinished step, as a new execution.
    page.click("#retry-button")
    page.wait_for_selector("#retry-of")
    assert page.inner_text("#retry-of") == started.execution_id
    retried = page.evaluate("location.hash").removeprefix("#/executions/")
    assert retried != started.execution_id
    page.wait_for_selector(".tl-row[data-step='charge'][data-state='SUCCEEDED']")
    assert "carried over" in page.inner_text("#event-log")
    page.click("#cancel-button")  # it runs reserve again (8 s): stop it too
    page.click("#cancel-confirm")
    page.wait_for_selector("#execution-state:text-is('CANCELLED')", timeout=20_000)

    for view in ("#/services", "#/metrics/payment", "#/workflows/checkout", "#/status"):
        navigate(page, view)
        page.wait_for_selector("main .view:not([hidden]) h2")
        page.wait_for_timeout(300)
        _fits(page, 420)
    navigate(page, "#/services")
    page.wait_for_selector("tr[data-instance='pay-1']")
    page.screenshot(path=mesh.tmp / "services-420.png", full_page=True)
    top = page.locator("header.top").bounding_box()
    assert top is not None
    assert top["height"] < 110  # brand, status and token on one line, the views below

    page.set_viewport_size({"width": 1920, "height": 1080})
    navigate(page, f"#/executions/{started.execution_id}")
    page.wait_for_selector("#execution-state:text-is('CANCELLED')")
    assert page.inner_text("#retried-by") == retried
    assert page.locator("#retry-button").count() == 0  # retried once already: go to that one
    _fits(page, 1920)
    page.screenshot(path=mesh.tmp / "execution-1920.png", full_page=True)


def test_the_latency_and_error_plots_have_data(page: Page, mesh: Mesh) -> None:
    outcomes = []
    for i in range(30):
        behaviour: dict[str, Any] = {"sleep": (i % 5) * 0.004}
        if i % 6 == 0:
            behaviour["fail"] = "FAILED_PRECONDITION"
        payload = {"key": f"plot-{i}", "behaviour": {"validate_payment": behaviour}}
        outcomes.append(invoke(mesh.sidecars[f"pay-{1 + i % 2}"], "validate_payment", payload))
    assert outcomes.count(False) == 5

    def reported() -> int:
        status, found = mesh.api("/services/payment/series?window=5m&operation=validate_payment")
        return sum(found["operations"][0]["calls"]) if status == 200 else 0

    deadline = time.monotonic() + 15
    while reported() < 30:  # the sidecars report in batches, every second
        assert time.monotonic() < deadline, "the sidecars' reports did not arrive"
        time.sleep(0.2)
    backfill(mesh)
    navigate(page, "#/metrics/payment")
    page.wait_for_selector("#latency-chart canvas")
    points = int(page.get_attribute("#latency-chart", "data-points") or 0)
    assert points > 0
    assert int(page.get_attribute("#error-chart", "data-points") or 0) == points
    assert int(page.get_attribute("#rate-chart", "data-points") or 0) == points
    assert page.locator("#rate-chart canvas").count() >= 1
    # uPlot drew the p50/p95/p99 lines: the canvas holds more than its background.
    drawn = page.evaluate(
        """() => {
            const canvas = document.querySelector('#latency-chart canvas');
            const context = canvas.getContext('2d');
            const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
            let painted = 0;
            for (let i = 3; i < data.length; i += 4) if (data[i] > 0) painted++;
            return painted;
        }"""
    )
    assert drawn > 100
    assert page.inner_text("#grade .grade") in {"A", "B", "C", "D", "F"}
    assert 0 <= float(page.inner_text("#health-score .value")) <= 100
    assert page.is_visible("tr[data-operation='validate_payment']")
    errors = page.inner_text("tr[data-operation='validate_payment'] td:nth-child(3)")
    assert float(errors.rstrip("%")) > 0
    page.screenshot(path=mesh.tmp / "metrics.png", full_page=True)


def test_a_workflows_own_latency_is_plotted(page: Page, mesh: Mesh) -> None:
    with grpc.insecure_channel(mesh.plane.address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        stub.PutWorkflow(
            orchestrator_pb2.PutWorkflowRequest(workflow=workflow_from_dict(CHECKOUT)), timeout=10
        )
        for i in range(3):
            done = stub.StartExecution(
                orchestrator_pb2.StartExecutionRequest(
                    workflow_name="checkout",
                    input=dict_to_struct({"key": f"plotted-{i}", "behaviour": {}}),
                    wait=True,
                ),
                timeout=30,
            ).execution
            assert done.state == orchestrator_pb2.EXECUTION_STATE_SUCCEEDED
    time.sleep(1.5)  # the orchestrator hands its durations to the metrics each second
    navigate(page, "#/metrics/workflow%2Fcheckout")
    page.wait_for_selector("#latency-chart canvas")
    assert int(page.get_attribute("#latency-chart", "data-points") or 0) > 0
    # The service picker offers the workflow's series beside the services.
    options = page.eval_on_selector_all("#metrics-service option", "os => os.map(o => o.value)")
    assert "workflow/checkout" in options
    assert page.is_visible("tr[data-operation='execution']")


def test_why_an_instance_weighs_what_it_does_and_what_each_sidecar_applied(
    page: Page, mesh: Mesh
) -> None:
    """The answers of `flext-mesh services explain` and `flext-mesh status`, on the page."""
    navigate(page, "#/services")
    page.wait_for_selector("tr[data-instance='pay-2'][data-health='healthy']")
    page.click("[data-service='payment'] details.explain summary")
    for instance in ("pay-1", "pay-2"):
        row = page.wait_for_selector(
            f"[data-service='payment'] .explain-table tr[data-instance='{instance}']"
        )
        assert row is not None
        cells = [c.inner_text() for c in row.query_selector_all("td")]
        # Instance, base, health x, latency x, errors x, ejected, drained, split,
        # effective, in answer.
        assert cells[1] == "100", cells
        assert cells[2] == "\N{MULTIPLICATION SIGN} 1.00", cells
        assert cells[5] == "no", cells
        assert cells[6] == "no", cells
        assert float(cells[8]) > 0, cells
        assert cells[9] == "yes", cells
    headers = page.inner_text("[data-service='payment'] .explain-table thead")
    assert "EFFECTIVE" in headers.upper()
    assert "LATENCY" in headers.upper()
    # The registry stream renders the cards again on every change: the table stays open.
    assert page.is_visible("[data-service='payment'] .explain-table")

    navigate(page, "#/status")
    for instance in ("pay-1", "pay-2", "inv-1"):
        # Each sidecar says what it applied on its next KeepAlive round.
        page.wait_for_selector(f"#status-table tr[data-instance='{instance}'][data-state='OK']")
    row = page.inner_text("#status-table tr[data-instance='inv-1']")
    assert "inventory" in row
    assert "OK" in row
    assert "All up to date." in page.inner_text("#view-status")
    page.screenshot(path=mesh.tmp / "status.png", full_page=True)


def test_a_killed_instance_turns_unhealthy_on_screen_within_its_ttl(
    page: Page, mesh: Mesh, browser: Browser
) -> None:
    navigate(page, "#/services")
    for instance in ("pay-1", "pay-2", "inv-1"):
        page.wait_for_selector(f"tr[data-instance='{instance}'][data-health='healthy']")
    page.evaluate("window.notReloaded = true")

    mesh.sidecars["pay-2"].proc.kill()  # SIGKILL: no deregistration, no goodbye
    killed = time.monotonic()
    page.wait_for_selector("tr[data-instance='pay-2'][data-health='unhealthy']", timeout=TTL * 1000)
    assert time.monotonic() - killed < TTL
    assert page.inner_text("tr[data-instance='pay-2'] .health") == "unhealthy"
    assert page.is_visible("tr[data-instance='pay-1'][data-health='healthy']")
    assert "1 of 2 healthy" in page.inner_text("[data-service='payment'] header")
    assert page.evaluate("window.notReloaded") is True
    page.screenshot(path=mesh.tmp / "services.png", full_page=True)

    # When the lease runs out the row stays a while, greyed, saying why it went.
    page.wait_for_selector("tr[data-instance='pay-2'][data-health='removed']", timeout=10_000)
    assert page.inner_text("tr[data-instance='pay-2'] .health") == "removed (lease expired)"

    # A page opened after it went shows it too: the control plane remembers removals.
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    try:
        late = context.new_page()
        late.goto(f"{mesh.http}/dashboard/#/services")
        late.wait_for_selector("tr[data-instance='pay-2'][data-health='removed']", timeout=10_000)
        assert late.inner_text("tr[data-instance='pay-2'] .health") == "removed (lease expired)"
        assert late.is_visible("tr[data-instance='pay-1'][data-health='healthy']")
    finally:
        context.close()


class SyncAds:
    """A raw ADS stream from this process (sync gRPC): ask for resources, ACK or NACK."""

    def __init__(self, address: str, node_id: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.requests: queue.Queue[discovery_pb2.DiscoveryRequest | None] = queue.Queue()
        self.node = base_pb2.Node(id=node_id, locality=base_pb2.Locality(zone="z1"))
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        self.call = stub.StreamAggregatedResources(iter(self.requests.get, None))

    def exchange(self, type_url: str, name: str, *, error: str = "") -> None:
        """Subscribe to ``name``, read the response, then ACK it (NACK with ``error``)."""
        self.requests.put(
            discovery_pb2.DiscoveryRequest(node=self.node, type_url=type_url, resource_names=[name])
        )
        response = next(self.call)
        answer = discovery_pb2.DiscoveryRequest(
            node=self.node,
            type_url=type_url,
            resource_names=[name],
            response_nonce=response.nonce,
            version_info="" if error else response.version_info,
        )
        if error:
            answer.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        self.requests.put(answer)

    def close(self) -> None:
        self.requests.put(None)
        self.call.cancel()
        self.channel.close()


def test_the_xds_clients_and_where_each_stands(page: Page, mesh: Mesh) -> None:
    """The answer of `flext-mesh xds status`, on the page: one client in sync, one that
    rejected its endpoints, with the reason."""
    eds = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
    synced, nacking = SyncAds(mesh.plane.address, "web-1"), SyncAds(mesh.plane.address, "web-2")
    try:
        synced.exchange(eds, "payment")
        nacking.exchange(eds, "inventory", error="endpoints[0].locality error:field not present")
        navigate(page, "#/xds")
        page.wait_for_selector("#xds-table tr[data-node='web-1'][data-state='SYNCED']")
        page.wait_for_selector("#xds-table tr[data-node='web-2'][data-state='NACKED']")
        row = page.inner_text("#xds-table tr[data-node='web-1']")
        assert "SYNCED v1" in row
        assert "z1" in row
        lds = page.inner_text("#xds-table tr[data-node='web-1'] td[data-type='LDS']")
        assert lds == "\N{EN DASH}"  # nothing sent: it asked for endpoints only
        bad = page.inner_text("#xds-table tr[data-node='web-2']")
        assert "NACK v1" in bad
        assert "locality error:field not present" in bad
        headers = page.inner_text("#xds-table thead").upper()
        for header in ("NODE", "ZONE", "LDS", "RDS", "CDS", "EDS", "STATE", "LAST ACK"):
            assert header in headers
        assert "1 not in sync." in page.inner_text("#view-xds")
        _fits(page, 1360)
        page.screenshot(path=mesh.tmp / "xds.png", full_page=True)

        # The view refreshes every 5 s: a client that goes away leaves it.
        nacking.close()
        page.wait_for_selector("#xds-table tr[data-node='web-2']", state="detached", timeout=8_000)
        assert "All in sync." in page.inner_text("#view-xds")
    finally:
        synced.close()
        nacking.close()

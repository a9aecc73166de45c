"""The HTML dashboard in a real browser: Debian's chromium driven by Playwright.

A real node (``radnode serve`` with its worker) receives the real pancreas CT
from dcmtk storescu; the browser logs in (users made with ``radnode users
add``), watches the live view update without a reload, retries a job (the
page sends the session's CSRF token; without it the API refuses), logs out
(the session is gone), sees no action button as a viewer, and resends a
delivery that failed while the PACS was down once a real PACS (dcmtk
storescp) listens. Chromium is required: CI installs it (``apt-get
install chromium``); without it these tests fail, they never skip.

Screenshots go to ``tmp_path`` and, when ``RADNODE_SCREENSHOT_DIR`` is set,
are copied there too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.integration.conftest import (
    Peer,
    free_port,
    received_files,
    require_tool,
    start_node,
    stop,
    wait_for_port,
)

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
#: Dashboard users (name, role), all with this password.
OPERATOR = ("olivia", "operator")
VIEWER = ("victor", "viewer")
ADMIN = ("ada", "admin")
PASSWORD = "a long dashboard password"
#: Generous: the test machine may be slow and the first job loads its model.
TIMEOUT_MS = 60_000
#: A calling AE title with markup in it (legal: AE titles exclude only backslash and controls).
HOSTILE_AE = "<b>SCAN</b>"
#: The colour of failures in dashboard.css (--failed), as the browser computes it.
RED = "rgb(207, 34, 46)"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless chromium from Debian (never a browser Playwright downloads)."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (CI installs it)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield opened
    finally:
        context.close()
    assert errors == [], f"JavaScript errors on the dashboard: {errors}"


def get_json(node: Peer, path: str) -> Any:
    request = urllib.request.Request(f"{node.api}{path}", headers=node.auth("admin"))
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def add_users(node: Peer, *users: tuple[str, str]) -> None:
    for name, role in users:
        node.add_user(name, role, PASSWORD)


def log_in(page: Page, node: Peer, name: str, path: str = "/") -> None:
    """Open ``path``: the node sends the browser to its login form; log in there."""
    page.goto(f"{node.api}{path}")
    expect(page).to_have_url(re.compile(r"/login\?next="), timeout=TIMEOUT_MS)
    page.fill("#name", name)
    page.fill("#password", PASSWORD)
    page.click("#login button[type=submit]")
    expect(page).to_have_url(f"{node.api}{path}", timeout=TIMEOUT_MS)
    expect(page.locator("header .who .user")).to_have_text(name)


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, node: Peer) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        assert node.process.poll() is None, node.log.read_text(errors="replace")[-4000:]
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n"
                         f"{node.log.read_text(errors='replace')[-4000:]}")


def send_ct(node: Peer, folder: Path, calling_ae: str = "SCANNER") -> None:
    """Send the real CT series with dcmtk storescu, as a scanner would."""
    sent = subprocess.run(
        [require_tool("storescu"), "-aet", calling_ae, "-aec", "RADNODE", "+sd", "+sp", "*.dcm",
         "127.0.0.1", str(node.port), str(folder)],
        capture_output=True, text=True, check=False, timeout=300)
    assert sent.returncode == 0, sent.stdout + sent.stderr


def jobs(node: Peer) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = get_json(node, "/api/v1/jobs")["items"]
    return items


def deliveries(node: Peer) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = get_json(node, "/api/v1/deliveries")["items"]
    return items


def screenshot(page: Page, tmp_path: Path, name: str) -> Path:
    """Save a full-page screenshot under ``tmp_path`` (and ``$RADNODE_SCREENSHOT_DIR``)."""
    path = tmp_path / f"dashboard-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    target = os.environ.get("RADNODE_SCREENSHOT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / path.name)
    return path


@pytest.fixture
def node_with_users(tmp_path: Path, storescp_pacs: Peer) -> Iterator[Peer]:
    """A node with an operator and a viewer, delivering to a running PACS."""
    node = start_node(tmp_path, destinations=(storescp_pacs.address,))
    try:
        add_users(node, OPERATOR, VIEWER)
        yield node
    finally:
        stop(node.process)


def test_live_view_and_job_retry(tmp_path: Path, ct_series_dir: Path, node_with_users: Peer,
                                 page: Page) -> None:
    node = node_with_users
    send_ct(node, ct_series_dir)
    wait_until(lambda: [j["state"] for j in jobs(node)] == ["succeeded"], 240,
               "the CT job to succeed", node)
    study_uid = get_json(node, "/api/v1/studies")["items"][0]["study_instance_uid"]

    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.type), dialog.accept()))
    log_in(page, node, OPERATOR[0])
    expect(page.locator("header .who .role")).to_have_text("operator")
    expect(page.locator("nav a[href='/audit']")).to_have_count(0)  # admin only
    expect(page.locator("#ready")).to_have_text("ready", timeout=TIMEOUT_MS)
    expect(page.locator(f'[data-study="{study_uid}"]')).to_be_visible(timeout=TIMEOUT_MS)
    job = page.locator('[data-job="1"]')
    expect(job.locator(".state").first).to_have_text("succeeded", timeout=TIMEOUT_MS)
    expect(page.locator(".stage", has_text="routed").first).to_contain_text("rule ct")
    expect(job.locator(".delivery")).to_have_count(2, timeout=TIMEOUT_MS)
    expect(job.locator(".delivery .state").first).to_have_text("sent", timeout=TIMEOUT_MS)
    screenshot(page, tmp_path, "live")

    # Retry from the page: its fetch carries the session's CSRF token.
    page.evaluate("window.radnodeNoReload = true")
    job.locator("button.retry").click()
    expect(page.locator("#flash")).to_contain_text("queued again as job 2", timeout=TIMEOUT_MS)
    new_job = page.locator('[data-job="2"]')
    expect(new_job.locator(".state").first).to_have_text(
        re.compile("pending|queued|running|succeeded"), timeout=TIMEOUT_MS)
    expect(new_job.locator(".state").first).to_have_text("succeeded", timeout=TIMEOUT_MS)
    # The retry's results replace the first job's: they are delivered again, under job 2.
    expect(new_job.locator(".delivery .state")).to_have_text(["sent", "sent"],
                                                             timeout=TIMEOUT_MS)
    assert page.evaluate("window.radnodeNoReload") is True, "the page was reloaded"
    assert dialogs == []  # no token prompt: the login session is enough
    screenshot(page, tmp_path, "live-retried")
    retries = get_json(node, "/api/v1/audit?action=job.retry")["items"]
    assert {event["actor"] for event in retries} == {f"web:{OPERATOR[0]}"}

    # The same POST from the page's origin with the session cookie but without the CSRF
    # header (what a forged cross-site request could at best do) is refused.
    status = page.evaluate("""async () => (await fetch("/api/v1/jobs/2/retry",
        {method: "POST", credentials: "same-origin"})).status""")
    assert status == 403
    wrong = page.evaluate("""async () => (await fetch("/api/v1/jobs/2/retry",
        {method: "POST", headers: {"X-CSRF-Token": "0".repeat(64)}})).status""")
    assert wrong == 403
    assert get_json(node, "/api/v1/audit?action=job.retry")["total"] == 1

    # The series page: timeline, jobs, results with their deliveries.
    series_id = get_json(node, "/api/v1/series")["items"][0]["id"]
    page.goto(f"{node.api}/series/{series_id}")
    expect(page.locator("#stages")).to_contain_text("complete", timeout=TIMEOUT_MS)
    expect(page.locator("#stages")).to_contain_text("association_released")
    expect(page.locator('#jobs tr[data-job="1"]')).to_contain_text("succeeded")
    expect(page.locator("#results .result")).to_have_count(2, timeout=TIMEOUT_MS)
    screenshot(page, tmp_path, "series")

    # Log out: back at the login form; the old session opens nothing any more.
    page.click("header .who button.logout")
    expect(page.locator("#login-notice")).to_have_text("You are logged out.",
                                                       timeout=TIMEOUT_MS)
    status = page.evaluate("async () => (await fetch('/api/v1/studies')).status")
    assert status == 401
    page.goto(f"{node.api}/")
    expect(page).to_have_url(re.compile(r"/login\?next=/$"), timeout=TIMEOUT_MS)
    events = get_json(node, "/api/v1/audit?action=auth.logout")["items"]
    assert [e["actor"] for e in events] == [f"web:{OPERATOR[0]}"]

    # A wrong password is refused; a viewer sees everything but no action button.
    page.fill("#name", VIEWER[0])
    page.fill("#password", "not the password")
    page.click("#login button[type=submit]")
    expect(page.locator("#login-error")).to_have_text("Unknown user or wrong password.")
    log_in(page, node, VIEWER[0])
    expect(page.locator("header .who .role")).to_have_text("viewer")
    expect(page.locator('[data-job="2"] .state').first).to_have_text("succeeded",
                                                                     timeout=TIMEOUT_MS)
    expect(page.locator('[data-job="2"] .delivery')).to_have_count(2, timeout=TIMEOUT_MS)
    expect(page.locator("main button")).to_have_count(0)
    page.goto(f"{node.api}/destinations")
    expect(page.locator('[data-destination="PACS"]')).to_be_visible(timeout=TIMEOUT_MS)
    expect(page.locator("main button")).to_have_count(0)
    screenshot(page, tmp_path, "viewer")


@pytest.fixture
def node_without_pacs(tmp_path: Path) -> Iterator[tuple[Peer, int]]:
    """A node whose only destination is a port where nothing listens (yet)."""
    port = free_port()
    node = start_node(tmp_path, destinations=(f"PACS@127.0.0.1:{port}",))
    try:
        add_users(node, ADMIN)
        yield node, port
    finally:
        stop(node.process)


def test_failed_delivery_then_resend(tmp_path: Path, ct_series_dir: Path,
                                     node_without_pacs: tuple[Peer, int], page: Page) -> None:
    node, pacs_port = node_without_pacs
    # The calling AE title comes from the network: the page must show it as text, not markup.
    send_ct(node, ct_series_dir, calling_ae=HOSTILE_AE)
    wait_until(lambda: len(deliveries(node)) == 2 and all(d["error"] for d in deliveries(node)),
               240, "both deliveries to fail once", node)

    log_in(page, node, ADMIN[0])
    expect(page.locator(".study-meta .ae")).to_have_text(HOSTILE_AE, timeout=TIMEOUT_MS)
    assert page.locator(".study b").count() == 0, "an AE title was inserted as HTML"
    first = page.locator(".delivery").first
    expect(first).to_have_class(re.compile(r"\b(waiting|failed)\b"), timeout=TIMEOUT_MS)
    reason = first.locator(".reason")
    expect(reason).to_contain_text("could not be opened", timeout=TIMEOUT_MS)
    assert reason.evaluate("el => getComputedStyle(el).color") == RED
    screenshot(page, tmp_path, "delivery-failed")

    # C-ECHO from the destinations page says the PACS does not answer.
    page.goto(f"{node.api}/destinations")
    row = page.locator('[data-destination="PACS"]')
    row.locator("button.echo-button").click()
    expect(row.locator("td.echo")).to_contain_text("failed", timeout=TIMEOUT_MS)

    # Start the PACS on that port; the operator resends from the live view.
    folder = tmp_path / "pacs"
    folder.mkdir()
    with (tmp_path / "storescp.log").open("wb") as out:
        pacs = subprocess.Popen(
            [require_tool("storescp"), "-aet", "PACS", "-od", str(folder), "+xa",
             str(pacs_port)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(pacs_port, pacs)
        row.locator("button.echo-button").click()
        expect(row.locator("td.echo")).to_contain_text("ok", timeout=TIMEOUT_MS)

        page.goto(f"{node.api}/")
        page.evaluate("window.radnodeNoReload = true")
        lines = page.locator(".delivery")
        expect(lines).to_have_count(2, timeout=TIMEOUT_MS)
        for index in range(2):
            lines.nth(index).locator("button").click()
            expect(page.locator("#flash")).to_contain_text("1 delivery scheduled",
                                                           timeout=TIMEOUT_MS)
        expect(page.locator(".delivery .state")).to_have_text(["sent", "sent"],
                                                              timeout=TIMEOUT_MS)
        expect(page.locator(".delivery .reason")).to_have_count(0)
        wait_until(lambda: get_json(node, "/api/v1/audit?action=delivery.resend")["total"] == 2,
                   60, "both resends to be audited", node)
        assert page.evaluate("window.radnodeNoReload") is True, "the page was reloaded"
        screenshot(page, tmp_path, "delivery-resent")
        assert len(received_files(folder)) == 2
    finally:
        stop(pacs)

    # The other pages show the node's models, rules and the operator's actions.
    page.goto(f"{node.api}/models")
    expect(page.locator('[data-model="radnode-builtin-ct"]')).to_contain_text(
        "1.0.0", timeout=TIMEOUT_MS)
    expect(page.locator("#workers [data-worker]").first).to_contain_text("alive",
                                                                        timeout=TIMEOUT_MS)
    page.goto(f"{node.api}/rules")
    expect(page.locator('[data-rule="ct"]')).to_contain_text("Modality = CT", timeout=TIMEOUT_MS)
    page.goto(f"{node.api}/audit")
    expect(page.locator("#audit")).to_contain_text("delivery.resend", timeout=TIMEOUT_MS)
    expect(page.locator("#export-csv")).to_have_attribute(
        "href", re.compile(r"/api/v1/audit/export\?.*format=csv"))
    expect(page.locator("footer a[href='/docs']")).to_be_visible()
    screenshot(page, tmp_path, "audit")

"""
The queue viewer page (exedge/manage/viewer.html) in a real headless
browser: Debian's chromium driven by Selenium through chromium-driver,
against a running server with one message held in Unreachable and one in
Retry (the setup of test_management.py).

The browser tests are skipped only when /usr/bin/chromedriver is missing
(`make debian-test-deps` installs it). Every wait is a bounded
WebDriverWait on the page; values are read from the DOM in one script call,
so a row redrawn by the page's own refresh is never read half-way.
"""

import os
import shutil
import smtplib
import urllib.request

import pytest

from harness import read_log

from exedge.manage.viewer import script_hash
from manage_scenario import TOKEN, client_of, held_and_retrying

CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT = 15       # seconds: the longest any one step may take


def test_the_page_is_served_without_the_token_and_fenced_by_its_policy(tcp_server):
    """GET / needs no token (the page asks for it); the CSP lets the page reach only its own origin."""
    server, base = tcp_server
    with urllib.request.urlopen(base + "/", timeout=10) as response:
        page = response.read()
        assert response.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in response.headers["content-security-policy"]
    assert b"<title>exedge queue viewer</title>" in page
    for external in (b"src=\"http", b"href=\"http", b"src=\"//", b"href=\"//", b"@import", b"url("):
        assert external not in page, external
    assert b"@SCRIPT_HASH@" not in page
    assert b"script-src '" + script_hash(page) + b"';" in page      # the page's own policy names its script
    script = page.split(b"<script>", 1)[1].split(b"</script>", 1)[0]
    for markup_sink in (b"innerHTML", b"outerHTML", b"insertAdjacentHTML", b"document.write", b"eval("):
        assert markup_sink not in script, markup_sink


# -- in the browser -----------------------------------------------------------------


@pytest.fixture
def browser(tmp_path):
    if not os.path.exists(CHROMEDRIVER):
        pytest.skip(f"{CHROMEDRIVER} is missing: apt-get install chromium chromium-driver (make debian-test-deps)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    service = Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.downloads = downloads
    try:
        yield driver
    finally:
        driver.quit()           # stops chromium and then chromedriver (the Service) by their PIDs
        assert service.process is None or service.process.poll() is not None


def wait(driver, condition, what):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, WAIT, ignored_exceptions=(StaleElementReferenceException,)).until(
        condition, message=f"waiting for {what}")


# One script call reads a cell, so a row the page redraws meanwhile is never half read.
READ_CELL = """
const [table, key, value, field] = arguments;
for (const row of document.querySelectorAll('#' + table + ' tbody tr')) {
  if (row.dataset[key] === value) {
    const cell = row.querySelector('[data-field="' + field + '"]');
    return cell === null ? null : cell.textContent;
  }
}
return null;
"""


def cell(driver, table, key, value, field):
    return driver.execute_script(READ_CELL, table, key, value, field)


def click(driver, css, what):
    """Click the element C{css} names, found again if the page redrew it."""
    from selenium.webdriver.common.by import By

    def clicked(d):
        found = d.find_elements(By.CSS_SELECTOR, css)
        if not found or not found[0].is_displayed():
            return False
        found[0].click()
        return True

    wait(driver, clicked, what)


def answer_confirm(driver, accept=True) -> str:
    from selenium.webdriver.support import expected_conditions as EC
    alert = wait(driver, EC.alert_is_present(), "the confirmation")
    text = alert.text
    alert.accept() if accept else alert.dismiss()
    return text


def sign_in(driver, base, token, page="/"):
    from selenium.webdriver.common.by import By
    driver.get(base + page)
    field = wait(driver, lambda d: d.find_element(By.ID, "token") if d.find_element(By.ID, "token").is_displayed()
                 else False, "the token form")
    field.send_keys(token)
    driver.find_element(By.ID, "token-submit").click()


def notice(driver) -> str:
    return driver.execute_script("return document.getElementById('notice').textContent")


def test_the_viewer_shows_and_steers_the_queues(tcp_server, browser):
    server, base = tcp_server
    driver = browser
    with client_of(server) as client:
        queues = held_and_retrying(server, client)
        partner = queues["To Partner"]["id"]
        [waiting] = client.messages(partner)
        [held] = client.messages("Unreachable")

        sign_in(driver, base, TOKEN)
        wait(driver, lambda d: cell(d, "queues", "queue", "Unreachable", "status") == "Held", "the Unreachable queue")
        assert cell(driver, "queues", "queue", "Unreachable", "message_count") == "1"
        assert "no send connector" in cell(driver, "queues", "queue", "Unreachable", "last_error")
        assert cell(driver, "queues", "queue", "Unreachable", "delivery_type") == "Unreachable"
        assert cell(driver, "queues", "queue", partner, "status") == "Retry"
        assert cell(driver, "queues", "queue", partner, "message_count") == "1"
        assert cell(driver, "queues", "queue", partner, "next_hop_domain") == "To Partner"
        assert cell(driver, "queues", "queue", partner, "next_retry_time")
        status = driver.execute_script("return document.getElementById('status').textContent")
        assert "edge01.example.com" in status and "From Internal Org (listening" in status
        assert "2 message(s)" in status
        assert driver.execute_script("return sessionStorage.getItem('exedge.token')") == TOKEN

        # the held message, with its sender and recipient
        click(driver, '#queues tr[data-queue="Unreachable"] button[data-action="open"]', "Unreachable's button")
        wait(driver, lambda d: cell(d, "messages", "message", held["identity"], "from_address") == "alice@example.com",
             "the held message")
        recipients = cell(driver, "messages", "message", held["identity"], "recipients")
        assert "carol@other.test" in recipients and "(Held)" in recipients

        # its export, fetched with the token and saved from a Blob
        click(driver, f'#messages tr[data-message="{held["identity"]}"] button[data-action="export"]', "Export")
        saved = driver.downloads / f"{held['identity']}.eml"
        wait(driver, lambda d: saved.exists() and b"Subject: nobody routes me" in saved.read_bytes(),
             "the exported .eml")

        # suspend the retrying message: it says Suspended
        click(driver, f'#queues tr[data-queue="{partner}"] button[data-action="open"]', "the partner's queue")
        wait(driver, lambda d: cell(d, "messages", "message", waiting["identity"], "status") == "Retry",
             "the retrying message")
        click(driver, f'#messages tr[data-message="{waiting["identity"]}"] button[data-action="suspend"]', "Suspend")
        assert waiting["identity"] in answer_confirm(driver)
        wait(driver, lambda d: cell(d, "messages", "message", waiting["identity"], "status") == "Suspended",
             "the suspended message")
        assert client.messages(partner)[0]["status"] == "Suspended"

        # resuming a message that is not suspended: the endpoint's 409 shows as text
        click(driver, '#queues tr[data-queue="Unreachable"] button[data-action="open"]', "Unreachable's button")
        resume = f'#messages tr[data-message="{held["identity"]}"] button[data-action="resume"]'
        click(driver, resume, "Resume")
        answer_confirm(driver)
        wait(driver, lambda d: "not suspended" in notice(d), "the refusal")
        assert driver.execute_script("return document.getElementById('notice').className") == "error"

        # remove, first cancelled, then confirmed without an NDR: the queue is empty
        remove = f'#messages tr[data-message="{held["identity"]}"] button[data-action="remove"]'
        click(driver, remove, "Remove")
        answer_confirm(driver, accept=False)
        assert [m["identity"] for m in client.messages("Unreachable")] == [held["identity"]]
        assert not driver.execute_script("return document.getElementById('remove-ndr').checked")
        click(driver, remove, "Remove")
        assert "without an NDR" in answer_confirm(driver)
        wait(driver, lambda d: cell(d, "queues", "queue", "Unreachable", "message_count") == "0", "an empty queue")
        wait(driver, lambda d: cell(d, "messages", "message", held["identity"], "status") is None,
             "the removed message gone from the list")
        assert client.messages("Unreachable") == []
    assert server.drop_files() == []            # no NDR was sent
    assert "Traceback" not in read_log(server.log_path)


def test_a_wrong_token_shows_the_servers_error(tcp_server, browser):
    server, base = tcp_server
    driver = browser
    from selenium.webdriver.common.by import By

    sign_in(driver, base, "not-the-token-at-all")
    error = wait(driver, lambda d: d.find_element(By.ID, "token-error").text, "the token error")
    assert "bearer token is required" in error
    assert driver.find_element(By.ID, "token-form").is_displayed()
    assert not driver.find_element(By.ID, "viewer").is_displayed()
    assert driver.execute_script("return sessionStorage.getItem('exedge.token')") is None

    driver.find_element(By.ID, "token").send_keys(TOKEN)
    driver.find_element(By.ID, "token-submit").click()
    wait(driver, lambda d: d.find_element(By.ID, "viewer").is_displayed(), "the viewer after the right token")
    assert not driver.find_element(By.ID, "token-form").is_displayed()


def test_addresses_from_the_network_are_text_not_markup(tcp_server, browser):
    server, base = tcp_server
    driver = browser
    sender = '"<img src=x onerror=alert(1)>"@example.com'
    recipient = '"<b id=injected>bold</b>"@other.test'
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as c:
        c.ehlo()
        assert c.docmd("MAIL", f"FROM:<{sender}>")[0] == 250
        assert c.docmd("RCPT", f"TO:<{recipient}>")[0] == 250
        assert c.data(b"Subject: <script>alert(2)</script>\r\n\r\nhello\r\n")[0] == 250
    with client_of(server) as client:
        [held] = server.wait_for(lambda: client.messages("Unreachable"), what="the held message")

    sign_in(driver, base, TOKEN)
    click(driver, '#queues tr[data-queue="Unreachable"] button[data-action="open"]', "Unreachable's button")
    wait(driver, lambda d: cell(d, "messages", "message", held["identity"], "from_address") == sender,
         "the sender, as text")
    assert recipient in cell(driver, "messages", "message", held["identity"], "recipients")
    created = driver.execute_script(
        "return [document.querySelectorAll('img').length, document.querySelectorAll('b').length,"
        " document.getElementById('injected') !== null, document.querySelectorAll('script').length]")
    assert created == [0, 0, False, 1]


# Markup put in the page by hand, as a mistake in the page would: the page's
# own policy refuses its inline handler (the endpoint's header alone would
# let it run), and says so with a securitypolicyviolation event.
INJECT = """
const done = arguments[arguments.length - 1];
const seen = [];
document.addEventListener('securitypolicyviolation', e => {
  seen.push(e.effectiveDirective);
  if (e.effectiveDirective.startsWith('script-src')) done([seen, window.injectedRan === true]);
});
const holder = document.createElement('div');
holder.innerHTML = '<img src="data:," onload="window.injectedRan = true" onerror="window.injectedRan = true">';
document.body.appendChild(holder);
"""


def test_the_pages_own_policy_stops_inline_handlers(tcp_server, browser):
    server, base = tcp_server
    driver = browser
    sign_in(driver, base, TOKEN)
    wait(driver, lambda d: d.execute_script("return !document.getElementById('viewer').hidden"), "the viewer")
    driver.set_script_timeout(WAIT)
    seen, ran = driver.execute_async_script(INJECT)
    assert seen[-1] == "script-src-attr" and not ran, seen
    assert not driver.execute_script("return window.injectedRan === true")


def test_queue_actions_suspend_resume_resubmit_and_redirect(tcp_server, browser):
    server, base = tcp_server
    driver = browser
    with client_of(server) as client:
        partner = held_and_retrying(server, client)["To Partner"]["id"]
    row = f'#queues tr[data-queue="{partner}"]'
    sign_in(driver, base, TOKEN)
    wait(driver, lambda d: cell(d, "queues", "queue", partner, "status") == "Retry", "the partner's queue")

    click(driver, f'{row} button[data-action="suspend"]', "Suspend")
    assert "Suspend queue" in answer_confirm(driver)
    wait(driver, lambda d: cell(d, "queues", "queue", partner, "status") == "Suspended", "the suspended queue")
    click(driver, f'{row} button[data-action="resume"]', "Resume")
    answer_confirm(driver)
    wait(driver, lambda d: cell(d, "queues", "queue", partner, "status") != "Suspended", "the resumed queue")

    click(driver, '#queues tr[data-queue="Unreachable"] button[data-action="resubmit"]', "Retry (resubmit)")
    assert "resubmit" in answer_confirm(driver)
    wait(driver, lambda d: "Unreachable: resubmitted" in notice(d), "the resubmission")
    # still no route: back in Unreachable once its envelope is read again (the queue is empty meanwhile)
    wait(driver, lambda d: cell(d, "queues", "queue", "Unreachable", "message_count") == "1",
         "the resubmitted message back in Unreachable")

    from selenium.webdriver.support import expected_conditions as EC
    click(driver, f'{row} button[data-action="redirect"]', "Redirect")
    prompt = wait(driver, EC.alert_is_present(), "the connector prompt")
    prompt.send_keys("Local drop")
    prompt.accept()
    [dropped] = server.wait_for(server.drop_files, what="the redirected message")
    with open(dropped, "rb") as f:
        assert b"X-Receiver: <bob@partner.test>" in f.read()
    wait(driver, lambda d: cell(d, "queues", "queue", partner, "message_count") == "0", "the emptied queue")


def test_a_long_queue_says_it_shows_only_its_oldest_messages(tcp_server, browser):
    from manage_scenario import send
    server, base = tcp_server
    driver = browser
    with client_of(server) as client:
        held_and_retrying(server, client)
        send(server, "dave@other.test", "nobody routes me either")
        server.wait_for(lambda: len(client.messages("Unreachable")) == 2, what="two held messages")
        oldest, newest = client.messages("Unreachable")
    # the page's own address asks for a page of one (the server lists the oldest 1,000 otherwise)
    sign_in(driver, base, TOKEN, page="/?limit=1")
    click(driver, '#queues tr[data-queue="Unreachable"] button[data-action="open"]', "Unreachable's button")
    wait(driver, lambda d: cell(d, "messages", "message", oldest["identity"], "from_address") == "alice@example.com",
         "the oldest held message")
    assert cell(driver, "messages", "message", newest["identity"], "from_address") is None
    more = driver.execute_script("var p = document.getElementById('more-messages'); return [p.hidden, p.textContent]")
    assert more == [False, "Showing the oldest 1 of 2 messages in this queue (exedge Get-Message -Queue Unreachable "
                           "-ResultSize Unlimited lists them all)."]

#!/usr/bin/env python3
"""The web page in a real browser: headless Chromium driven through
chromedriver's WebDriver protocol (plain HTTP and JSON, no client library),
against a running taskrunnerd (its `http:` listener) and `taskrunner-cli web`.

Run by tests/web.rs (`a_real_browser_retries_and_cancels`), once per backend:

    web_page.py --daemon PATH --cli PATH --database-url URL --dir SCRATCH

Twice, once with JavaScript enabled (on `taskrunner-cli web`) and once with it
disabled (on the daemon's listener): open the overview, filter the requests
by state, open a FAILED request, click Retry and see the row go RUNNING then
FINISHED in the database, open a waiting request and click Cancel, open a
batch's progress from the batches page and a flow's board from the flows
page, pause a queue through the overview's form (its row waits while another
queue's runs) and resume it with its button; then check
that the browser logged no Content-Security-Policy violation.
"""

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

DEADLINE = 30.0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what, condition, timeout=DEADLINE):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def wait_listening(port):
    def up():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            return False

    wait_until(f"a listener on port {port}", up)


class WebDriver:
    """The few WebDriver commands the test needs."""

    def __init__(self, port):
        self.base = f"http://127.0.0.1:{port}"
        self.session = None

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base + path, data=data, method=method,
            headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read() or b"{}").get("value")
        except urllib.error.HTTPError as error:
            raise AssertionError(f"WebDriver {method} {path}: {error.read().decode()}") from None

    def start(self, user_data_dir, javascript):
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", f"--user-data-dir={user_data_dir}"]
        options = {"binary": "/usr/bin/chromium", "args": args}
        if not javascript:
            options["prefs"] = {"profile.managed_default_content_settings.javascript": 2}
        value = self.call("POST", "/session", {"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": options,
            "goog:loggingPrefs": {"browser": "ALL"},
        }}})
        self.session = value["sessionId"]

    def s(self, path):
        return f"/session/{self.session}{path}"

    def go(self, url):
        self.call("POST", self.s("/url"), {"url": url})

    def url(self):
        return self.call("GET", self.s("/url"))

    def source(self):
        return self.call("GET", self.s("/source"))

    def find(self, css):
        value = self.call("POST", self.s("/element"), {"using": "css selector", "value": css})
        return next(iter(value.values()))

    def click(self, css):
        self.call("POST", self.s(f"/element/{self.find(css)}/click"), {})

    def type(self, css, text):
        self.call("POST", self.s(f"/element/{self.find(css)}/value"), {"text": text})

    def browser_log(self):
        return self.call("POST", self.s("/se/log"), {"type": "browser"}) or []

    def quit(self):
        if self.session:
            self.call("DELETE", self.s(""))


class Setup:
    def __init__(self, args):
        self.args = args
        self.dir = args.dir
        os.makedirs(self.dir, exist_ok=True)
        self.flag = os.path.join(self.dir, "flaky-may-succeed")
        # Flaky runs until this file exists: a retried try stays RUNNING
        # until the test has seen it so, however slow the machine.
        self.go_on = os.path.join(self.dir, "flaky-may-end")
        self.daemon_port = free_port()
        self.web_port = free_port()
        self.config = os.path.join(self.dir, "taskrunner.yml")
        with open(self.config, "w") as f:
            f.write(f"""database_url: {args.database_url}
poll_interval: 1s
heartbeat_interval: 1s
lease_timeout: 5s
kill_grace: 2s
retry_delay: 1s
socket: {self.dir}/run/daemon.sock
http:
  listen: 127.0.0.1:{self.daemon_port}
tasks:
  Flaky:
    command: [/bin/sh, -c, "while [ ! -e {self.go_on} ]; do sleep 0.05; done; test -e {self.flag}"]
  Fetch:
    command: [/bin/sh, -c, "echo artifact-42"]
flows:
  deploy:
    steps:
      - {{ name: fetch, task: Fetch, provides: artifact }}
      - {{ name: restart, task: NoOp }}
""")
        self.processes = []

    def cli(self, *arguments):
        done = subprocess.run([self.args.cli, "--config", self.config, *arguments],
                              capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise AssertionError(f"taskrunner-cli {' '.join(arguments)}: {done.stderr}")
        return done.stdout

    def state(self, request_id):
        shown = self.cli("show", str(request_id))
        return re.search(r"^result\s+(\S+)", shown, re.M).group(1)

    def start(self):
        self.cli("migrate")
        log = open(os.path.join(self.dir, "daemon.log"), "w")
        self.processes.append(subprocess.Popen(
            [self.args.daemon, "--config", self.config], stdout=log, stderr=log))
        web_log = open(os.path.join(self.dir, "web.log"), "w")
        self.processes.append(subprocess.Popen(
            [self.args.cli, "--config", self.config, "web", "--listen", f"127.0.0.1:{self.web_port}"],
            stdout=web_log, stderr=web_log))
        wait_listening(self.daemon_port)
        wait_listening(self.web_port)

    def stop(self):
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


def one_pass(setup, driver, base, javascript):
    """The clicks of the issue, on the page at `base`."""
    # A FAILED request with no try left, and a request that waits (delayed).
    if os.path.exists(setup.flag):
        os.remove(setup.flag)
    open(setup.go_on, "w").close()
    failed = int(setup.cli("enqueue", "Flaky", "--try-limit", "1").strip())
    wait_until(f"request {failed} to fail", lambda: setup.state(failed) == "FAILED")
    waiting = int(setup.cli("enqueue", "NoOp", "--delay", "1h").strip())

    driver.go(base + "/")
    assert "Overview" in driver.source(), driver.source()[:500]
    # Filter the requests by state, through the form.
    driver.go(base + "/requests")
    driver.click("select[name=state] option[value=FAILED]")
    driver.click("form.filters button[type=submit]")
    wait_until("the filtered list", lambda: "state=FAILED" in driver.url())
    page = driver.source()
    assert f'href="/requests/{failed}"' in page, page[:2000]
    assert f'href="/requests/{waiting}"' not in page, "the state filter let a waiting row through"
    # Open the FAILED request and retry it: RUNNING, then FINISHED.
    driver.click(f'a[href="/requests/{failed}"]')
    wait_until("the request page", lambda: driver.url().endswith(f"/requests/{failed}"))
    open(setup.flag, "w").close()
    os.remove(setup.go_on)
    driver.click("form[action$='/retry'] button")
    wait_until(f"request {failed} to be RUNNING", lambda: setup.state(failed) == "RUNNING")
    open(setup.go_on, "w").close()
    wait_until(f"request {failed} to be FINISHED", lambda: setup.state(failed) == "FINISHED")
    # Open the waiting request and cancel it.
    driver.go(f"{base}/requests/{waiting}")
    driver.click("form[action$='/cancel'] button")
    wait_until(f"request {waiting} to be CANCELLED", lambda: setup.state(waiting) == "CANCELLED")
    assert "CANCELLED" in driver.source()
    # A batch's progress: from the list to the batch, its bar and its member.
    batch = int(setup.cli("batch", "create", "--name", "nightly", "--open").strip())
    member = int(setup.cli("enqueue", "NoOp", "--batch", str(batch)).strip())
    setup.cli("batch", "seal", str(batch))
    wait_until(f"batch member {member} to finish", lambda: setup.state(member) == "FINISHED")
    driver.go(base + "/batches")
    driver.click(f'a[href="/batches/{batch}"]')
    wait_until("the batch page", lambda: driver.url().endswith(f"/batches/{batch}"))
    page = driver.source()
    assert "<progress" in page and f'href="/requests/{member}"' in page, page[:3000]
    # A flow's board: from the list of flows to the board, each step FINISHED
    # and what the first one provided.
    flow = int(setup.cli("flow", "post", "deploy").strip())
    wait_until(f"flow {flow} to finish",
               lambda: "FINISHED" in setup.cli("flow", "show", str(flow)).splitlines()[0])
    driver.go(base + "/flows")
    driver.click(f'a[href="/flows/{flow}"]')
    wait_until("the flow's board", lambda: driver.url().endswith(f"/flows/{flow}"))
    page = driver.source()
    assert "table class=\"board\"" in page and "artifact: artifact-42" in page, page[:4000]
    assert page.count(">FINISHED<") >= 2, page[:4000]
    # Pause a queue through the overview's form, with a reason: the daemon
    # stops claiming its rows (a row enqueued after it in another queue runs
    # first), then the Paused section's Resume button lets it run.
    held_queue = f"held-{'js' if javascript else 'plain'}"
    driver.go(base + "/")
    driver.click("form.pause select[name=kind] option[value=queue]")
    driver.type("form.pause input[name=name]", held_queue)
    driver.type("form.pause input[name=reason]", "relay down")
    driver.click("form.pause button[type=submit]")
    wait_until(f"queue {held_queue} to be paused",
               lambda: f"queue {held_queue} (since" in setup.cli("pause"))
    assert "relay down" in setup.cli("pause")
    wait_until("the daemon to read the pause",
               lambda: f"queue {held_queue}" in setup.cli("status"))
    held = int(setup.cli("enqueue", "NoOp", "--queue", held_queue).strip())
    after = int(setup.cli("enqueue", "NoOp").strip())
    wait_until(f"request {after} to finish", lambda: setup.state(after) == "FINISHED")
    assert setup.state(held) == "NULL", f"request {held} of a paused queue ran: {setup.cli('show', str(held))}"
    driver.go(base + "/")
    page = driver.source()
    assert "<h2>Paused</h2>" in page and "relay down" in page, page[:3000]
    driver.click(f"section.paused form[action='/resume'] button")
    wait_until(f"request {held} of the resumed queue to finish",
               lambda: setup.state(held) == "FINISHED")
    assert f"queue {held_queue}" not in setup.cli("pause")
    # A bulk cancel changes the rows its preview counted and no row that
    # came after it: two rows wait in a paused queue, the preview counts
    # them, a third arrives, and the button cancels the two.
    bulk_queue = f"bulk-{'js' if javascript else 'plain'}"
    setup.cli("pause", "--queue", bulk_queue)
    wait_until("the daemon to read the pause",
               lambda: f"queue {bulk_queue}" in setup.cli("status"))
    counted = [int(setup.cli("enqueue", "NoOp", "--queue", bulk_queue).strip()) for _ in range(2)]
    driver.go(base + f"/bulk?action=cancel&queue={bulk_queue}")
    assert "2 requests match" in driver.source(), driver.source()[:3000]
    later = int(setup.cli("enqueue", "NoOp", "--queue", bulk_queue).strip())
    driver.click("form[action='/bulk'] button[type=submit]")
    wait_until("the bulk cancel's answer", lambda: "applied to 2 requests" in driver.source())
    assert [setup.state(i) for i in counted] == ["CANCELLED", "CANCELLED"], setup.cli("list")
    assert setup.state(later) == "NULL", setup.cli("show", str(later))
    setup.cli("cancel", str(later))
    setup.cli("resume", "--queue", bulk_queue)
    # The other pages open too.
    for path in ["/daemons", "/schedules", f"/bulk?action=retry&state=CANCELLED"]:
        driver.go(base + path)
        assert "<h1>" in driver.source(), path
    violations = [entry for entry in driver.browser_log()
                  if "Content Security Policy" in entry.get("message", "")
                  or "Refused to" in entry.get("message", "")]
    assert not violations, f"CSP violations: {violations}"
    return f"javascript {'on' if javascript else 'off'}: {base}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--daemon", required=True)
    parser.add_argument("--cli", required=True)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--dir", required=True)
    args = parser.parse_args()
    setup = Setup(args)
    driver_port = free_port()
    chromedriver = subprocess.Popen(["/usr/bin/chromedriver", f"--port={driver_port}"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    passed = []
    try:
        wait_listening(driver_port)
        setup.start()
        for javascript, port in [(True, setup.web_port), (False, setup.daemon_port)]:
            driver = WebDriver(driver_port)
            driver.start(os.path.join(setup.dir, f"chromium-{javascript}"), javascript)
            try:
                passed.append(one_pass(setup, driver, f"http://127.0.0.1:{port}", javascript))
            finally:
                driver.quit()
        # Each action was logged with the remote address and the user, by
        # the server that took it.
        for log in ["web.log", "daemon.log"]:
            text = open(os.path.join(setup.dir, log)).read()
            actions = [line for line in text.splitlines() if "web action" in line]
            assert any("remote=127.0.0.1:" in line and "user=-" in line and 'action="retry"' in line
                       for line in actions), f"{log}: no logged retry with its remote address: {actions}"
            assert any('action="cancel"' in line for line in actions), f"{log}: {actions}"
            pauses = [line for line in text.splitlines() if "web pause action" in line]
            assert any('action="pause"' in line and 'outcome="paused"' in line
                       and "relay down" in line for line in pauses), f"{log}: {pauses}"
            assert any('action="resume"' in line and 'outcome="resumed"' in line
                       for line in pauses), f"{log}: {pauses}"
    finally:
        setup.stop()
        chromedriver.terminate()
        chromedriver.wait(timeout=20)
    for line in passed:
        print(f"ok: {line}")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as error:
        print(f"browser test failed: {error}", file=sys.stderr)
        sys.exit(1)

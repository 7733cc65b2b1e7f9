"""The page at `GET /`, used as a person uses it, in headless Chromium against the real service
(marked slow): pick a photo with several faces, see the annotated photo and the faces table;
take a camera snapshot; give a wrong token, see the service's reason.

Chromium is driven over the DevTools protocol through `--remote-debugging-pipe` (NUL-separated
JSON on file descriptors 3 and 4), which needs no client library. In CI (CI set) a missing browser
fails the test; on a developer's machine it skips, as tests/test_evaluate.py does.
"""

import base64
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.services import ROOT
from tests.test_serve import TOKEN, deployed, serve_config

CHROMIUM = Path("/usr/bin/chromium")
PHOTO = ROOT / "examples" / "photos" / "group-of-four.jpg"
# What the page shows once it has its answers, or its error, read from the DOM in one go.
STATE = """JSON.stringify({
  error: document.getElementById("error").textContent,
  status: document.getElementById("status").textContent,
  image: [document.getElementById("annotated").naturalWidth, document.getElementById("annotated").naturalHeight],
  rows: [...document.querySelectorAll("#faces tbody tr")].map(row => ({
    label: row.querySelector(".label").textContent,
    confidence: row.querySelector(".confidence").textContent,
    box: row.querySelector(".box").textContent,
    bars: row.querySelectorAll(".bar").length,
  })),
  tableShown: !document.getElementById("faces").hidden,
})"""


class Chromium:
    """Headless Chromium and one page in it, driven over the DevTools protocol on a pipe."""

    def __init__(self, profile: Path) -> None:
        # The browser reads commands on its fd 3 and writes answers on its fd 4; bash moves the
        # pipes there (POSIX sh may not redirect from descriptors above 9, which pytest reaches).
        commands, self._to_browser = os.pipe()
        self._from_browser, answers = os.pipe()
        self.process = subprocess.Popen(
            ["/bin/bash", "-c", f'exec "$0" "$@" 3<&{commands} 4>&{answers}', str(CHROMIUM),
             "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             # A camera that shows a test pattern, granted without asking: the snapshot button.
             "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
             f"--user-data-dir={profile}", "--window-size=1280,1400", "about:blank"],
            pass_fds=(commands, answers), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        os.close(commands)
        os.close(answers)
        self._buffer = b""
        self._next_id = 0
        page = next(t for t in self.send("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.send("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]

    def send(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        """One command's result; events arriving meanwhile are dropped (the tests poll the DOM)."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._from_browser, 1 << 16)
                if not chunk:
                    raise RuntimeError(f"chromium closed the pipe during {method}")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]

    def page(self, method: str, **params: Any) -> dict[str, Any]:
        return self.send(method, self.session, **params)

    def evaluate(self, expression: str) -> Any:
        result = self.page("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 90) -> Any:
        """The value of `expression` once it is truthy."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.2)
        raise TimeoutError(f"the page never satisfied {expression!r}; it shows {self.evaluate(STATE)}")

    def close(self) -> None:
        os.close(self._to_browser)
        os.close(self._from_browser)
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Checked before the service is deployed, so a machine without Chromium skips at once."""
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("headless Chromium is required in CI (.ci/run installs the Debian package chromium)")
        pytest.skip("headless Chromium not installed (apt-get install -y chromium)")
    chromium = Chromium(tmp_path_factory.mktemp("chromium-profile"))
    yield chromium
    chromium.close()


@pytest.fixture(scope="module")
def service(browser, ray_cluster, tmp_path_factory):
    """The embedded model behind a token, as configured in conf/serve.yaml otherwise."""
    config = serve_config(auth_token=TOKEN, precision="fp32")
    with deployed(ray_cluster, config, tmp_path_factory.mktemp("serve-page")) as url:
        yield url


@pytest.mark.slow
def test_a_photo_picked_on_the_page_shows_its_faces_boxed_and_tabled(browser, service, tmp_path):
    expected = httpx.post(service + "/predict", files={"file": ("group.jpg", PHOTO.read_bytes(), "image/jpeg")},
                          headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120).json()
    assert len(expected["faces"]) == 4, "precondition: the detector finds the four composed faces"

    browser.page("Page.navigate", url=service + "/")
    browser.wait_for("document.readyState === 'complete' && !!document.getElementById('file')")
    browser.evaluate(f"document.getElementById('token').value = {json.dumps(TOKEN)}")
    document = browser.page("DOM.getDocument")["root"]["nodeId"]
    file_input = browser.page("DOM.querySelector", nodeId=document, selector="#file")["nodeId"]
    browser.page("DOM.setFileInputFiles", nodeId=file_input, files=[str(PHOTO)])
    state = json.loads(browser.wait_for(
        f"(() => {{ const s = {STATE}; const v = JSON.parse(s);"
        " return (v.error || (v.rows.length && v.image[0])) ? s : ''; })()"))

    assert state["error"] == ""
    assert state["image"] == [640, 480], "the annotated photo is shown at the photo's size"
    assert state["tableShown"]
    assert [row["label"] for row in state["rows"]] == [face["predicted_label"] for face in expected["faces"]]
    assert [row["confidence"] for row in state["rows"]] == [
        f"{100 * face['confidence']:.1f}%" for face in expected["faces"]]
    assert [row["box"] for row in state["rows"]] == [
        ", ".join(str(face["box"][k]) for k in "xywh") for face in expected["faces"]]
    assert all(row["bars"] == 7 for row in state["rows"]), "a probability bar per class"
    assert state["status"].startswith("4 faces (detected)")

    shot = tmp_path / "page.png"
    shot.write_bytes(base64.b64decode(browser.page("Page.captureScreenshot", format="png")["data"]))
    assert Image.open(shot).size[0] > 0
    print(f"screenshot: {shot}")


@pytest.mark.slow
def test_the_page_shows_the_services_reason_for_a_refusal(browser, service):
    browser.page("Page.navigate", url=service + "/")
    browser.wait_for("document.readyState === 'complete' && !!document.getElementById('file')")
    browser.evaluate("document.getElementById('token').value = 'wrong'")
    document = browser.page("DOM.getDocument")["root"]["nodeId"]
    file_input = browser.page("DOM.querySelector", nodeId=document, selector="#file")["nodeId"]
    browser.page("DOM.setFileInputFiles", nodeId=file_input, files=[str(PHOTO)])
    error = browser.wait_for("document.getElementById('error').textContent")
    assert error == "401 missing or wrong bearer token"
    state = json.loads(browser.evaluate(STATE))
    assert state["rows"] == [] and not state["tableShown"] and state["image"] == [0, 0]


@pytest.mark.slow
def test_a_camera_snapshot_goes_through_the_same_path(browser, service):
    """Chromium's fake camera shows a test pattern: the snapshot is posted and answered no_face."""
    browser.page("Page.navigate", url=service + "/")
    browser.wait_for("document.readyState === 'complete' && !document.getElementById('camera').hidden")
    browser.evaluate(f"document.getElementById('token').value = {json.dumps(TOKEN)}")
    browser.evaluate("document.getElementById('camera').click()")
    width, height = browser.wait_for("(() => { const v = document.getElementById('video');"
                                     " return v.videoWidth ? [v.videoWidth, v.videoHeight] : null; })()")
    browser.evaluate("document.getElementById('snap').click()")
    status = browser.wait_for("document.getElementById('error').textContent"
                              " || (document.getElementById('annotated').naturalWidth"
                              " && document.getElementById('status').textContent)")
    assert status.startswith(f"No face found in this {width}x{height} photo"), status

"""The playground in headless Chromium (Debian `chromium` + Playwright's Python package; no `playwright install`):
type a prompt, watch streamed text appear, press stop; have a reply spoken; generate images and see them in the
gallery."""

from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import replace

import pytest
from serveutil import API_KEY, LiveServer, free_port

CHROMIUM = os.environ.get("AIGC_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not (os.path.exists(CHROMIUM) or shutil.which("chromium")),
                                reason="needs Debian's chromium (apt-get install chromium)")


class _Slow:
    """Wraps a handle: one event every 40 ms, so a person (or a test) can press stop mid-stream."""

    def __init__(self, handle) -> None:
        self.handle, self.cancelled = handle, threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()
        self.handle.cancel()

    def __iter__(self):
        for ev in self.handle:
            time.sleep(0.04)
            yield ev


@pytest.fixture(scope="module")
def playground(tiny_chat_dir, tiny_image_runs):
    from audioutil import tiny_voice

    from aigckit.image.api import load_image_model
    from aigckit.serve.app import create_app
    from aigckit.serve.models import Registry
    from aigckit.text.lm import load_lm

    reg = Registry.from_objects(text={"tiny-chat": load_lm(tiny_chat_dir)},
                                image={"gan": load_image_model(tiny_image_runs["gan"]),
                                       "ddpm": load_image_model(tiny_image_runs["ddpm"])},
                                speech={"tiny-voice": tiny_voice(window_frames=64)})
    worker = reg.models["tiny-chat"].worker
    real_stream, handles = worker.stream, []

    def slow_stream(ids, params):  # never stops at EOS, so stop is pressed while tokens still flow
        h = _Slow(real_stream(ids, replace(params, ignore_eos=True)))
        handles.append(h)
        return h

    worker.stream = slow_stream
    srv = LiveServer(create_app(reg, api_key=API_KEY), free_port()).start()
    yield srv, handles
    srv.stop()


@pytest.fixture(scope="module")
def page(playground):
    from playwright.sync_api import sync_playwright

    srv, _ = playground
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        pg = browser.new_page(viewport={"width": 1200, "height": 800})
        pg.set_default_timeout(15_000)
        pg.goto(srv.url + "/")
        pg.fill("#api-key", API_KEY)
        pg.dispatch_event("#api-key", "change")
        pg.wait_for_function("document.querySelector('#chat-model').value === 'tiny-chat'")
        yield pg
        browser.close()


def test_chat_streams_and_stops(page, playground):
    _, handles = playground
    page.fill("#chat-input", "w10 w11 w12")
    page.click("#send")
    assert page.is_enabled("#stop")
    reply = page.locator(".msg.assistant .text").last
    page.wait_for_function("document.querySelector('.msg.assistant .text').textContent.split(' ').length > 3")
    first = reply.text_content()
    page.wait_for_function(f"document.querySelector('.msg.assistant .text').textContent.length > {len(first)}")
    page.click("#stop")  # streaming: the text grew between two looks, and stop cuts it
    page.wait_for_selector(".msg.assistant[data-finish='stopped']")
    assert page.is_enabled("#send") and not page.is_enabled("#stop")
    stopped_at = reply.text_content()
    time.sleep(0.3)
    assert reply.text_content() == stopped_at  # nothing arrives after stop
    deadline = time.monotonic() + 5
    while not handles[-1].cancelled.is_set() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert handles[-1].cancelled.is_set()  # the server stopped decoding too
    assert page.locator(".msg.user").first.text_content() == "w10 w11 w12"


def test_speak_button_plays_a_reply(page):
    page.click("#tab-chat")
    assert page.input_value("#voice-model") == "tiny-voice"
    page.eval_on_selector("#max-tokens", "el => { el.value = '6'; el.dispatchEvent(new Event('input')); }")
    n = page.locator(".msg.assistant").count()
    page.fill("#chat-input", "w20 w21")
    page.click("#send")
    page.wait_for_selector(f".msg.assistant >> nth={n}")
    button = page.locator(".msg.assistant").nth(n).locator("button.speak")
    button.wait_for()
    with page.expect_response("**/v1/audio/speech") as info:
        button.click()
    resp = info.value
    assert resp.status == 200 and resp.headers["content-type"] == "audio/pcm"
    assert resp.request.post_data_json["input"] == page.locator(".msg.assistant .text").nth(n).text_content()
    page.wait_for_function(f"['done', 'error'].includes(document.querySelectorAll('.msg.assistant')[{n}]"
                           ".querySelector('button.speak').dataset.state)")
    assert button.get_attribute("data-state") == "done", page.locator("#status").text_content()
    assert int(button.get_attribute("data-bytes")) > 1000  # the audio was read and scheduled for playing
    assert page.locator("#status").text_content() == ""


def test_image_gallery(page):
    page.click("#tab-image")
    page.select_option("#image-model", "gan")
    page.select_option("#image-class", "sneaker")
    page.fill("#image-seed", "7")
    page.fill("#image-n", "3")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#gallery figure').length === 3")
    caps = page.locator("#gallery figcaption").all_text_contents()
    assert all("class sneaker" in c and "seed 7" in c for c in caps)
    assert page.evaluate("document.querySelector('#gallery img').naturalWidth") == 28
    page.select_option("#image-model", "ddpm")
    assert page.is_enabled("#image-steps")
    page.select_option("#image-class", "bag")
    page.fill("#image-steps", "3")
    page.fill("#image-n", "1")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#gallery figure').length === 4")
    assert "ddim 3 steps" in page.locator("#gallery figcaption").first.text_content()
    assert page.locator("#status").text_content() == ""

"""Screenshots of the playground for docs/: a streamed SmolLM2 chat and an image gallery.

    python bench/playground_screenshots.py --image gan=runs/gan --image ddpm=runs/ddpm --out docs
Needs Debian's chromium and Playwright's Python package (no `playwright install`).
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--image", action="append", default=[], help="ID=RUN image model(s) to serve")
    ap.add_argument("--out", default="docs")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "aigckit", "serve", "--port", str(port), "--log-level", "warning", "--model",
           args.model] + [x for spec in args.image for x in ("--model", f"image:{spec}" if "=" not in spec
                                                                 else spec)]
    proc = subprocess.Popen(cmd)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        from playwright.sync_api import sync_playwright

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 760})
            page.set_default_timeout(120_000)
            page.goto(url + "/")
            page.wait_for_function("document.querySelector('#chat-model').value !== ''")
            page.fill("#system", "You are a concise, friendly assistant.")
            for q in ["What is a diffusion model, in two sentences?", "And a GAN?"]:
                page.fill("#chat-input", q)
                page.click("#send")
                page.wait_for_selector(f".msg.assistant:nth-of-type({2 * (1 + ['What', 'And'].index(q.split()[0]))})"
                                       " .meta")
            page.screenshot(path=str(out / "playground-chat.png"))
            if args.image:
                page.click("#tab-image")
                for spec, cls in zip(args.image, ["sneaker", "bag", "trouser"]):
                    mid = spec.split("=")[0]
                    page.select_option("#image-model", mid)
                    if page.is_enabled("#image-class"):
                        page.select_option("#image-class", label=cls)
                    page.fill("#image-seed", "1")
                    page.fill("#image-n", "4")
                    if page.is_enabled("#image-steps"):
                        page.fill("#image-steps", "25")
                    n = page.locator("#gallery figure").count()
                    page.click("#generate")
                    page.wait_for_function(f"document.querySelectorAll('#gallery figure').length >= {n + 4}")
                page.screenshot(path=str(out / "playground-image.png"))
            browser.close()
    finally:
        proc.terminate()
        proc.wait(30)
    print("wrote", *sorted(str(p) for p in out.glob("playground-*.png")))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Drives Debian's headless Chromium for the status page's browser test
(server/tests/status_browser.rs), one command per stdin line, one JSON answer per stdout line:

  open URL                 load a page; answers, in ms from the navigation's start: "ttfb" (first
                           byte), "html" (the document received), "fcp" (first contentful paint),
                           "ms" (the load event's end); "bytes" (first-load bytes), "url"
  js CODE                  run `return (CODE)` in the page; answers its value
  wait MS CODE             poll `CODE` every 10 ms until truthy; answers {"ms": elapsed} or {"timeout": true}
  screenshot PATH          save a PNG of the window
  quit

Selenium talks to /usr/bin/chromedriver (no driver download, no network beyond loopback).
"""
import json
import sys
import tempfile
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service


def main():
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    profile = tempfile.mkdtemp(prefix="dlb-chromium-")
    for arg in [
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--window-size=1280,800", "--user-data-dir=" + profile,
    ]:
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    driver.set_window_size(1280, 800)
    out = lambda v: (print(json.dumps(v), flush=True))
    out({"ready": True})
    try:
        for line in sys.stdin:
            cmd, _, rest = line.rstrip("\n").partition(" ")
            if cmd == "open":
                driver.get(rest)
                # The load event's end and the first paint are recorded just after `get`
                # returns: wait for both (at most 10 s), then read them.
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and not driver.execute_script(
                        "const n = performance.getEntriesByType('navigation')[0];"
                        "return n && n.loadEventEnd > 0 && "
                        "performance.getEntriesByName('first-contentful-paint').length > 0;"):
                    time.sleep(0.01)
                nav = driver.execute_script(
                    "const n = performance.getEntriesByType('navigation')[0];"
                    "const r = performance.getEntriesByType('resource');"
                    "const p = performance.getEntriesByName('first-contentful-paint')[0];"
                    "return {ms: n.loadEventEnd - n.startTime, fcp: p ? p.startTime : null, "
                    "ttfb: n.responseStart - n.startTime, html: n.responseEnd - n.startTime, "
                    "bytes: n.encodedBodySize + r.reduce((a, e) => a + e.encodedBodySize, 0), "
                    "url: location.pathname};")
                out(nav)
            elif cmd == "js":
                out(driver.execute_script("return (" + rest + ");"))
            elif cmd == "wait":
                ms, _, code = rest.partition(" ")
                start = time.monotonic()
                deadline = start + int(ms) / 1000
                while True:
                    if driver.execute_script("return !!(" + code + ");"):
                        out({"ms": (time.monotonic() - start) * 1000})
                        break
                    if time.monotonic() > deadline:
                        out({"timeout": True})
                        break
                    time.sleep(0.01)
            elif cmd == "screenshot":
                driver.save_screenshot(rest)
                out({"saved": rest})
            elif cmd == "quit":
                break
            else:
                out({"error": "unknown command " + cmd})
    finally:
        driver.quit()


if __name__ == "__main__":
    main()

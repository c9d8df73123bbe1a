"""Browser end-to-end: headless Debian Chromium driven by Playwright through all four tabs on a tiny model.
The page is served behind the UI's login, which the browser fills in first. Train: launch the quickstart
recipe twice (MoELoRA and LoRACoE) as real `qmoe finetune` subprocesses (the second waits in the run queue
until the first has finished: one training per device); Monitor: the loss curves and expert-load heatmap
appear and the run finishes; Chat: a streamed reply with tokens coloured by their top expert and a selected
token's routing heatmap; Compare: both runs.

Screenshots of each tab go to test-output/ui/; with QMOE_UPDATE_SCREENSHOTS=1 they are also copied to
docs/screenshots/ (the README's pictures). Needs `scripts/install_browser.sh` (chromium + playwright)."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from pipeline_support import arithmetic_items, build_tiny_chat_model, write_jsonl

playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="pip install playwright (scripts/install_browser.sh)"
)

from qmoe_app.auth import Accounts  # noqa: E402
from qmoe_app.main import build_app  # noqa: E402
from qmoe_app.testing import serving  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("QMOE_CHROMIUM", "/usr/bin/chromium")
SHOTS = REPO / "test-output" / "ui"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]
TRAIN_TIMEOUT_MS = 240_000
LOGIN = ("alice", "wonderland")  # the UI is served behind its login, as `qmoe ui --host 0.0.0.0` requires

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (scripts/install_browser.sh installs Debian's)")
    root = tmp_path_factory.mktemp("ui-e2e")
    models, data = root / "models", root / "data"
    build_tiny_chat_model(models / "tiny-chat")
    data.mkdir()
    write_jsonl(data / "train.jsonl", arithmetic_items(64))
    write_jsonl(data / "test.jsonl", arithmetic_items(8, start=500))
    with pytest.MonkeyPatch.context() as env:
        # inherited by the training subprocesses: local data, no hub, no progress bars in the logs
        env.setenv("QMOE_DATA_DIR", str(data))
        env.setenv("HF_HUB_OFFLINE", "1")
        env.setenv("TQDM_DISABLE", "1")
        demo = build_app(root / "runs", models)
        accounts = Accounts()
        accounts.add(*LOGIN, "test")
        with serving(demo, auth=accounts) as url:
            yield url, demo.qmoe_context


@pytest.fixture(scope="module")
def page(served):
    url, _ = served
    SHOTS.mkdir(parents=True, exist_ok=True)
    with playwright_api.sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        browser = p.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1400, "height": 1000},
        )
        page = browser.new_page()
        page.goto(url)
        page.get_by_label("username").fill(LOGIN[0])
        page.get_by_label("password").fill(LOGIN[1])
        page.get_by_role("button", name="Login").click()
        page.wait_for_selector("#train-launch")
        yield page
        browser.close()


def set_number(page, field: str, value) -> None:
    box = page.locator(f"#field-{field} input")
    box.fill(str(value))
    box.press("Tab")


def choose(page, elem_id: str, value: str) -> None:
    """Pick ``value`` in a Gradio dropdown by typing it and taking the matching option (or, for a custom
    value such as a model folder name, pressing Enter)."""
    box = page.locator(f"#{elem_id} input")
    option = page.locator(f"#{elem_id} [role=option]", has_text=value).first
    for attempt in range(3):  # a live refresh may re-render the option list under the pointer
        box.click()
        box.fill(value)
        try:
            option.wait_for(timeout=3000)
            option.click(timeout=3000)
            break
        except playwright_api.TimeoutError:
            if attempt == 2:
                box.press("Enter")
    page.keyboard.press("Escape")


def wait_until_idle(page) -> None:
    """Until no event is in flight (Gradio dims outputs while their event runs)."""
    page.wait_for_function(
        "!document.querySelector('.pending, .generating, [data-testid=status-tracker].wrap:not(.hide)')", timeout=30_000
    )
    page.wait_for_timeout(500)


def screenshot(page, name: str) -> Path:
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("QMOE_UPDATE_SCREENSHOTS") == "1":
        target = REPO / "docs" / "screenshots"
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / path.name)
    return path


def launched_name(page, previous: str | None) -> str:
    """The run name the Train tab reports after a launch (a different one than ``previous``): started, or
    queued while the other run trains on the same device."""
    message = page.locator("#train-message")
    pattern = re.compile(r"(?:launched|queued) (\S+?)(?::| \(position)")
    playwright_api.expect(message).to_contain_text(pattern, timeout=30_000)
    for _ in range(60):
        name = pattern.search(message.inner_text()).group(1)
        if name != previous:
            return name
        page.wait_for_timeout(500)
    raise AssertionError(f"no second launch reported (still {previous})")


def test_train_tab_launches_the_quickstart_recipe_on_a_tiny_model(page, served):
    _, ctx = served
    choose(page, "field-model-source", "tiny-chat")
    for field, value in (
        ("train-max_steps", 6),
        ("train-logging_steps", 2),
        ("data-max_length", 64),
        ("data-limit", 32),
        ("eval-limit", 4),
        ("train-batch_size", 4),
    ):
        set_number(page, field, value)
    # an invalid value is refused in the form with the schema's reason, and nothing starts
    set_number(page, "train-batch_size", 0)
    page.click("#train-launch")
    playwright_api.expect(page.locator("#train-message")).to_contain_text("Refused", timeout=20_000)
    playwright_api.expect(page.locator("#train-message")).to_contain_text("train.batch_size")
    assert ctx.runs.list_runs() == []
    set_number(page, "train-batch_size", 4)
    page.click("#train-preview")
    playwright_api.expect(page.locator("#train-message")).to_contain_text("valid recipe", timeout=20_000)
    page.click("#train-launch")
    first = launched_name(page, None)
    # a second run, LoRACoE, launched while the first trains: its own directory; it waits for the device
    choose(page, "field-adapter-method", "loracoe")
    playwright_api.expect(page.locator("#field-adapter-top_k")).to_be_hidden()
    page.click("#train-launch")
    second = launched_name(page, first)
    assert first != second and set(ctx.runs.list_runs()) == {first, second}
    playwright_api.expect(page.locator("#train-runs")).to_contain_text(second, timeout=20_000)
    screenshot(page, "train")
    page.run_names = (first, second)


def test_monitor_tab_shows_curves_and_expert_load(page, served):
    _, ctx = served
    first, second = page.run_names
    page.get_by_role("tab", name="Monitor").click()
    choose(page, "monitor-run", first)
    playwright_api.expect(page.locator("#monitor-curves img")).to_be_visible(timeout=TRAIN_TIMEOUT_MS)
    playwright_api.expect(page.locator("#monitor-heatmap img")).to_be_visible(timeout=TRAIN_TIMEOUT_MS)
    playwright_api.expect(page.locator("#monitor-status")).to_contain_text("state finished", timeout=TRAIN_TIMEOUT_MS)
    playwright_api.expect(page.locator("#monitor-imbalance-table")).to_contain_text("L0", timeout=20_000)
    assert ctx.runs.status(first)["state"] == "finished"
    page.wait_for_timeout(2500)  # let the last live refresh land before the picture
    wait_until_idle(page)
    screenshot(page, "monitor")
    for name in (first, second):  # the LoRACoE run must finish too (the Compare tab shows both)
        deadline_ms = TRAIN_TIMEOUT_MS
        while ctx.runs.status(name)["state"] not in ("finished", "failed", "stopped") and deadline_ms > 0:
            page.wait_for_timeout(1000)
            deadline_ms -= 1000
        assert ctx.runs.status(name)["state"] == "finished", ctx.runs.status(name)


def test_chat_tab_streams_a_reply_with_routing_colours(page, served):
    first, _ = page.run_names
    page.get_by_role("tab", name="Chat").click()
    page.wait_for_timeout(1000)  # the tab's select event refreshes the model list
    choose(page, "chat-model", first)
    page.locator("#chat-input textarea").fill("Tom has 3 apples and buys 5 more. How many apples does he have?")
    page.click("#chat-send")
    playwright_api.expect(page.locator("#chat-status")).to_contain_text("routing recorded", timeout=120_000)
    tokens = page.locator("#chat-routing .token")
    coloured = page.locator("#chat-routing .token.highlighted")
    assert tokens.count() > 10 and coloured.count() >= tokens.count() - 1  # only the final token has no route
    legend = page.locator("#chat-routing [data-testid='highlighted-text:category-legend']")
    assert legend.inner_text().count("expert") == 8  # quickstart: 8 experts, one colour each
    assert len({coloured.nth(i).get_attribute("style") for i in range(coloured.count())}) >= 2
    playwright_api.expect(page.locator("#chat-token-heatmap img")).to_be_visible(timeout=30_000)
    index_box = page.locator("#chat-token-index input")
    first_generated = int(index_box.input_value())  # shown first: the reply's first token
    heatmap_before = page.locator("#chat-token-heatmap img").get_attribute("src")
    coloured.nth(3).click()  # selecting a prompt token redraws its layers × experts heatmap
    playwright_api.expect(index_box).not_to_have_value(str(first_generated), timeout=20_000)
    assert 0 < int(index_box.input_value()) < first_generated
    playwright_api.expect(page.locator("#chat-token-heatmap img")).not_to_have_attribute(
        "src", heatmap_before, timeout=20_000
    )
    wait_until_idle(page)
    screenshot(page, "chat")


def test_compare_tab_puts_both_runs_side_by_side(page):
    first, second = page.run_names
    page.get_by_role("tab", name="Compare").click()
    page.wait_for_timeout(1000)  # the tab's select event refreshes the run list
    choose(page, "compare-runs", first)
    choose(page, "compare-runs", second)
    page.click("#compare-button")
    playwright_api.expect(page.locator("#compare-curves img")).to_be_visible(timeout=30_000)
    table = page.locator("#compare-table")
    playwright_api.expect(table).to_contain_text("moelora", timeout=20_000)
    playwright_api.expect(table).to_contain_text("loracoe")
    wait_until_idle(page)
    screenshot(page, "compare")

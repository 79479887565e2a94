"""`minisd explain`: the traced run is txt2img's and img2img's run byte for byte, every panel names a real line of
minisd, and the page works in a real browser (headless Chromium driven by selenium: type a prompt, run, read back
the step images, move the step slider, take a screenshot).

The browser test needs Debian's chromium and chromium-driver (`apt-get install chromium chromium-driver`, as .ci/run
does) and the web extra (`pip install -e ".[web]"`: gradio, selenium). It skips, saying why, only when no Chromium
binary is installed. MINISD_SCREENSHOT=path.png keeps its screenshot, shrunk (README's picture is made so).
"""

import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from minisd.api import default_model
from minisd.clip import TextEncoder
from minisd.errors import MinisdError
from minisd.explain import PANELS, ROOT, Explainer, title, where
from minisd.loading import load_components
from minisd.pipelines import img2img, txt2img
from minisd.pipelines.trace import trace
from minisd.tokenizer import Tokenizer
from minisd.train import shapes
from minisd.train.checker import check
from minisd.unet import UNet
from minisd.vae import VAE
from tests import fakes

PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module")
def nano():
    return load_components(default_model(), dtype=torch.float32)


@pytest.mark.parametrize("sampler", ["DDIM", "Euler a", "DPM++ 2M", "Heun"])
def test_trace_is_the_txt2img_run(nano, sampler):
    kw = {"num_inference_steps": 6, "guidance_scale": 3.0, "seed": 5, "sampler": sampler}
    run = trace(nano, PROMPT, **kw)
    ref = txt2img(nano, PROMPT, output_type="latent", **kw)
    assert torch.equal(run.final_latents, ref)  # the same loop, the same arithmetic: equal, not close
    assert len(run.steps) == len(run.scheduled) and run.start == 0
    step = run.steps[-1]
    torch.testing.assert_close(
        step.noise_pred, step.noise_pred_uncond + 3.0 * (step.noise_pred_text - step.noise_pred_uncond)
    )


def test_trace_is_the_img2img_run_and_knows_where_strength_starts(nano):
    image = shapes.to_image(shapes.render("a green square", 0))[None]
    kw = {"num_inference_steps": 10, "guidance_scale": 3.0, "seed": 2, "sampler": "DDIM", "strength": 0.6}
    run = trace(nano, "a red circle", image=image, **kw)
    ref = img2img(nano, "a red circle", image=image, output_type="latent", **kw)
    assert torch.equal(run.final_latents, ref)
    assert run.start == 4 and len(run.steps) == 6 and [s.t for s in run.steps] == run.scheduled[4:]


def test_trace_refuses_bad_input_in_one_line(nano):
    with pytest.raises(MinisdError, match="strength"):
        trace(nano, PROMPT, image=torch.zeros(1, 3, 64, 64), strength=0.01, num_inference_steps=10)
    with pytest.raises(MinisdError, match="prompt must be one str"):
        trace(nano, [PROMPT, PROMPT])


def test_every_panel_names_a_real_line():
    for elem_id, (_, places) in PANELS.items():
        for function, text in places:
            path_line = where(function, text).split()[0]
            path, line = path_line.rsplit(":", 1)
            source = (ROOT / path).read_text().splitlines()[int(line) - 1]
            assert (text or "def ") in source, (elem_id, path_line, source)


def test_explainer_draws_every_panel_of_every_step(nano):
    explainer = Explainer(nano, "nano")
    run = explainer.start(PROMPT, "", 0, "DPM++ 2M", 5, 3.0, None, 0.6)
    for i in range(len(run.steps)):
        panels = explainer.panels(i)
        assert set(panels) == set(PANELS)
        labels = [label for _, label in panels["panel-attention"]]
        assert labels[0].startswith("1: a") and labels[2].startswith("3: circle") and "<pad>" in labels[-1]
    final = panels["panel-final"]
    assert final.size == (256, 256) and len(set(final.getdata())) > 10  # a picture, not a blank


def test_explainer_runs_other_sd_v1_shaped_models_with_sd_colours_and_without_guidance():
    state = fakes.tiny_components(seed=3)
    nets = {
        "unet": UNet(fakes.TINY_UNET),
        "vae": VAE(fakes.TINY_VAE),
        "text_encoder": TextEncoder(fakes.TINY_TEXT_ENCODER),
    }
    for name, net in nets.items():
        net.load_state_dict(state[name], strict=True)
    components = SimpleNamespace(tokenizer=Tokenizer.from_default(), sample_size=32, guidance_scale=7.5, **nets)
    explainer = Explainer(components, "tiny")
    assert explainer.rgb_map == (None, None)  # not the nano size: SD v1's published latent colours
    run = explainer.start("a watercolour fox", "", 1, "Euler a", 3, 1.0, None, 0.6)  # w = 1: no guidance
    assert run.steps[0].noise_pred_uncond is None
    panels = explainer.panels(2)
    assert panels["panel-x0"].size == (256, 256) and len(panels["panel-attention"]) == 5  # 3 words, end, pad


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch_png(url: str) -> Image.Image:
    with urllib.request.urlopen(url, timeout=30) as response:  # the page's own server on 127.0.0.1
        return Image.open(io.BytesIO(response.read())).convert("RGB")


def test_page_in_headless_chromium(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if (chromium is None or driver_path is None) and os.environ.get("MINISD_REQUIRE_BROWSER"):
        pytest.fail("MINISD_REQUIRE_BROWSER is set (.ci/run) but chromium / chromedriver are not installed")
    if chromium is None or driver_path is None:
        pytest.skip("no Chromium installed: apt-get install chromium chromium-driver (Debian), as .ci/run does")
    port = free_port()
    # PYTHONPATH: the server imports this checkout's minisd, whatever is installed
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(
        [sys.executable, "-m", "minisd", "explain", "--no-browser", "--port", str(port)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,1900",
        f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}",
    ):  # fmt: skip
        options.add_argument(flag)
    browser = None
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 120
        while True:  # the server loads torch, the model and gradio first
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"minisd explain did not start: {server.communicate()[0][-2000:]}")
                time.sleep(1)
        browser = webdriver.Chrome(service=Service(driver_path), options=options)
        browser.get(url)
        wait = WebDriverWait(browser, 120)
        prompt = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#prompt textarea"))
        prompt.clear()
        prompt.send_keys("a green triangle to the left of a yellow square")  # the caption checked below
        browser.find_element(By.CSS_SELECTOR, "#run").click()

        def sources() -> dict[str, list[str]]:
            found = {k: browser.find_elements(By.CSS_SELECTOR, f"#{k} img") for k in PANELS}
            return {k: [img.get_attribute("src") for img in imgs] for k, imgs in found.items()}

        wait.until(lambda b: all(sources().values()))
        last = sources()
        assert "model call 25 of 25" in browser.find_element(By.CSS_SELECTOR, "#info").text
        assert len(last["panel-attention"]) == 12  # 10 words, <end>, the padding
        final = fetch_png(last["panel-final"][0])
        x0_last = fetch_png(last["panel-x0"][0])
        assert final.size == (256, 256)
        # The last step's x̂₀ is nearly the final picture (one small step remains); the colours the caption asks for.
        diff = torch.tensor(list(final.tobytes())).float() - torch.tensor(list(x0_last.tobytes())).float()
        assert diff.abs().mean() < 20, diff.abs().mean()
        caption = "a green triangle to the left of a yellow square"
        assert check(final.resize((64, 64), Image.Resampling.NEAREST), caption)

        step = browser.find_element(By.CSS_SELECTOR, "#step input[type=number]")  # the slider's number box
        step.send_keys(Keys.CONTROL, "a")
        step.send_keys("2", Keys.ENTER)
        wait.until(lambda b: sources()["panel-x0"] != last["panel-x0"])
        assert "model call 3 of 25" in browser.find_element(By.CSS_SELECTOR, "#info").text
        early = fetch_png(sources()["panel-x0"][0])
        assert early.size == (256, 256) and early.tobytes() != x0_last.tobytes()  # step 3's guess, not the last
        for elem_id in PANELS:  # each panel's title on the page names the functions, files and lines
            assert title(elem_id) in browser.find_element(By.ID, elem_id).text, elem_id
        screenshot = tmp_path / "explain.png"
        assert browser.save_screenshot(str(screenshot)) and Image.open(screenshot).size[0] >= 1000
        if os.environ.get("MINISD_SCREENSHOT"):  # README's picture: 1000 px wide, 256 colours
            shot = Image.open(screenshot).convert("RGB")
            shot = shot.resize((1000, round(shot.height * 1000 / shot.width)), Image.Resampling.LANCZOS)
            shot = shot.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
            shot.save(os.environ["MINISD_SCREENSHOT"], optimize=True)
    finally:
        if browser is not None:
            browser.quit()
        server.terminate()
        server.wait(timeout=30)


def test_explain_without_gradio_says_how_to_install_it(monkeypatch, capsys):
    from minisd.cli import main

    monkeypatch.setitem(sys.modules, "gradio", None)  # what `import gradio` meets where the extra is missing
    assert main(["explain", "--no-browser"]) == 2
    assert capsys.readouterr().err.strip() == 'minisd: error: minisd explain needs gradio: pip install -e ".[web]"'

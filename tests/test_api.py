"""minisd.StableDiffusion on tiny random weights: the three calls, the seed rule, the recorded parameters (no path of
this machine in them), what the pipeline functions offer (prompt lists, latents, embeddings, guidance rescale, VAE
tiling, output types), and a diffusers folder's scheduler_config.json."""

import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import minisd
from minisd.api import default_model
from minisd.errors import MinisdError
from minisd.fast import fast_dtype
from minisd.hashes import pixels_hash, short_hash
from minisd.parameters import GenerationParameters
from minisd.pipelines import txt2img
from tests.fakes import tiny_official_state_dict
from weights_convert.__main__ import main as weights_convert

SMALL = {"height": 64, "width": 64, "num_inference_steps": 2}
REPO_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("api")
    save_file(tiny_official_state_dict("emaonly"), work / "tiny.safetensors", metadata={"format": "pt"})
    assert weights_convert(["convert", str(work / "tiny.safetensors"), str(work / "folder")]) == 0
    gradient = Image.linear_gradient("L").resize((64, 64))
    Image.merge("RGB", (gradient, gradient.rotate(90), gradient.rotate(180))).save(work / "in.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    mask.save(work / "mask.png")
    return work


@pytest.fixture(scope="module")
def pipe(work):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead on a shared 2-core machine
    yield minisd.StableDiffusion.from_pretrained(work / "tiny.safetensors")
    torch.set_num_threads(threads)


def same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and a.tobytes() == b.tobytes()


def test_txt2img_seed_rule_and_parameters(pipe, work):
    out = pipe("a cat", negative_prompt="a dog", sampler="Euler a", seed=5, num_images_per_prompt=2, **SMALL)
    assert len(out.images) == 2 and out.seeds == [5, 6] and out.images[0].size == (64, 64)
    alone = pipe("a cat", negative_prompt="a dog", sampler="euler_a", seed=6, **SMALL)  # image 1 is seed 6 alone
    assert same(alone.images[0], out.images[1])
    params = out.parameters[1]
    assert (params.mode, params.sampler, params.seed, params.dtype, params.device) == (
        "txt2img", "Euler a", 6, "float32", "cpu",
    )  # fmt: skip
    assert params.model_name == "tiny" and params.model_hash == short_hash((work / "tiny.safetensors").read_bytes())
    assert params.threads == torch.get_num_threads() == 1 and str(work) not in params.text()
    assert GenerationParameters.from_text(params.text()) == params
    assert same(pipe.generate(params), out.images[1])


def test_img2img_and_inpaint_record_their_sources(pipe, work):
    """Source images are recorded by their pixels' hash, never by path, and given again to generate()."""
    out = pipe.img2img("a cat", work / "in.png", strength=0.5, seed=1, num_inference_steps=4)
    params = out.parameters[0]
    assert (params.mode, params.strength) == ("img2img", 0.5) and str(work) not in params.text()
    with Image.open(work / "in.png") as pil:
        assert params.image_hash == pixels_hash(pil)
        from_pil = pipe.img2img("a cat", pil, strength=0.5, seed=1, num_inference_steps=4)
        assert same(pipe.generate(params, image=pil), out.images[0])
    assert same(from_pil.images[0], out.images[0])  # a path or the PIL image: the same run, the same record
    assert from_pil.parameters[0] == params
    with pytest.raises(MinisdError, match="give it again"):
        pipe.generate(params)
    assert GenerationParameters.from_text(params.text()) == params
    assert same(pipe.generate(params, image=work / "in.png"), out.images[0])

    painted = pipe.inpaint("a hat", work / "in.png", work / "mask.png", seed=2, num_inference_steps=2)
    params = painted.parameters[0]
    assert params.mode == "inpaint" and params.mask_hash is not None
    assert GenerationParameters.from_text(params.text()) == params
    assert same(pipe.generate(params, work / "in.png", work / "mask.png"), painted.images[0])


def test_changed_source_image_is_refused(pipe, work):
    params = pipe.img2img("a cat", work / "in.png", strength=0.5, seed=1, num_inference_steps=2).parameters[0]
    with pytest.raises(MinisdError, match="not the one recorded"):
        pipe.generate(params, image=Image.new("RGB", (64, 64), (9, 9, 9)))


def test_schedules_spacing_and_eta_are_recorded(pipe):
    """The schedule type, a spacing other than the sampler's default and an η other than its default are written in
    A1111's keys (Schedule type, Eta, Eta DDIM) or minisd's (Timestep spacing), and make the same image again."""
    for kwargs, written in (
        ({"sampler": "DPM++ 2M Karras"}, "Sampler: DPM++ 2M, Schedule type: Karras,"),
        ({"sampler": "Euler a", "schedule_type": "Exponential", "eta": 0.5}, "Eta: 0.5"),
        ({"sampler": "Euler", "timestep_spacing": "leading"}, "Timestep spacing: leading"),
        ({"sampler": "DDIM", "eta": 0.3}, "Eta DDIM: 0.3"),
        ({"sampler": "Heun", "schedule_type": "Automatic"}, "Schedule type: Uniform"),
        ({"sampler": "DPM++ 2M SDE", "schedule_type": "Automatic"}, "Schedule type: Exponential"),
    ):
        out = pipe("a cat", seed=4, **SMALL, **kwargs)
        params = out.parameters[0]
        assert written in params.text(), params.text()
        assert GenerationParameters.from_text(params.text()) == params
        assert same(pipe.generate(params), out.images[0])
    plms = pipe("a cat", seed=4, **SMALL).parameters[0].text()
    assert "Schedule type" not in plms and "Timestep spacing" not in plms and "Eta" not in plms


def test_what_the_pipelines_offer(pipe):
    """A list of prompts (seed + k over all images), guidance rescale and VAE tiling (recorded), output types, and
    the unrecorded runs from the caller's latents or embeddings, equal to the pipeline function's."""
    out = pipe(["a cat", "a dog"], negative_prompt="blurry", seed=3, num_images_per_prompt=2, **SMALL)
    assert out.seeds == [3, 4, 5, 6] and [p.prompt for p in out.parameters] == ["a cat", "a cat", "a dog", "a dog"]
    assert same(pipe("a dog", negative_prompt="blurry", seed=5, **SMALL).images[0], out.images[2])
    rescaled = pipe("a cat", seed=3, guidance_rescale=0.7, vae_tiling=True, **SMALL)
    params = rescaled.parameters[0]
    assert "Guidance rescale: 0.7" in params.text() and "VAE tiling: True" in params.text()
    assert GenerationParameters.from_text(params.text()) == params and same(pipe.generate(params), rescaled.images[0])
    arrays = pipe(["a cat", "a dog"], seed=3, output_type="np", **SMALL).images
    assert arrays.shape == (2, 64, 64, 3) and arrays.dtype.name == "float32"
    latents = pipe("a cat", seed=3, output_type="latent", **SMALL).images
    assert latents.shape[0] == 1 and latents.ndim == 4

    start = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    embeds = torch.randn(1, 77, pipe.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(1))
    mine = pipe(None, latents=start, prompt_embeds=embeds, seed=2, sampler="Euler a", **SMALL)
    assert mine.parameters == []
    want = txt2img(pipe.components, prompt_embeds=embeds, latents=start, seed=2, sampler="Euler a", **SMALL)
    assert same(mine.images[0], want[0])


def test_folder_scheduler_config(work, tmp_path):
    """A diffusers folder's scheduler_config.json: its scheduler is the default sampler, its timestep_spacing and
    Karras σ pass on to any sampler (diffusers' from_config); what minisd cannot follow is refused in one line."""
    folder = tmp_path / "folder"
    shutil.copytree(work / "folder", folder)
    config_path = folder / "scheduler" / "scheduler_config.json"
    base = json.loads(config_path.read_text())
    config = {**base, "_class_name": "EulerDiscreteScheduler", "timestep_spacing": "trailing"}
    config_path.write_text(json.dumps(config))
    pipe = minisd.StableDiffusion.from_pretrained(folder)
    params = pipe("a cat", seed=1, **SMALL).parameters[0]
    assert (params.sampler, params.timestep_spacing, params.schedule_type) == ("Euler", "trailing", "Uniform")
    assert pipe("a cat", seed=1, sampler="DDIM", **SMALL).parameters[0].timestep_spacing == "trailing"
    dpm = {**base, "_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}
    config_path.write_text(json.dumps({**dpm, "timestep_spacing": "leading"}))  # as diffusers saves it from PNDM's
    params = minisd.StableDiffusion.from_pretrained(folder)("a cat", seed=1, **SMALL).parameters[0]
    assert (params.sampler, params.schedule_type, params.timestep_spacing) == ("DPM++ 2M", "Karras", "leading")
    euler = {**base, "_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True, "timestep_spacing": "leading"}
    config_path.write_text(json.dumps(euler))
    params = minisd.StableDiffusion.from_pretrained(folder)("a cat", seed=1, **SMALL).parameters[0]
    assert (params.sampler, params.schedule_type, params.timestep_spacing) == ("Euler", "Karras", "leading")
    config_path.write_text(json.dumps({**base, "_class_name": "UniPCMultistepScheduler"}))
    with pytest.raises(MinisdError, match="name a sampler"):
        minisd.StableDiffusion.from_pretrained(folder)("a cat", **SMALL)
    for key, value in (("prediction_type", "sample"), ("rescale_betas_zero_snr", True), ("beta_end", 0.02)):
        config_path.write_text(json.dumps({**base, key: value}))  # zero SNR of an ε-model: refused
        with pytest.raises(MinisdError, match=key) as info:
            minisd.StableDiffusion.from_pretrained(folder)
        assert "\n" not in str(info.value)
    # a v-prediction model with zero terminal SNR and trailing DDIM (what such folders ship): all three followed
    zero_snr = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    config_path.write_text(json.dumps({**base, "_class_name": "DDIMScheduler", **zero_snr}))
    pipe = minisd.StableDiffusion.from_pretrained(folder)
    params = pipe("a cat", seed=1, **SMALL).parameters[0]
    assert (params.sampler, params.timestep_spacing) == ("DDIM", "trailing")
    assert (params.prediction_type, params.rescale_betas_zero_snr) == ("v_prediction", True)
    assert "Prediction type: v_prediction" in params.text() and "Zero terminal SNR: True" in params.text()
    with pytest.raises(MinisdError, match="the PLMS sampler cannot start from pure noise"):
        pipe("a cat", sampler="PLMS", **SMALL)


def test_folder_and_hub_id(work, tmp_path, monkeypatch):
    folder = minisd.StableDiffusion.from_pretrained(work / "folder")
    assert folder.model_name == "folder" and folder.model_hash is None
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / ("models--" + REPO_ID.replace("/", "--"))
    shutil.copytree(work / "folder", repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    hub = minisd.StableDiffusion.from_pretrained(REPO_ID, local_files_only=True)
    assert hub.model_name == REPO_ID and hub.model_hash is None
    a = hub("a cat", seed=3, **SMALL)
    b = folder("a cat", seed=3, **SMALL)
    assert same(a.images[0], b.images[0])
    assert "Model: stable-diffusion-v1-5/stable-diffusion-v1-5" in a.parameters[0].text()


def test_bad_calls(pipe, work):
    for call, match in (
        (lambda: pipe(3, **SMALL), "prompt must be a str or a non-empty list"),
        (lambda: pipe(["a", "b"], negative_prompt=["c"], **SMALL), "one entry per prompt"),
        (lambda: pipe("a", sampler="Euler b", **SMALL), "unknown sampler"),
        (lambda: pipe("a", num_images_per_prompt=0, **SMALL), "num_images_per_prompt"),
        (lambda: pipe("a", seed=-1, **SMALL), "seed"),
        (lambda: pipe.img2img("a", work / "missing.png"), "no such file"),
        (lambda: pipe.img2img("a", 3), "image must be a PIL image"),
        (lambda: pipe.inpaint("a", work / "in.png", Image.new("L", (32, 32))), "mask_image must be the image's size"),
        (lambda: GenerationParameters.from_text("just a prompt"), "parameters lack"),
    ):
        with pytest.raises(MinisdError, match=match):
            call()


def test_progress_bar_is_shown_and_can_be_hidden(pipe, capsys):
    """As diffusers' pipelines: a tqdm bar of the steps on stderr (not of the model calls: Heun's 2 steps are 3 calls,
    PLMS's 3 steps 4), hidden by set_progress_bar_config."""
    pipe("a cat", seed=1, sampler="Heun", **SMALL)
    assert "2/2" in capsys.readouterr().err
    pipe("a cat", seed=1, sampler="PLMS", **{**SMALL, "num_inference_steps": 3})
    err = capsys.readouterr().err
    assert "3/3" in err and "4/4" not in err
    pipe.set_progress_bar_config(disable=True)
    try:
        pipe("a cat", seed=1, **SMALL)
        assert capsys.readouterr().err == ""
        with pytest.raises(MinisdError, match="disable must be a bool"):
            pipe.set_progress_bar_config(disable="yes")
    finally:
        pipe.set_progress_bar_config(disable=False)


def test_default_model_hook():
    model = default_model()
    assert model is None or model.is_file()  # None until the nano model ships in minisd/data/


def test_fast_is_the_same_image_and_is_recorded(pipe, work):
    """fast=True (minisd.fast.make_fast on all three networks) in float32 changes only float rounding: the pixels
    agree to one 8-bit level; the parameters say so, and generate() from them runs fast again. Without a dtype, fast
    computes in minisd.fast.fast_dtype (bfloat16 on CPUs that have it), and the PNG records that dtype."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fast = minisd.StableDiffusion.from_pretrained(work / "tiny.safetensors", dtype=torch.float32, fast=True)
        out = fast("a cat", sampler="DDIM", seed=3, **SMALL)
        eager = pipe("a cat", sampler="DDIM", seed=3, **SMALL)
    finally:
        torch.set_num_threads(threads)
    a = torch.tensor(list(out.images[0].getdata()), dtype=torch.int16)
    b = torch.tensor(list(eager.images[0].getdata()), dtype=torch.int16)
    assert (a - b).abs().max() <= 1
    params = out.parameters[0]
    assert params.fast and "Fast: True" in params.text() and "Fast" not in eager.parameters[0].text()
    assert GenerationParameters.from_text(params.text()) == params
    chosen = minisd.StableDiffusion.from_pretrained(work / "tiny.safetensors", fast=True)
    assert chosen.dtype == fast_dtype("cpu") and chosen.vae.decoder.conv_in.weight.dtype == fast_dtype("cpu")
    recorded = chosen("a cat", sampler="DDIM", seed=3, **SMALL).parameters[0]
    assert recorded.fast and recorded.dtype == str(fast_dtype("cpu")).removeprefix("torch.")
    with pytest.raises(MinisdError, match="fast must be True or False"):
        minisd.StableDiffusion.from_pretrained(work / "tiny.safetensors", fast="yes")

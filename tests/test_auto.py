"""The Hugging Face course page's three examples ("Introduction to Stable Diffusion", shared/seeds), run as written
with only their import lines changed (diffusers -> minisd), against hub ids served from a Hugging Face cache laid
out by hand (tiny random weights under the real repo names), and the image URLs served from memory. Then the
AutoPipelines equal the pipelines they stand for, and pick the family from what they load."""

import io
import urllib.request

import pytest
import torch
from PIL import Image

from minisd.auto import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image
from minisd.errors import MinisdError
from minisd.kandinsky.loading import load_kandinsky
from minisd.kandinsky.pipelines.img2img import img2img
from tests.fakes import tiny_components
from tests.kandinsky_reference import (
    DECODER_ID,
    INPAINT_ID,
    MOVQ,
    PRIOR_ID,
    save_tiny_repos,
    tiny_reference,
    write_hub_cache,
)
from tests.reference import write_reference_tokenizer_folder
from tests.test_loading import write_diffusers_folder

SD_ID = "runwayml/stable-diffusion-v1-5"
# MoVQ's published structure (plain levels, then one that attends) with tiny widths and six levels instead of four,
# so the examples' default 512 × 512 and 100 steps run on 16 × 16 latents (Kandinsky's own 64 × 64 would take
# minutes on a shared CPU: this test is about the code running as written, the numbers are tested elsewhere).
MOVQ_SMALL = {**MOVQ, "block_out_channels": [32] * 4 + [64] * 2, "layers_per_block": 1, "norm_num_groups": 8,
              "num_vq_embeddings": 24, "down_block_types": ["DownEncoderBlock2D"] * 5 + ["AttnDownEncoderBlock2D"],
              "up_block_types": ["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 5}  # fmt: skip

# The course page's code, verbatim but for the import lines (and, for the first, "cuda" on machines without one).
TEXT2IMAGE = """
from minisd import AutoPipelineForText2Image
import torch

pipeline = AutoPipelineForText2Image.from_pretrained(
    "runwayml/stable-diffusion-v1-5", torch_dtype=torch.float16, variant="fp16"
).to("cuda")
generator = torch.Generator(device="cuda").manual_seed(31)
image = pipeline(
    "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k",
    generator=generator,
).images[0]
"""
IMAGE2IMAGE = """
import torch
from minisd import AutoPipelineForImage2Image
from minisd.images import load_image, make_image_grid

pipeline = AutoPipelineForImage2Image.from_pretrained(
    "kandinsky-community/kandinsky-2-2-decoder",
    torch_dtype=torch.float16,
    use_safetensors=True,
)
pipeline.enable_model_cpu_offload()
# remove following line if xFormers is not installed or you have PyTorch 2.0 or higher installed
pipeline.enable_xformers_memory_efficient_attention()

# Load an image to pass to the pipeline:
init_image = load_image(
    "https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/diffusers/cat.png"
)

# Pass a prompt and image to the pipeline to generate an image:
prompt = "cat wizard, gandalf, lord of the rings, detailed, fantasy, cute, adorable, Pixar, Disney, 8k"
image = pipeline(prompt, image=init_image).images[0]
make_image_grid([init_image, image], rows=1, cols=2)
"""
INPAINTING = """
# Load the pipeline
import torch
from minisd import AutoPipelineForInpainting
from minisd.images import load_image, make_image_grid

pipeline = AutoPipelineForInpainting.from_pretrained(
    "kandinsky-community/kandinsky-2-2-decoder-inpaint", torch_dtype=torch.float16
)
pipeline.enable_model_cpu_offload()
# remove following line if xFormers is not installed or you have PyTorch 2.0 or higher installed
pipeline.enable_xformers_memory_efficient_attention()

# Load the base and mask images:
init_image = load_image(
    "https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/diffusers/inpaint.png"
)
mask_image = load_image(
    "https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/diffusers/inpaint_mask.png"
)

# Create a prompt to inpaint the image with and pass it to the pipeline with the base and mask images:
prompt = (
    "a black cat with glowing eyes, cute, adorable, disney, pixar, highly detailed, 8k"
)
negative_prompt = "bad anatomy, deformed, ugly, disfigured"
image = pipeline(
    prompt=prompt,
    negative_prompt=negative_prompt,
    image=init_image,
    mask_image=mask_image,
).images[0]
make_image_grid([init_image, mask_image, image], rows=1, cols=3)
"""


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A Hugging Face cache holding the four repos the examples name (tiny random weights), and the pictures."""
    root = tmp_path_factory.mktemp("auto")
    ref = tiny_reference(write_reference_tokenizer_folder(root / "tokenizer"), movq=MOVQ_SMALL)
    save_tiny_repos(root / "kandinsky", ref)
    cache = root / "hf_home" / "hub"
    for repo_id, folder in ((PRIOR_ID, "prior"), (DECODER_ID, "decoder"), (INPAINT_ID, "decoder-inpaint")):
        write_hub_cache(cache, repo_id, root / "kandinsky" / folder)
    write_hub_cache(cache, SD_ID, write_diffusers_folder(root / "sd", tiny_components(), variant="fp16"))
    cat = Image.effect_mandelbrot((768, 512), (-2, -1.2, 1, 1.2), 40).convert("RGB")  # not 512 × 512: resized
    mask = Image.new("RGB", (768, 512))
    mask.paste((255, 255, 255), (300, 100, 500, 300))
    urls = {"cat.png": png_bytes(cat), "inpaint.png": png_bytes(cat), "inpaint_mask.png": png_bytes(mask)}
    return root, urls


@pytest.fixture
def offline(hub, monkeypatch):
    root, urls = hub
    monkeypatch.setenv("HF_HOME", str(root / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def urlopen(url, timeout=None):
        return io.BytesIO(urls[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return root


def run_example(code: str) -> dict:
    namespace: dict = {}
    exec(compile(code, "<course example>", "exec"), namespace)  # the page's code, as a learner would paste it
    return namespace


def test_the_course_text_to_image_example_runs(offline):
    code = TEXT2IMAGE if torch.cuda.is_available() else TEXT2IMAGE.replace('"cuda"', '"cpu"')
    image = run_example(code)["image"]
    assert isinstance(image, Image.Image) and image.mode == "RGB"


def test_the_course_image_to_image_example_runs(offline):
    namespace = run_example(IMAGE2IMAGE)
    assert namespace["image"].size == (512, 512)  # Kandinsky's default size, whatever the input's
    assert isinstance(namespace["pipeline"], AutoPipelineForImage2Image) and namespace["pipeline"].kandinsky


def test_the_course_inpainting_example_runs(offline):
    namespace = run_example(INPAINTING)
    assert namespace["image"].size == (512, 512)
    assert namespace["pipeline"].components.inpainting


def test_auto_image2image_equals_the_pipeline(offline):
    """The AutoPipeline adds nothing of its own: two stages (prior, decoder) give the one-call pipeline's image."""
    root = offline
    pipe = AutoPipelineForImage2Image.from_pretrained(DECODER_ID)
    image = Image.effect_mandelbrot((100, 70), (-2, -1.2, 1, 1.2), 40).convert("RGB")
    kwargs = {"strength": 0.5, "num_inference_steps": 4, "prior_num_inference_steps": 3, "height": 128, "width": 256}
    got = pipe("a cat", image=image, generator=torch.Generator().manual_seed(5), output_type="np", **kwargs).images
    components = load_kandinsky(root / "kandinsky" / "decoder", prior=root / "kandinsky" / "prior")
    want = img2img(components, "a cat", image=image, seed=5, output_type="np", **kwargs)
    assert (got == want).all()


def test_auto_pipelines_refuse_the_wrong_decoder_in_one_line(offline):
    for call, fragment in (
        (lambda: AutoPipelineForInpainting.from_pretrained(DECODER_ID), "needs -decoder-inpaint"),
        (lambda: AutoPipelineForText2Image.from_pretrained(INPAINT_ID), "needs -decoder"),
        (lambda: AutoPipelineForText2Image.from_pretrained(SD_ID, variant="fp16").to("cuda:7"), "cuda"),
    ):
        if fragment == "cuda" and torch.cuda.is_available():
            continue
        with pytest.raises(MinisdError) as info:
            call()
        assert fragment in str(info.value) and "\n" not in str(info.value)

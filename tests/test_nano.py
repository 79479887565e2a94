"""The shipped nano model (minisd/data/nano.safetensors, trained by `python -m minisd.train all`): inside its budget,
the default when no weights are named, and it draws what held-out captions say.

The numbers the closing note quotes come from `python -m minisd.train evaluate` (4 seeds a caption); this test
draws 2 seeds a caption so it stays short, with bars under the measured rates so the float rounding of another CPU
cannot flip them.
"""

import json

import pytest
import safetensors
import torch

from minisd.api import NANO_MODEL, StableDiffusion, default_model
from minisd.hashes import file_hash
from minisd.loading import load_components
from minisd.train import evaluate, shapes

MAX_BYTES = 25 * 10**6  # the budget: <= 25 MB in the package


@pytest.fixture(scope="module")
def nano():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 8×8 latents: one thread is fastest on the shared 2-core machine
    yield load_components(NANO_MODEL, dtype=torch.float32)
    torch.set_num_threads(threads)


def test_the_file_is_shipped_small_and_self_describing():
    assert default_model() == NANO_MODEL and NANO_MODEL.is_file()
    assert NANO_MODEL.stat().st_size <= MAX_BYTES
    with safetensors.safe_open(str(NANO_MODEL), framework="pt") as file:
        metadata = file.metadata()
        dtypes = {file.get_slice(name).get_dtype() for name in file.keys()}
    assert dtypes == {"F16"}
    assert set(json.loads(metadata["minisd.config"])) == {"unet", "vae", "text_encoder"}
    assert metadata["minisd.sample_size"] == str(shapes.SIZE)


def test_no_weights_named_means_the_nano_model(nano):
    pipe = StableDiffusion.from_pretrained(default_model())
    out = pipe("a red circle above a blue square", num_inference_steps=10, seed=0)
    assert out.images[0].size == (shapes.SIZE, shapes.SIZE) and pipe.dtype == torch.float32
    assert out.parameters[0].model_name == "nano" and out.parameters[0].model_hash == file_hash(NANO_MODEL)


def test_held_out_captions_are_drawn(nano):
    """Captions never seen in training (28 scenes, 56 captions), 2 seeds each, judged by train/checker.py, at the
    model's own guidance scale: the issue's bar, 90% (measured with 4 seeds: 99.1%). The order of the two objects
    has its own bar: a model that ignores it draws the mirror image of half the pairs (the earlier recipe: 40%)."""
    result = evaluate.adherence(nano, shapes.heldout_captions(), seeds=2, guidance_scale=nano.guidance_scale)
    assert result.rate >= 0.9, result
    assert result.failures.get("relation", 0) <= 0.05 * result.total, result


def test_held_out_scenes_in_every_phrasing(nano):
    """The held-out scenes said every other way the grammar allows (evaluate.phrasing_families: "the … the", a full
    stop, "over", "beneath", "left of", "on the right of", ...), 1 seed a caption: over all of them the issue's bar
    for each family, 90%, and no family under 80% (with ~30–60 pictures a family, 1 seed is noisy; README's table
    has each family with 4 seeds)."""
    families = evaluate.phrasing_families()
    del families["documented"]  # test_held_out_captions_are_drawn
    results = {
        family: evaluate.adherence(nano, captions, seeds=1, guidance_scale=nano.guidance_scale)
        for family, captions in families.items()
    }
    accepted, total = sum(r.accepted for r in results.values()), sum(r.total for r in results.values())
    assert accepted >= 0.9 * total, results
    assert all(r.rate >= 0.8 for r in results.values()), results


def test_vae_reconstructs_held_out_pictures(nano):
    assert evaluate.vae_psnr(nano, num_pictures=128) >= 30.0

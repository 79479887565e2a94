"""Loading Kandinsky 2.2 strictly: folders written by diffusers' own save_pretrained (tiny random weights), the
same folders as hub ids in a Hugging Face cache laid out by hand (offline), the decoder's README naming its prior,
one-line refusals, and the published repos' exact key sets (tests/data/kandinsky22) against minisd's modules at
the published configs."""

import json
import shutil

import pytest
import torch

from minisd.errors import MinisdError
from minisd.kandinsky.loading import NETWORKS, is_kandinsky, load_kandinsky
from tests.kandinsky_reference import (
    DECODER_ID,
    DECODER_UNET,
    IMAGE_ENCODER,
    INPAINT_ID,
    INPAINT_UNET,
    KEY_SET_DIR,
    MOVQ,
    PRIOR,
    PRIOR_ID,
    REPOS,
    TEXT_ENCODER,
    reference_key_set,
    save_tiny_repos,
    tiny_reference,
    write_hub_cache,
)
from tests.reference import write_reference_tokenizer_folder
from weights_convert.configs import fields_from
from weights_convert.kandinsky import kandinsky_config, to_diffusers, to_minisd


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The three repos as diffusers' save_pretrained writes them, from tiny random models."""
    root = tmp_path_factory.mktemp("kandinsky")
    ref = tiny_reference(write_reference_tokenizer_folder(root / "tokenizer"))
    return save_tiny_repos(root, ref), ref


def assert_weights_equal(components, ref, unet):
    for name, module in (("unet", unet), ("movq", ref.movq), ("prior", ref.prior), ("text_encoder", ref.text_encoder),
                         ("image_encoder", ref.image_encoder)):  # fmt: skip
        want = to_minisd(name, module.state_dict())
        got = getattr(components, name).state_dict()
        assert got.keys() == want.keys(), name
        assert all(torch.equal(got[k], want[k]) for k in want), name


def test_folders_saved_by_diffusers_load_strictly(saved):
    root, ref = saved
    components = load_kandinsky(root / "decoder", prior=root / "prior")
    assert_weights_equal(components, ref, ref.unet)
    assert not components.inpainting and components.tokenizer is not None
    inpaint = load_kandinsky(root / "decoder-inpaint", prior=None)
    assert inpaint.inpainting and inpaint.prior is None
    assert torch.equal(inpaint.unet.conv_in.weight, ref.inpaint_unet.conv_in.weight)
    assert is_kandinsky(root / "decoder") and is_kandinsky(root / "prior") and not is_kandinsky(root / "tokenizer")


def test_dtype_and_fp16_variant(saved, tmp_path):
    root, ref = saved
    shutil.copytree(root / "decoder", tmp_path / "decoder")
    for component in ("unet", "movq"):  # an fp16 variant beside the full weights, as the Hub's repos have
        (tmp_path / "decoder" / component / "diffusion_pytorch_model.safetensors").rename(
            tmp_path / "decoder" / component / "diffusion_pytorch_model.fp16.safetensors"
        )
    assert_one_line(lambda: load_kandinsky(tmp_path / "decoder", prior=None), "no weights file diffusion_pytorch_model")
    half = load_kandinsky(tmp_path / "decoder", prior=None, variant="fp16", dtype=torch.float16)
    assert half.unet.conv_in.weight.dtype == torch.float16
    assert torch.equal(half.unet.conv_in.weight, ref.unet.conv_in.weight.half())


def test_hub_ids_load_offline_from_the_cache_with_the_prior_their_readme_names(saved, tmp_path, monkeypatch):
    root, ref = saved
    cache = tmp_path / "hf_home" / "hub"
    for repo_id, folder in ((PRIOR_ID, "prior"), (DECODER_ID, "decoder"), (INPAINT_ID, "decoder-inpaint")):
        write_hub_cache(cache, repo_id, root / folder)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    components = load_kandinsky(INPAINT_ID)  # prior "auto": the README's kandinsky-community/kandinsky-2-2-prior
    assert_weights_equal(components, ref, ref.inpaint_unet)
    assert components.sources == {"decoder": INPAINT_ID, "prior": PRIOR_ID}
    assert is_kandinsky(DECODER_ID) and not is_kandinsky("nobody/not-cached")


def assert_one_line(call, *fragments):
    with pytest.raises(MinisdError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and all(f in message for f in fragments), message


def edit_json(path, **changes):
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, **changes}))


def test_wrong_or_missing_parts_are_one_line(saved, tmp_path, monkeypatch):
    root, _ = saved
    assert_one_line(lambda: load_kandinsky(root / "prior"), "holds the Kandinsky 2.2 prior", "decoder was asked for")
    assert_one_line(lambda: load_kandinsky(root / "decoder", prior=root / "decoder"), "holds the Kandinsky 2.2 decoder")
    assert_one_line(lambda: load_kandinsky(tmp_path / "nothing.bin"), "a diffusers folder or a hub id")

    def copy(name):
        target = tmp_path / f"{name}-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(root / name, target)
        return target

    bad = copy("decoder")
    edit_json(bad / "model_index.json", _class_name="StableDiffusionPipeline")
    assert_one_line(lambda: load_kandinsky(bad, prior=None), "StableDiffusionPipeline", "not a Kandinsky 2.2 pipeline")
    bad = copy("decoder")
    edit_json(bad / "unet" / "config.json", encoder_hid_dim_type="text_image_proj")  # Kandinsky 2.1's decoder
    assert_one_line(lambda: load_kandinsky(bad, prior=None), "not a Kandinsky 2.2 config", "text_image_proj")
    bad = copy("decoder")
    edit_json(bad / "unet" / "config.json", layers_per_block=1)  # the config no longer fits the weights
    assert_one_line(lambda: load_kandinsky(bad, prior=None), "do not fit Kandinsky 2.2's unet", "unexpected")
    bad = copy("decoder")
    edit_json(bad / "scheduler" / "scheduler_config.json", beta_schedule="scaled_linear")
    assert_one_line(lambda: load_kandinsky(bad, prior=None), "beta_schedule 'scaled_linear'")
    bad = copy("decoder")
    (bad / "README.md").write_text("# no front matter\n")
    assert_one_line(lambda: load_kandinsky(bad), "README.md names no prior", "prior=None")
    bad = copy("prior")
    shutil.rmtree(bad / "image_encoder")
    assert_one_line(lambda: load_kandinsky(root / "decoder", prior=bad), "image_encoder/config.json: missing")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    assert_one_line(lambda: load_kandinsky(DECODER_ID, local_files_only=True), "is not in the Hugging Face cache")


PUBLISHED = {"prior": PRIOR, "text_encoder": TEXT_ENCODER, "image_encoder": IMAGE_ENCODER, "movq": MOVQ}


@pytest.mark.parametrize(("repo", "component"), [(r, c) for r, cs in REPOS.items() for c in cs])
def test_published_key_sets(repo, component):
    """The stored key set is what diffusers / transformers build at the published config, and minisd's module built
    from that config.json by the loader's own reader has exactly those names and shapes (in file naming)."""
    stored = json.loads((KEY_SET_DIR / f"{repo.removeprefix('kandinsky-2-2-')}.json").read_text())
    keys = stored["components"][component]["keys"]
    assert keys == reference_key_set(repo, component)
    config = {"unet": INPAINT_UNET if "inpaint" in repo else DECODER_UNET, **PUBLISHED}[component]
    module_class, config_class = NETWORKS[component]
    with torch.device("meta"):
        module = module_class(fields_from(config_class, kandinsky_config(component, config, repo)))
    ours = {name: list(t.shape) for name, t in to_diffusers(component, module.state_dict()).items()}
    assert ours == {name: shape for name, shape, _ in keys}

"""The references of the Kandinsky 2.2 parity tests: diffusers' and transformers' own models, built at a config and
given random weights (every tensor, norms and biases included, so a wrong bias or norm path cannot hide).

Configs: KANDINSKY22 holds the published ones (kandinsky-community/kandinsky-2-2-{prior,decoder,decoder-inpaint}
config.json files: unet, movq, prior, text_encoder, image_encoder, schedulers); TINY the same structures with small
numbers. `randomize` fills a module from one seeded generator with scales that keep activations near 1; full-size
models are built on the meta device first, then materialised once (no throwaway init of a billion parameters).
"""

import math
import types
from pathlib import Path

import torch
from diffusers import (
    DDPMScheduler,
    KandinskyV22InpaintPipeline,
    KandinskyV22Pipeline,
    KandinskyV22PriorPipeline,
    PriorTransformer,
    UnCLIPScheduler,
    UNet2DConditionModel,
    VQModel,
)
from torch import nn
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

POOL_SIZE = 2**24  # windows of up to 16.8 M values from a pool twice that size; larger tensors repeat the pool

# --- the published configs (read from the Hub's config.json files; see tests/data/kandinsky22/README.md) -------

DECODER_UNET = {
    "act_fn": "silu",
    "addition_embed_type": "image",
    "addition_embed_type_num_heads": 64,
    "attention_head_dim": 64,
    "block_out_channels": [384, 768, 1152, 1536],
    "center_input_sample": False,
    "class_embed_type": None,
    "cross_attention_dim": 768,
    "down_block_types": [
        "ResnetDownsampleBlock2D",
        "SimpleCrossAttnDownBlock2D",
        "SimpleCrossAttnDownBlock2D",
        "SimpleCrossAttnDownBlock2D",
    ],
    "downsample_padding": 1,
    "encoder_hid_dim": 1280,
    "encoder_hid_dim_type": "image_proj",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 3,
    "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 8,
    "resnet_time_scale_shift": "scale_shift",
    "sample_size": 64,
    "up_block_types": [
        "SimpleCrossAttnUpBlock2D",
        "SimpleCrossAttnUpBlock2D",
        "SimpleCrossAttnUpBlock2D",
        "ResnetUpsampleBlock2D",
    ],
}
INPAINT_UNET = {**DECODER_UNET, "in_channels": 9}
MOVQ = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 256, 512],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "norm_type": "spatial",
    "num_vq_embeddings": 16384,
    "out_channels": 3,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "up_block_types": ["AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
    "vq_embed_dim": 4,
}
PRIOR = {
    "added_emb_type": "prd",
    "additional_embeddings": 4,
    "attention_head_dim": 64,
    "clip_embed_dim": None,
    "dropout": 0.0,
    "embedding_dim": 1280,
    "embedding_proj_dim": None,
    "embedding_proj_norm_type": None,
    "encoder_hid_proj_type": "linear",
    "norm_in_type": None,
    "num_attention_heads": 32,
    "num_embeddings": 77,
    "num_layers": 20,
    "time_embed_act_fn": "silu",
    "time_embed_dim": None,
}
TEXT_ENCODER = {
    "architectures": ["CLIPTextModelWithProjection"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "pad_token_id": 1,
    "projection_dim": 1280,
    "vocab_size": 49408,
}
IMAGE_ENCODER = {
    "architectures": ["CLIPVisionModelWithProjection"],
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "hidden_act": "gelu",
    "hidden_size": 1664,
    "image_size": 224,
    "intermediate_size": 8192,
    "layer_norm_eps": 1e-05,
    "model_type": "clip_vision_model",
    "num_attention_heads": 16,
    "num_channels": 3,
    "num_hidden_layers": 48,
    "patch_size": 14,
    "projection_dim": 1280,
}
DECODER_SCHEDULER = {  # kandinsky-2-2-decoder(-inpaint)/scheduler/scheduler_config.json
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "thresholding": False,
}
PRIOR_SCHEDULER = {  # kandinsky-2-2-prior/scheduler/scheduler_config.json
    "_class_name": "UnCLIPScheduler",
    "clip_sample": True,
    "clip_sample_range": 10.0,
    "num_train_timesteps": 1000,
    "prediction_type": "sample",
    "variance_type": "fixed_small_log",
}
IMAGE_PROCESSOR = {  # kandinsky-2-2-prior/image_processor/preprocessor_config.json (OpenAI CLIP's preprocessing)
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 224,
}

# --- tiny configs: the same structures, small numbers ------------------------------------------------------------

TINY_UNET = {
    **DECODER_UNET,
    "block_out_channels": [32, 64, 96],
    "layers_per_block": 2,
    "attention_head_dim": 16,
    "cross_attention_dim": 48,
    "encoder_hid_dim": 40,
    "down_block_types": DECODER_UNET["down_block_types"][:3],
    "up_block_types": DECODER_UNET["up_block_types"][1:],
    "sample_size": 8,
}
TINY_MOVQ = {
    **MOVQ,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
    "up_block_types": ["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "num_vq_embeddings": 24,
}


def diffusers_config(config: dict) -> dict:
    """The constructor arguments of a config.json dict (without the `_`-keys the Hub files carry)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def randomize(module: nn.Module, seed: int) -> nn.Module:
    """Give every parameter a random value from one seeded generator, at scales that keep activations near 1:
    matrices U(±√3/√fan_in) (unit-variance outputs for unit inputs), norm weights 1 ± 0.2, biases ± 0.05,
    embeddings and learned tokens U(±1). Materialises a meta-device module on the CPU first."""
    if any(p.is_meta for p in module.parameters()):
        module.to_empty(device="cpu")
        for name, buffer in module.named_buffers():  # the only buffers these models have, made as their inits do
            if name.endswith("position_ids"):
                buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
            else:
                assert name == "causal_attention_mask", name  # diffusers PriorTransformer: −10000 above the diagonal
                buffer.copy_(torch.full(buffer.shape, -10000.0).triu_(1))
    generator = torch.Generator().manual_seed(seed)
    # One pool of U(-1, 1) values; each parameter copies a window at a random offset: memcpy speed instead of RNG
    # speed for a billion parameters, and tensors of one shape still differ (a swapped pair of keys is caught).
    pool = torch.rand(2 * POOL_SIZE, generator=generator).mul_(2).sub_(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            n = p.numel()
            start = int(torch.randint(0, POOL_SIZE, (), generator=generator))
            u = pool[start : start + n] if n <= POOL_SIZE else pool.repeat(n // POOL_SIZE + 1)[:n]
            u = u.reshape(p.shape).clone()
            leaf = name.rsplit(".", 1)[-1]
            embedding = name.endswith(
                ("token_embedding.weight", "position_embedding.weight", "quantize.embedding.weight")
            )
            if leaf == "clip_std" or ("norm" in name and leaf == "weight" and p.ndim == 1):
                value = u.mul_(0.2).add_(1)
            elif leaf == "bias" or leaf == "clip_mean":
                value = u.mul_(0.05 if leaf == "bias" else 0.5)
            elif p.ndim >= 2 and "embedding" not in leaf and not embedding:
                value = u.mul_(math.sqrt(3 / p[0].numel()))
            else:  # token / position / class embeddings, the prior's learned tokens, the MoVQ codebook
                value = u
            p.copy_(value)
    return module.eval()


# --- tiny twins of every part, for the pipeline and loading tests ------------------------------------------------

D = 40  # the CLIP embedding width every tiny part agrees on (TINY_UNET's encoder_hid_dim)
TEXT = {**TEXT_ENCODER, "hidden_size": D, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
        "projection_dim": D}  # fmt: skip
VISION = {**IMAGE_ENCODER, "hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4,
          "num_hidden_layers": 2, "projection_dim": D, "image_size": 28}  # fmt: skip
PRIOR_TINY = {"num_attention_heads": 2, "attention_head_dim": 12, "embedding_dim": D, "num_layers": 2}


def tiny_reference(tokenizer_dir: Path, movq: dict | None = None) -> types.SimpleNamespace:
    """diffusers' and transformers' parts of Kandinsky 2.2 at tiny sizes, random weights, tamed where random
    weights would amplify rounding beyond anything a trained model does: the UNet's ε to unit size (random
    weights give ~5), and MoVQ's SpatialNorm to a mild modulation, y ≈ 1 + small (random conv_y read the latents,
    ~25 after a random UNet's steps, as gains of ~25 at every norm of the decoder)."""
    assert TINY_UNET["encoder_hid_dim"] == D
    ref = types.SimpleNamespace(
        unet=randomize(UNet2DConditionModel(**diffusers_config(TINY_UNET)), 10),
        inpaint_unet=randomize(UNet2DConditionModel(**diffusers_config({**TINY_UNET, "in_channels": 9})), 11),
        movq=randomize(VQModel(**diffusers_config(movq or TINY_MOVQ)), 12),
        prior=randomize(PriorTransformer(**diffusers_config({**PRIOR, **PRIOR_TINY})), 13),
        text_encoder=randomize(CLIPTextModelWithProjection(CLIPTextConfig(**TEXT)), 14),
        image_encoder=randomize(CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION)), 15),
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
        image_processor=CLIPImageProcessor(**IMAGE_PROCESSOR),
    )
    with torch.no_grad():
        for unet in (ref.unet, ref.inpaint_unet):
            unet.conv_out.weight.mul_(0.2)
        for name, p in ref.movq.decoder.named_parameters():
            if ".conv_y." in name or ".conv_b." in name:
                p.mul_(0.02)
                if name.endswith("conv_y.bias"):
                    p.add_(1)
    return ref


PRIOR_ID = "kandinsky-community/kandinsky-2-2-prior"
DECODER_ID = "kandinsky-community/kandinsky-2-2-decoder"
INPAINT_ID = "kandinsky-community/kandinsky-2-2-decoder-inpaint"
README = f"---\nlicense: apache-2.0\nprior:\n- {PRIOR_ID}\ntags:\n- kandinsky\n---\n# Kandinsky 2.2\n"


def save_tiny_repos(root: Path, ref: types.SimpleNamespace) -> Path:
    """The three repos (prior, decoder, decoder-inpaint) as diffusers' save_pretrained writes them, each decoder with
    the README front matter that names its prior. Returns root."""
    KandinskyV22PriorPipeline(
        prior=ref.prior, image_encoder=ref.image_encoder, text_encoder=ref.text_encoder, tokenizer=ref.tokenizer,
        scheduler=UnCLIPScheduler(**diffusers_config(PRIOR_SCHEDULER)), image_processor=ref.image_processor,
    ).save_pretrained(root / "prior")  # fmt: skip
    for name, pipeline_class, unet in (
        ("decoder", KandinskyV22Pipeline, ref.unet),
        ("decoder-inpaint", KandinskyV22InpaintPipeline, ref.inpaint_unet),
    ):
        pipe = pipeline_class(unet=unet, scheduler=DDPMScheduler.from_config(DECODER_SCHEDULER), movq=ref.movq)
        pipe.save_pretrained(root / name)
        (root / name / "README.md").write_text(README)
    return root


def write_hub_cache(cache: Path, repo_id: str, folder: Path, revision: str = "0123456789abcdef" * 2 + "01234567"):
    """A Hugging Face cache entry laid out by hand: models--org--name/{refs/main, snapshots/<revision>/...}."""
    import shutil

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)


# --- the published repos' exact key sets (tests/data/kandinsky22/*.json) ------------------------------------------

KEY_SET_DIR = Path(__file__).parent / "data" / "kandinsky22"
REPOS = {  # repo name -> component -> (how diffusers / transformers build it, its published config)
    "kandinsky-2-2-prior": {
        "prior": (lambda c: PriorTransformer(**diffusers_config(c)), PRIOR),
        "text_encoder": (lambda c: CLIPTextModelWithProjection(CLIPTextConfig(**c)), TEXT_ENCODER),
        "image_encoder": (lambda c: CLIPVisionModelWithProjection(CLIPVisionConfig(**c)), IMAGE_ENCODER),
    },
    "kandinsky-2-2-decoder": {
        "unet": (lambda c: UNet2DConditionModel(**diffusers_config(c)), DECODER_UNET),
        "movq": (lambda c: VQModel(**diffusers_config(c)), MOVQ),
    },
    "kandinsky-2-2-decoder-inpaint": {
        "unet": (lambda c: UNet2DConditionModel(**diffusers_config(c)), INPAINT_UNET),
        "movq": (lambda c: VQModel(**diffusers_config(c)), MOVQ),
    },
}


def reference_key_set(repo: str, component: str) -> list[list]:
    """[name, shape, dtype] of every tensor diffusers' / transformers' own model saves for this component at its
    published config, in state_dict order (built on the meta device: no memory)."""
    build, config = REPOS[repo][component]
    with torch.device("meta"):
        model = build(config)
    return [[name, list(t.shape), str(t.dtype).removeprefix("torch.")] for name, t in model.state_dict().items()]

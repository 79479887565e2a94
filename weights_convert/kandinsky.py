"""Kandinsky 2.2's diffusers folders ↔ minisd: which folder is which, the weights files each holds, every
config.json checked (one line for anything that is not Kandinsky 2.2) and read into minisd's configs, and the
key renames — only transformers' wrapper levels, since minisd's module paths are diffusers'/transformers' own.

    kandinsky-community/kandinsky-2-2-prior           model_index.json _class_name KandinskyV22PriorPipeline
        prior/ text_encoder/ image_encoder/ tokenizer/ scheduler/ image_processor/
    kandinsky-community/kandinsky-2-2-decoder         KandinskyV22Pipeline
    kandinsky-community/kandinsky-2-2-decoder-inpaint KandinskyV22InpaintPipeline (unet in_channels 9)
        unet/ movq/ scheduler/, and README.md whose front matter names the prior (`prior: [org/name]`), which
        diffusers' AutoPipelines load beside the decoder ("connected pipes").
"""

from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

from minisd.errors import MinisdError

PRIOR_PIPELINE, DECODER_PIPELINES = "KandinskyV22PriorPipeline", ("KandinskyV22Pipeline", "KandinskyV22InpaintPipeline")
# The combined pipelines' names (a decoder folder re-saved by a combined pipeline) read as their decoder.
COMBINED = {
    "KandinskyV22CombinedPipeline": "KandinskyV22Pipeline",
    "KandinskyV22Img2ImgCombinedPipeline": "KandinskyV22Pipeline",
    "KandinskyV22InpaintCombinedPipeline": "KandinskyV22InpaintPipeline",
}
FOLDERS = {"prior": ("prior", "text_encoder", "image_encoder"), "decoder": ("unet", "movq")}
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model{v}.safetensors", "diffusion_pytorch_model{v}.bin")
_TRANSFORMERS_WEIGHTS = ("model{v}.safetensors", "pytorch_model{v}.bin")
# Each component's weights file, best first ("{v}": "" or "." + variant).
WEIGHT_FILES = {
    "prior": _DIFFUSERS_WEIGHTS,
    "unet": _DIFFUSERS_WEIGHTS,
    "movq": _DIFFUSERS_WEIGHTS,
    "text_encoder": _TRANSFORMERS_WEIGHTS,
    "image_encoder": _TRANSFORMERS_WEIGHTS,
}
OTHER_FILES = {  # what a repo needs beside the components' config.json and weights
    "prior": ("model_index.json", "tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler/scheduler_config.json"),
    "decoder": ("model_index.json", "README.md", "scheduler/scheduler_config.json"),
}
# transformers' wrapper level in the files (and in memory): minisd's CLIP modules start one level lower
PREFIXES = {"text_encoder": "text_model.", "image_encoder": "vision_model."}
POSITION_IDS = "embeddings.position_ids"  # an arange buffer older transformers saved; minisd makes positions


def to_minisd(component: str, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A component file's names -> minisd's (tensors shared): the CLIP towers lose their wrapper level and the
    position_ids buffer; the diffusers components are unchanged.

    >>> import torch
    >>> list(to_minisd("image_encoder", {"vision_model.pre_layrnorm.bias": torch.zeros(1), "visual_projection.weight":
    ...     torch.zeros(1, 1), "vision_model.embeddings.position_ids": torch.zeros(1)}))
    ['pre_layrnorm.bias', 'visual_projection.weight']
    """
    prefix = PREFIXES.get(component, "")
    out = {name.removeprefix(prefix): tensor for name, tensor in state_dict.items()}
    out.pop(POSITION_IDS, None)
    return out


def to_diffusers(component: str, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """minisd names -> a component file's (what transformers/diffusers save_pretrained writes). The projections
    (text_projection, visual_projection) sit outside transformers' wrapper level."""
    prefix = PREFIXES.get(component, "")
    return {(n if n.endswith("_projection.weight") else prefix + n): t for n, t in state_dict.items()}


# ---------------------------------------------------------------------------------------------------------------
# config.json -> minisd config fields, refusing what is not Kandinsky 2.2


def _refuse(where: str | Path, what: str) -> None:
    raise MinisdError(f"{where}: not a Kandinsky 2.2 config: {what}")


def _expect(config: dict, where: str | Path, expected: dict) -> None:
    for key, value in expected.items():
        if config.get(key, value) != value:
            _refuse(where, f"{key} {config[key]!r}, Kandinsky 2.2 has {value!r}")


def _unet(config: dict, where) -> dict:
    levels = len(config.get("block_out_channels", (384, 768, 1152, 1536)))
    _expect(config, where, {
        "_class_name": "UNet2DConditionModel", "encoder_hid_dim_type": "image_proj", "addition_embed_type": "image",
        "resnet_time_scale_shift": "scale_shift", "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
        "class_embed_type": None, "time_cond_proj_dim": None, "norm_eps": 1e-5, "flip_sin_to_cos": True,
        "freq_shift": 0, "only_cross_attention": False,
        "down_block_types": ["ResnetDownsampleBlock2D"] + ["SimpleCrossAttnDownBlock2D"] * (levels - 1),
        "up_block_types": ["SimpleCrossAttnUpBlock2D"] * (levels - 1) + ["ResnetUpsampleBlock2D"],
    })  # fmt: skip
    if config.get("in_channels", 4) not in (4, 9):
        _refuse(where, f"in_channels {config['in_channels']}; the decoder has 4, the inpainting decoder 9")
    return config


def _movq(config: dict, where) -> dict:
    levels = len(config.get("block_out_channels", (128, 256, 256, 512)))
    _expect(config, where, {
        "_class_name": "VQModel", "norm_type": "spatial", "act_fn": "silu",
        "down_block_types": ["DownEncoderBlock2D"] * (levels - 1) + ["AttnDownEncoderBlock2D"],
        "up_block_types": ["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * (levels - 1),
    })  # fmt: skip
    if config.get("vq_embed_dim") not in (None, config.get("latent_channels", 4)):
        _refuse(where, f"vq_embed_dim {config['vq_embed_dim']} differs from latent_channels")
    return config


def _prior(config: dict, where) -> dict:
    _expect(config, where, {
        "_class_name": "PriorTransformer", "added_emb_type": "prd", "encoder_hid_proj_type": "linear",
        "norm_in_type": None, "embedding_proj_norm_type": None, "time_embed_act_fn": "silu", "time_embed_dim": None,
        "embedding_proj_dim": None, "clip_embed_dim": None,
    })  # fmt: skip
    if config.get("additional_embeddings", 4) != 4:  # text embedding, timestep, noisy embedding, prd token
        _refuse(where, f"additional_embeddings {config['additional_embeddings']}, Kandinsky 2.2 has 4")
    return config


def _clip(architecture: str):
    def check(config: dict, where) -> dict:
        if (config.get("architectures") or [architecture]) != [architecture]:
            _refuse(where, f"architectures {config['architectures']}, Kandinsky 2.2 has [{architecture!r}]")
        if config.get("hidden_act", "gelu") not in ("gelu", "quick_gelu"):
            _refuse(where, f"hidden_act {config['hidden_act']!r}")
        return {**config, "with_projection": True}

    return check


def _decoder_scheduler(config: dict, where) -> dict:
    _expect(config, where, {
        "beta_schedule": "linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000,
        "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "leading",
    })  # fmt: skip
    return config


def _prior_scheduler(config: dict, where) -> dict:
    _expect(config, where, {
        "_class_name": "UnCLIPScheduler", "beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000,
        "prediction_type": "sample", "clip_sample": True, "clip_sample_range": 10.0,
        "variance_type": "fixed_small_log",
    })  # fmt: skip
    return config


CHECKS = {
    "unet": _unet,
    "movq": _movq,
    "prior": _prior,
    "text_encoder": _clip("CLIPTextModelWithProjection"),
    "image_encoder": _clip("CLIPVisionModelWithProjection"),
    "decoder_scheduler": _decoder_scheduler,
    "prior_scheduler": _prior_scheduler,
}


def kandinsky_config(component: str, config: dict, where: str | Path) -> dict:
    """A component's config.json dict if it describes Kandinsky 2.2's network (for the CLIP towers with
    with_projection set), else a one-line MinisdError naming `where` and the key that shows another model."""
    if not isinstance(config, dict):
        raise MinisdError(f"{where}: a config.json must hold a JSON object, got {type(config).__name__}")
    return CHECKS[component](config, where)


def pipeline_kind(model_index: dict, where: str | Path) -> str:
    """ "prior" or "decoder" from model_index.json's _class_name; a one-line error for anything else."""
    name = model_index.get("_class_name") if isinstance(model_index, dict) else None
    name = COMBINED.get(name, name)
    if name == PRIOR_PIPELINE:
        return "prior"
    if name in DECODER_PIPELINES:
        return "decoder"
    raise MinisdError(
        f"{where}: model_index.json names {name!r}, not a Kandinsky 2.2 pipeline ({PRIOR_PIPELINE}, "
        f"{' or '.join(DECODER_PIPELINES)})"
    )

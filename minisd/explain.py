"""`minisd explain`: a local web page that runs one prompt and lets you step through the run.

Type a prompt, choose seed, sampler, steps and guidance (and, for img2img, an image and a strength); then move the
step slider and see, at every model call, what the lessons draw:

    x_t          the sampler's latents, through the cheap 4 → 3 colour map (previews.latents_to_rgb)
    x̂_0          the clean picture this step predicts, decoded (the sampler's x0_pred, common.decode)
    ε            the guided noise prediction, its 4 latent channels side by side
    guidance     ‖ε_c − ε_∅‖ per latent pixel: where the prompt changes the prediction (classifier-free guidance)
    attention    each prompt token's cross-attention map at this step (pipelines.attention_maps)

Each panel's title names the minisd function and the file:line that computed it (read off the code with `inspect`,
so it stays true as the code moves). The run itself is pipelines/trace.py, txt2img's and img2img's own loop.

The page is made with gradio (`pip install -e ".[web]"`), the library of most ML demos; minisd imports it only here,
only when the page starts. With no weights named the nano model runs on the CPU (25 steps in about a second);
`--checkpoint` / `--model` name SD v1 weights.
"""

import inspect
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from minisd.attention import attention_weights
from minisd.errors import MinisdError
from minisd.images import image_to_pixels
from minisd.pipelines import common, trace
from minisd.pipelines.attention_maps import CrossAttentionMaps, token_labels
from minisd.pipelines.previews import fit_latent_rgb, latents_to_rgb
from minisd.samplers import sampler_names
from minisd.unet import UNet

SHOW = 256  # pixels per side of each panel on the page (small pictures are enlarged with nearest pixels)
ROOT = Path(__file__).resolve().parent.parent


def where(function, text: str | None = None) -> str:
    """'minisd/pipelines/previews.py:66 latents_to_rgb': the file (from the repository root) and line of a function,
    or of the first line in it that contains `text`."""
    function = inspect.unwrap(function)
    path = Path(inspect.getsourcefile(function)).resolve()
    lines, line = inspect.getsourcelines(function)
    if text is not None:
        line += next(k for k, source in enumerate(lines) if text in source)
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    return f"{shown}:{line} {function.__qualname__}"


PANELS = {  # elem_id: (title, (function, the text of its line or None for its def) for each place that computed it)
    "panel-xt": (
        "x_t, the latents (cheap colour preview)",
        ((trace.trace, "latents = sampler.step("), (latents_to_rgb, None)),
    ),
    "panel-x0": (
        "x̂₀, the predicted clean picture",
        ((trace.trace, "x0_pred = sampler.x0_pred("), (common.decode, None)),  # the sampler's: in `describe`
    ),
    "panel-eps": (
        "ε, the guided noise prediction (4 channels)",
        ((trace.trace, "noise_pred = noise_pred_uncond + guidance_scale"), (UNet.forward, None)),
    ),
    "panel-guidance": ("‖ε_c − ε_∅‖, where guidance acts", ((trace.trace, "noise_pred_uncond, noise_pred_text ="),)),
    "panel-attention": (
        "cross-attention map of each token (share of all attention)",
        ((CrossAttentionMaps._attn2_ran, "attention_weights("), (attention_weights, None)),
    ),
    "panel-final": ("the final picture", ((common.decode, None),)),
}


def title(elem_id: str) -> str:
    text, places = PANELS[elem_id]
    return f"{text} · {' · '.join(where(function, line) for function, line in places)}"


def enlarge(pixels: Tensor) -> Image.Image:
    """(h, w, 3) uint8 -> a PIL image SHOW pixels wide, nearest pixels (a latent pixel stays a visible square)."""
    image = Image.fromarray(pixels.numpy())
    return image.resize((SHOW, SHOW * image.height // image.width), Image.Resampling.NEAREST)


def signed_to_pixels(x: Tensor, scale: float) -> Tensor:
    """A (h, w) signed map -> grey (h, w, 3) uint8: 0 is mid grey, ±scale black/white."""
    grey = (x / scale).clamp(-1, 1)[None, None].expand(1, 3, -1, -1)
    return image_to_pixels(grey)[0]


def heat(x: Tensor) -> Tensor:
    """A (h, w) map >= 0, scaled by its maximum -> (h, w, 3) uint8, black → red → yellow → white."""
    x = x / x.max().clamp_min(1e-12)
    rgb = torch.stack([(3 * x).clamp(0, 1), (3 * x - 1).clamp(0, 1), (3 * x - 2).clamp(0, 1)])  # (3, h, w)
    return (rgb * 255).round().to(torch.uint8).permute(1, 2, 0)


def channels(eps: Tensor) -> Tensor:
    """(1, c, h, w) -> the c channels side by side as grey tiles, (h, c·(w + 1), 3) uint8; ±3 is black/white."""
    tiles = []
    for channel in eps[0]:
        tiles += [signed_to_pixels(channel, 3.0), torch.full((channel.shape[0], 1, 3), 255, dtype=torch.uint8)]
    return torch.cat(tiles[:-1], dim=1)


class Explainer:
    """The page's computations, without the page: run a trace, and draw step i of it."""

    def __init__(self, components, source: str):
        self.components, self.source = components, source
        self.rgb_map = self.latent_colours()
        self.decoded: dict[tuple[int, int], Tensor] = {}
        self.run: trace.Trace | None = None

    def latent_colours(self) -> tuple[Tensor | None, Tensor | None]:
        """The 4 → 3 colour map of latents_to_rgb: SD v1's published table, or for a model of the shapes pictures'
        size (the nano model, whose VAE is its own) a least-squares fit on 64 of those pictures."""
        from minisd.train import shapes

        if getattr(self.components, "sample_size", 512) != shapes.SIZE:
            return None, None
        pixels, _ = shapes.dataset(64, seed=0)
        image = shapes.to_image(pixels)
        vae = self.components.vae
        with torch.no_grad():
            generator, dtype = torch.Generator().manual_seed(0), vae.post_quant_conv.weight.dtype
            latents = common.encode_image(vae, image, generator, dtype)
        return fit_latent_rgb(latents.float().cpu(), image)

    def start(self, prompt, negative_prompt, seed, sampler, steps, guidance, image, strength) -> trace.Trace:
        self.decoded = {}
        self.run = trace.trace(
            self.components, prompt, negative_prompt, int(steps), float(guidance), int(seed), sampler,
            image=image, strength=float(strength),
        )  # fmt: skip
        return self.run

    def decode(self, i: int) -> Tensor:
        """x̂₀ of step i decoded, (h, w, 3) uint8; i = len(steps): the final picture. Cached."""
        run = self.run
        key = (id(run), i)
        if key not in self.decoded:
            latents = run.final_latents if i == len(run.steps) else run.steps[i].x0_pred
            vae = self.components.vae
            device, dtype = vae.post_quant_conv.weight.device, vae.post_quant_conv.weight.dtype
            with torch.no_grad():
                self.decoded[key] = image_to_pixels(common.decode(vae, latents.to(device, dtype)))[0]
        return self.decoded[key]

    def describe(self, i: int) -> str:
        run, step = self.run, self.run.steps[i]
        n, skipped = len(run.scheduled), run.start
        lines = [
            f"**model call {i + 1} of {len(run.steps)}**, timestep t = {step.t}; {type(run.sampler).__name__}, "
            f"its x̂₀: `{where(type(run.sampler).x0_pred)}`"
        ]
        if skipped:
            lines.append(
                f"img2img: of the {n} scheduled steps the first {skipped} are skipped (strength "
                f"{1 - skipped / n:.2f} of {n}: `samplers/base.py` img2img_start); the run starts at t = "
                f"{run.steps[0].t}, the image's latents noised to that level"
            )
        else:
            lines.append(f"txt2img: all {n} scheduled steps run, from pure noise")
        plan = " ".join(f"~~{t}~~" if k < skipped else f"**{t}**" if t == step.t else str(t)
                        for k, t in enumerate(run.scheduled))  # fmt: skip
        lines.append(f"schedule: {plan}")
        return "\n\n".join(lines)

    def panels(self, i: int) -> dict[str, object]:
        """Every panel of step i: elem_id -> a PIL image, or for the attention a list of (image, label)."""
        run, step = self.run, self.run.steps[i]
        weight, bias = self.rgb_map
        x0 = self.decode(i)
        size = tuple(x0.shape[:2])
        if step.noise_pred_uncond is None:  # guidance off (w <= 1): one half only
            guidance = torch.zeros(step.noise_pred.shape[-2:])
        else:
            guidance = (step.noise_pred_text - step.noise_pred_uncond)[0].norm(dim=0)  # (h/8, w/8)
        maps = F.interpolate(step.attention, size=size, mode="bilinear", align_corners=False)[0]  # (77, h, w)
        labels = token_labels(self.components.tokenizer, run.prompt)
        n = labels.index("<end>")
        shown = [(maps[j], f"{j}: {labels[j]}") for j in range(1, n)]
        shown += [(maps[n], f"{n}: <end>"), (maps[n + 1 :].sum(0), f"{n + 1}–76: <pad> (sum)")]
        gallery = []
        for values, label in shown:
            overlay = (0.35 * x0.float() + 0.65 * heat(values).float()).round().to(torch.uint8)
            gallery.append((enlarge(overlay), f"{label} ({100 * values.mean().item():.0f}%)"))
        return {
            "panel-xt": enlarge(latents_to_rgb(step.latents, weight, bias)[0]),
            "panel-x0": enlarge(x0),
            "panel-eps": enlarge(channels(step.noise_pred)),
            "panel-guidance": enlarge(heat(guidance)),
            "panel-attention": gallery,
            "panel-final": enlarge(self.decode(len(run.steps))),
        }


def build_page(explainer: Explainer):
    """The gradio page around an Explainer."""
    import gradio as gr

    order = ["panel-xt", "panel-x0", "panel-eps", "panel-guidance", "panel-attention", "panel-final"]
    with gr.Blocks(title="minisd explain", analytics_enabled=False) as page:
        gr.Markdown(f"# minisd explain\nWatch one run step by step. Weights: `{explainer.source}`")
        with gr.Row():
            prompt = gr.Textbox("a red circle above a blue square", label="prompt", elem_id="prompt", scale=3)
            negative = gr.Textbox("", label="negative prompt", elem_id="negative", scale=2)
        with gr.Row():
            seed = gr.Number(0, label="seed", precision=0, minimum=0, elem_id="seed")
            sampler = gr.Dropdown(sampler_names(), value="DPM++ 2M", label="sampler", elem_id="sampler")
            steps = gr.Slider(1, 100, value=25, step=1, label="steps", elem_id="steps")
            default = getattr(explainer.components, "guidance_scale", 7.5)
            guidance = gr.Slider(0, 20, value=default, step=0.5, label="guidance w", elem_id="guidance")
        with gr.Accordion("img2img: start from an image", open=False):
            image = gr.Image(type="pil", label="image (sides multiples of 8)", elem_id="image", format="png")
            strength = gr.Slider(0.05, 1, value=0.6, step=0.05, label="strength", elem_id="strength")
        run = gr.Button("Run", variant="primary", elem_id="run")
        step = gr.Slider(0, 24, value=24, step=1, label="step (model call)", elem_id="step")
        info = gr.Markdown(elem_id="info")
        with gr.Row():
            outputs = {k: gr.Image(label=title(k), elem_id=k, format="png", height=SHOW) for k in order[:4]}
        outputs["panel-attention"] = gr.Gallery(
            label=title("panel-attention"), elem_id="panel-attention", columns=6, format="png", height="auto"
        )
        outputs["panel-final"] = gr.Image(label=title("panel-final"), elem_id="panel-final", format="png", height=SHOW)
        shown = [info, *(outputs[k] for k in order)]

        def show(i):
            if explainer.run is None:
                return [gr.skip()] * len(shown)
            i = min(int(i), len(explainer.run.steps) - 1)
            panels = explainer.panels(i)
            return [explainer.describe(i), *(panels[k] for k in order)]

        def start(*values):
            try:
                explainer.start(*values)
            except MinisdError as error:
                raise gr.Error(str(error)) from None
            last = len(explainer.run.steps) - 1
            return [gr.Slider(0, last, value=last, step=1), *show(last)]

        run.click(start, [prompt, negative, seed, sampler, steps, guidance, image, strength], [step, *shown])
        step.change(show, [step], shown)
    return page


def launch(source: str, device: str | None, port: int, open_browser: bool) -> None:
    """Load the weights, build the page and serve it on http://127.0.0.1:port until interrupted."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise MinisdError('minisd explain needs gradio: pip install -e ".[web]"') from None
    from minisd.loading import load_components

    device = device or "cpu"
    dtype = torch.float32 if torch.device(device).type == "cpu" else None  # as `minisd generate`: fp32 on the CPU
    components = load_components(source, device=device, dtype=dtype)
    page = build_page(Explainer(components, source))
    page.queue().launch(server_name="127.0.0.1", server_port=port, inbrowser=open_browser, footer_links=[])

"""minisd's PNG texts as AUTOMATIC1111 reads them, and A1111's texts as minisd reads them.

A1111 cannot be a test dependency (a web application, not a package), so its reader is re-derived here from its
source (v1.10, modules/infotext_utils.py `parse_generation_parameters` and `infotext_to_setting_name_mapping`,
modules/sd_samplers.py `get_sampler_and_scheduler`, the sampler and scheduler tables of
modules/sd_samplers_kdiffusion.py, sd_samplers_timesteps.py and sd_schedulers.py), written anew. The fixtures of
A1111 texts below are written from A1111's documented format (1.5-era: the schedule inside the sampler's name,
"Model hash" of 8 or 10 digits; 1.9+: "Schedule type" after "Sampler").
"""

import hashlib
import json
import os
import re

import pytest

from minisd import hashes
from minisd.errors import MinisdError
from minisd.hashes import file_hash, hash_matches, legacy_file_hash
from minisd.parameters import GenerationParameters, check_fields, parse_parameters
from minisd.samplers import get_sampler

# --- A1111's reader, re-derived -------------------------------------------------------------------------------

A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
A1111_SIZE = re.compile(r"^(\d+)x(\d+)$")

# Samplers of A1111 1.9+ and the scheduler each defaults to ("Automatic"); the timestep samplers take none.
A1111_SAMPLERS = {
    "DPM++ 2M": "karras", "DPM++ SDE": "karras", "DPM++ 2M SDE": "exponential", "DPM++ 2M SDE Heun": "exponential",
    "DPM++ 2S a": "karras", "DPM++ 3M SDE": "exponential", "Euler a": None, "Euler": None, "LMS": None, "Heun": None,
    "DPM2": "karras", "DPM2 a": "karras", "DPM fast": None, "DPM adaptive": None, "Restart": "karras",
    "DDIM": None, "DDIM CFG++": None, "PLMS": None, "UniPC": None, "LCM": None,
}  # fmt: skip
A1111_SCHEDULERS = [  # (name, label, aliases)
    ("automatic", "Automatic", []), ("uniform", "Uniform", []), ("karras", "Karras", []),
    ("exponential", "Exponential", []), ("polyexponential", "Polyexponential", []),
    ("sgm_uniform", "SGM Uniform", ["SGMUniform"]), ("kl_optimal", "KL Optimal", []),
    ("align_your_steps", "Align Your Steps", []), ("simple", "Simple", []), ("normal", "Normal", []),
    ("ddim", "DDIM", []), ("beta", "Beta", []),
]  # fmt: skip
A1111_SCHEDULERS_MAP = {name: (name, label) for name, label, _ in A1111_SCHEDULERS} | {
    label: (name, label) for name, label, _ in A1111_SCHEDULERS
}
A1111_SETTINGS = {"Eta": "eta_ancestral", "Eta DDIM": "eta_ddim", "Clip skip": "CLIP_stop_at_last_layers"}


def a1111_parse(text: str) -> dict[str, str]:
    """parse_generation_parameters: prompt lines, "Negative prompt:", the last line's pairs (JSON-quoted values
    unquoted, "AxB" split into key-1 / key-2), and the defaults it fills in for absent keys."""
    res, prompt, negative, done_with_prompt = {}, "", "", False
    *lines, lastline = text.strip().split("\n")
    if len(A1111_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    for k, v in A1111_PARAM.findall(lastline):
        if v and v[0] == '"' and v[-1] == '"':
            try:
                v = json.loads(v)
            except ValueError:
                pass
        m = A1111_SIZE.match(v)
        if m is not None:
            res[f"{k}-1"], res[f"{k}-2"] = m.group(1), m.group(2)
        else:
            res[k] = v
    res["Prompt"], res["Negative prompt"] = prompt, negative
    res.setdefault("Clip skip", "1")
    res.setdefault("Schedule type", "Automatic")
    return res


def a1111_sampler_and_scheduler(sampler_name: str | None, scheduler_name: str | None) -> tuple[str, str]:
    """get_sampler_and_scheduler: a scheduler label or alias at the end of the sampler's name wins; an unknown
    sampler falls back to the first (DPM++ 2M); the sampler's own default scheduler is shown as Automatic."""
    found = A1111_SCHEDULERS_MAP.get(scheduler_name, A1111_SCHEDULERS_MAP["automatic"])
    name = sampler_name or "DPM++ 2M"
    for scheduler_key, label, aliases in A1111_SCHEDULERS:
        for option in (label, scheduler_key, *aliases):
            if name.endswith(" " + option):
                found, name = (scheduler_key, label), name[: -(len(option) + 1)]
                break
    sampler = name if name in A1111_SAMPLERS else "DPM++ 2M"
    if A1111_SAMPLERS[sampler] == found[0]:
        found = A1111_SCHEDULERS_MAP["automatic"]
    return sampler, found[1]


def a1111_effective_schedule(sampler: str, scheduler_label: str) -> str:
    """The σ schedule A1111 runs: the label, or for Automatic the sampler's default (Uniform: get_sigmas)."""
    if scheduler_label != "Automatic":
        return scheduler_label
    default = A1111_SAMPLERS[sampler]
    return {None: "Uniform", "karras": "Karras", "exponential": "Exponential"}[default]


# --- minisd's texts, read by A1111 -------------------------------------------------------------------------------


def record(sampler: str, schedule_type: str = "Uniform", eta=None, **fields) -> GenerationParameters:
    chosen = get_sampler(sampler, eta=eta, schedule_type=schedule_type)  # what the API records
    values = dict(mode="txt2img", prompt="a cat, (fur:1.2)", negative_prompt="blurry", num_inference_steps=25,
                  sampler=chosen.name, guidance_scale=7.5, seed=42, width=512, height=768,
                  schedule_type=chosen.schedule_type, eta=eta, model_name="v1-5-pruned-emaonly",
                  model_hash="6ce0161689")  # fmt: skip
    return GenerationParameters(**{**values, **fields})


CASES = [
    ("Euler a", "Uniform", None), ("Euler a", "Karras", 0.6), ("Euler", "Uniform", None),
    ("Euler", "SGM Uniform", None), ("LMS", "Karras", None), ("Heun", "Exponential", None),
    ("DPM++ 2M", "Uniform", None), ("DPM++ 2M", "Karras", None), ("DPM++ 2M", "Exponential", None),
    ("DPM++ 2M SDE", "Exponential", 0.5), ("DPM++ 2M SDE", "Karras", None), ("DDIM", "Uniform", 0.3),
    ("DDIM", "Uniform", None), ("PLMS", "Uniform", None),
]  # fmt: skip


@pytest.mark.parametrize(("sampler", "schedule", "eta"), CASES)
def test_a1111_reads_what_minisd_writes(sampler, schedule, eta):
    """Every field minisd writes, read by A1111's reader as minisd meant it: the sampler, the σ schedule A1111
    will run (its label, or Automatic's default), DDIM's η as eta_ddim and the ancestral η as eta_ancestral, the
    prompt, size, seed, steps, CFG scale, clip skip, denoising strength and model."""
    params = record(sampler, schedule, eta, clip_skip=1, strength=0.75, mode="img2img", image_hash="0123456789")
    res = a1111_parse(params.text())
    a1111_sampler, label = a1111_sampler_and_scheduler(res["Sampler"], res["Schedule type"])
    assert a1111_sampler == sampler
    if sampler not in ("DDIM", "PLMS"):  # A1111's timestep samplers run their own timesteps whatever the label
        assert a1111_effective_schedule(a1111_sampler, label) == schedule
    settings = {A1111_SETTINGS[k]: float(res[k]) for k in ("Eta", "Eta DDIM") if k in res}
    want = {}
    if eta is not None:
        want = {"eta_ddim": eta} if sampler == "DDIM" else {"eta_ancestral": eta}
    assert settings == want
    assert (res["Prompt"], res["Negative prompt"]) == (params.prompt, params.negative_prompt)
    assert (res["Size-1"], res["Size-2"], res["Seed"], res["Steps"]) == ("512", "768", "42", "25")
    assert (res["CFG scale"], res["Clip skip"], res["Denoising strength"]) == ("7.5", "2", "0.75")
    assert (res["Model hash"], res["Model"]) == ("6ce0161689", "v1-5-pruned-emaonly")
    assert GenerationParameters.from_text(params.text()) == params


def test_a1111_lacks_ddpm():
    """A1111 has no DDPM sampler: its reader falls back to its first sampler without a word (the command line says
    so when it writes a DDPM PNG)."""
    res = a1111_parse(record("DDPM").text())
    assert res["Sampler"] == "DDPM" and a1111_sampler_and_scheduler(res["Sampler"], res["Schedule type"])[0] != "DDPM"


# --- A1111's texts, read by minisd -------------------------------------------------------------------------------

PROMPT = "masterpiece, a castle on a hill, (sunset:1.2)\nNegative prompt: lowres, blurry\n"
A1111_TEXTS = {  # name: (text, (sampler, schedule type, eta)); 1.5-era first, then 1.9+
    "1.5 DPM++ 2M Karras": (
        "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234, Size: 512x512, Model hash: 6ce0161689, "
        "Model: v1-5-pruned-emaonly, Version: v1.5.1",
        ("DPM++ 2M", "Karras", None),
    ),
    "1.5 Euler a with ENSD and an old hash": (
        "Steps: 28, Sampler: Euler a, CFG scale: 11, Seed: 3210, Size: 512x768, Model hash: 81761151, "
        "Clip skip: 2, ENSD: 31337",
        ("Euler a", "Uniform", None),
    ),
    "1.5 DDIM with Eta DDIM": (
        "Steps: 50, Sampler: DDIM, CFG scale: 7.5, Seed: 7, Size: 512x512, Model hash: 6ce0161689, Eta DDIM: 0.5",
        ("DDIM", "Uniform", 0.5),
    ),
    "1.5 DPM++ 2M SDE Karras": (
        "Steps: 30, Sampler: DPM++ 2M SDE Karras, CFG scale: 5, Seed: 99, Size: 640x448, Model hash: 6ce0161689",
        ("DPM++ 2M SDE", "Karras", None),
    ),
    "1.9 DPM++ 2M, Karras": (
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x512, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1",
        ("DPM++ 2M", "Karras", None),
    ),
    "1.9 Euler, Automatic": (
        "Steps: 20, Sampler: Euler, Schedule type: Automatic, CFG scale: 7, Seed: 5, Size: 512x512, "
        "Model hash: 6ce0161689, Version: v1.9.4",
        ("Euler", "Uniform", None),
    ),
    "1.9 DPM++ 2M SDE, Exponential, Eta": (
        "Steps: 24, Sampler: DPM++ 2M SDE, Schedule type: Exponential, CFG scale: 6, Seed: 77, Size: 768x512, "
        "Model hash: 6ce0161689, Eta: 0.7, RNG: CPU, Version: v1.10.1",
        ("DPM++ 2M SDE", "Exponential", 0.7),
    ),
    "1.9 Euler a, SGM Uniform": (
        "Steps: 8, Sampler: Euler a, Schedule type: SGM Uniform, CFG scale: 2, Seed: 0, Size: 512x512, "
        "Model hash: 6ce0161689, Eta: 0.5, Version: v1.9.0",
        ("Euler a", "SGM Uniform", 0.5),
    ),
    "1.9 DDIM, Automatic, Eta DDIM": (
        "Steps: 40, Sampler: DDIM, Schedule type: Automatic, CFG scale: 9, Seed: 12, Size: 512x512, "
        "Model hash: 6ce0161689, Eta DDIM: 0.25, Version: v1.10.1",
        ("DDIM", "Uniform", 0.25),
    ),
    "1.9 scheduler ids (as A1111's API takes them)": (
        "Steps: 20, Sampler: Euler, Schedule type: sgm_uniform, CFG scale: 7, Seed: 5, Size: 512x512",
        ("Euler", "SGM Uniform", None),
    ),
    "1.9 img2img": (
        "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3, Size: 512x512, "
        "Model hash: 6ce0161689, Denoising strength: 0.55, Init image hash: 6ad5a6ec2bd79457a4e9f5e2e80c2b2f, "
        "Version: v1.10.1",
        ("DPM++ 2M", "Karras", None),
    ),
}


@pytest.mark.parametrize("name", list(A1111_TEXTS))
def test_minisd_reads_a1111_texts(name):
    """1.5-era and 1.9+ texts read into the same sampler, schedule and η as A1111 1.9+ reads them; the one place
    they part: a 1.5-era "DPM++ 2M" (no schedule type), which meant Uniform then and which A1111 1.9+ now reads as
    Automatic = Karras (test_the_15_dpm_ambiguity)."""
    line, want = A1111_TEXTS[name]
    params = GenerationParameters.from_text(PROMPT + line)
    assert (params.sampler, params.schedule_type, params.eta) == want
    assert (
        params.prompt == "masterpiece, a castle on a hill, (sunset:1.2)" and params.negative_prompt == "lowres, blurry"
    )
    res = a1111_parse(PROMPT + line)
    sampler, label = a1111_sampler_and_scheduler(res["Sampler"], res["Schedule type"])
    assert sampler == params.sampler
    if sampler != "DDIM":
        assert a1111_effective_schedule(sampler, label) == params.schedule_type
    eta_key = "Eta DDIM" if sampler == "DDIM" else "Eta"
    assert (float(res[eta_key]) if eta_key in res else None) == params.eta
    assert params.mode == ("img2img" if "Denoising strength" in line else "txt2img")


def test_the_15_dpm_ambiguity():
    """ "Sampler: DPM++ 2M" with no Schedule type: A1111 before 1.9 ran it Uniform; A1111 1.9+ reads it as Automatic,
    its Karras. minisd reads the era that wrote it (no Schedule type: before 1.9, or minisd before it wrote one)."""
    text = "x\nSteps: 20, Sampler: DPM++ 2M, CFG scale: 7, Seed: 1, Size: 512x512"
    assert GenerationParameters.from_text(text).schedule_type == "Uniform"
    res = a1111_parse(text)
    assert a1111_effective_schedule(*a1111_sampler_and_scheduler(res["Sampler"], res["Schedule type"])) == "Karras"


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ("Denoising strength: 0.7, Hires upscale: 2, Hires upscaler: Latent", "Hires upscale: '2' asks for hires fix"),
        ("Hires resize: 1024x1024, Hires steps: 10", "hires fix"),
        ("Face restoration: CodeFormer", "face restoration"),
        ("Variation seed: 5, Variation seed strength: 0.3", "variation seeds"),
        ("Schedule rho: 5", "another ρ"),
        ("Mask blur: 4, Inpaint area: Only masked, Denoising strength: 0.6", "A1111's inpainting"),
        ("Emphasis: No norm", "emphasis"),
        ("Token merging ratio: 0.5", "token merging"),  # (Lora hashes, TI hashes, VAE: read, see below)
        ("VAE Decoder: TAESD", "another VAE decoder"),
        ("Refiner: sd_xl_refiner_1.0, Refiner switch at: 0.8", "refiner"),
    ],
)
def test_a1111_fields_minisd_cannot_honour_are_refused(extra, fragment):
    """One line naming the field (a hires-fix text says hires fix, not that an init image is missing)."""
    text = PROMPT + "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, " + extra
    with pytest.raises(MinisdError) as info:
        GenerationParameters.from_text(text)
    assert fragment in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_a1111_embeddings_loras_and_vae_are_read():
    """What A1111 writes for them (names and hashes, its quoting) is read, for regenerate to find the files by hash
    (minisd/additions.py); nothing is refused or left unknown."""
    fields = "VAE hash: 735e4c3a44, VAE: vae-ft-mse-840000-ema-pruned.safetensors, "
    fields += 'Lora hashes: "ink wash: 0123abcd4567", TI hashes: "easynegative: c74b4e810b03, <cat-toy>: 0123456789ab"'
    text = PROMPT + "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, " + fields
    params = GenerationParameters.from_text(text)
    assert params.lora_hashes == {"ink wash": "0123abcd4567"} and params.lora_weights == {}
    assert params.ti_hashes == {"easynegative": "c74b4e810b03", "<cat-toy>": "0123456789ab"}
    assert (params.vae, params.vae_hash) == ("vae-ft-mse-840000-ema-pruned.safetensors", "735e4c3a44")
    assert check_fields(parse_parameters(text)) == []


@pytest.mark.parametrize(
    ("sampler_field", "fragment"),
    [
        ("Sampler: UniPC", "Sampler: 'UniPC' is an A1111 sampler minisd does not have"),
        ("Sampler: DPM++ SDE Karras", "Sampler: 'DPM++ SDE Karras' is an A1111 sampler"),
        ("Sampler: Euler, Schedule type: Align Your Steps", "Schedule type: 'Align Your Steps' is an A1111 schedule"),
        ("Sampler: Euler, Schedule type: Polyexponential", "Schedule type: 'Polyexponential'"),
        ("Sampler: Euler, Eta: 0.5", "Eta: '0.5' is an ancestral sampler's η; Euler takes none"),
        ("Sampler: Euler banana", "Sampler: unknown sampler 'Euler banana'"),
    ],
)
def test_names_minisd_lacks_are_refused(sampler_field, fragment):
    text = f"x\nSteps: 20, {sampler_field}, CFG scale: 7, Seed: 1, Size: 512x512"
    with pytest.raises(MinisdError) as info:
        GenerationParameters.from_text(text)
    assert fragment in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_fields_that_do_not_change_minisd_pictures():
    """A1111's version, its noise source (A1111's noise is another draw anyway) and old minisd paths are read
    without a word; a field neither side knows (an extension's) is returned for the caller to mention."""
    fields = parse_parameters("x\nSteps: 1, Sampler: Euler, CFG scale: 7, Version: v1.10.1, RNG: CPU, ENSD: 31337, "
                              "Weights: /home/me/sd.safetensors, ADetailer model: face_yolov8n.pt")  # fmt: skip
    assert check_fields(fields) == ["ADetailer model"]


def test_model_hashes_new_and_old(tmp_path):
    """A1111's short hash (10 hex digits of the file's SHA-256) and its old one (8 digits of the SHA-256 of the
    64 KiB at offset 1 MiB) both name a file; computed here from their definitions."""
    data = bytes(range(256)) * 8192  # 2 MiB
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    new, old = hashlib.sha256(data).hexdigest()[:10], hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert (file_hash(path), legacy_file_hash(path)) == (new, old)
    assert hash_matches(new, path) and hash_matches(old, path) and hash_matches(new.upper(), path)
    assert not hash_matches("0" * 10, path) and not hash_matches("0" * 8, path) and not hash_matches("xyz", path)


def test_large_files_hash_once_and_again_when_changed(tmp_path, monkeypatch):
    """A large file's SHA-256 is kept in the cache (path, size, mtime): hashed once, read back the next time without
    opening the file; a file changed in place (same size) is hashed again; a corrupt cache is ignored and rewritten;
    small files and hashes that skip a header never touch it."""
    monkeypatch.setenv("MINISD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hashes, "CACHE_FROM", 1 << 20)
    path = tmp_path / "big.ckpt"
    data = bytearray(bytes(range(256)) * 8192)  # 2 MiB
    path.write_bytes(data)
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: opened.append(str(p)) or real_open(p, *a, **k))
    assert file_hash(path) == hashlib.sha256(data).hexdigest()[:10] and opened.count(str(path)) == 1
    assert file_hash(path, digits=12) == hashlib.sha256(data).hexdigest()[:12] and opened.count(str(path)) == 1
    data[1000] ^= 1  # the same size; a later modification time
    path.write_bytes(data)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    assert file_hash(path) == hashlib.sha256(data).hexdigest()[:10] and opened.count(str(path)) == 2
    hashes.hash_cache_path().write_text("{not json")
    assert file_hash(path) == hashlib.sha256(data).hexdigest()[:10] and opened.count(str(path)) == 3
    assert json.loads(hashes.hash_cache_path().read_text())[str(path.resolve())]["size"] == len(data)
    small = tmp_path / "embedding.pt"
    small.write_bytes(b"x" * 1000)
    file_hash(small)
    assert str(small.resolve()) not in json.loads(hashes.hash_cache_path().read_text())


def test_find_weights_by_either_hash_and_by_plain_name(tmp_path, monkeypatch):
    """regenerate's search (minisd/locate.py): a file under --models-dir named by its 10- or 8-digit hash whatever
    its name, or by its name where no hash is recorded; a diffusers folder by its plain name only (a tampered
    "Model: ../x" looks nowhere else); one line naming where it looked otherwise."""
    from minisd import locate

    monkeypatch.setattr(locate, "default_model", lambda: None)  # not the nano model
    models = tmp_path / "models"
    (models / "sub").mkdir(parents=True)
    data = bytes(range(256)) * 8192
    (models / "sub" / "renamed.safetensors").write_bytes(data)
    (models / "other.ckpt").write_bytes(data[::-1])
    (models / "my-folder").mkdir()
    (tmp_path / "outside").mkdir()
    want = str(models / "sub" / "renamed.safetensors")
    for recorded in (hashlib.sha256(data).hexdigest()[:10], hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]):
        assert locate.find_weights("v1-5-pruned-emaonly", recorded, [models]) == (want, False)
    assert locate.find_weights("my-folder", None, [models]) == (str(models / "my-folder"), False)
    assert locate.find_weights("renamed", None, [models]) == (want, False)  # A1111 without its model hash
    assert locate.find_weights("org/name", None, [models]) == ("org/name", True)  # a hub id: the cache only
    for name, model_hash in (("../outside", None), ("x", "0" * 10), ("x", "0" * 8)):
        with pytest.raises(MinisdError, match=r"not in .*models: pass --checkpoint") as info:
            locate.find_weights(name, model_hash, [models])
        assert "\n" not in str(info.value)

"""Train the nano model from scratch: `python -m minisd.train all --run-dir runs/nano --out minisd-nano.safetensors`.

    python -m minisd.train vae --run-dir runs/nano/vae                    stage 1: the VAE
    python -m minisd.train diffusion --run-dir runs/nano/diffusion \\
        --vae runs/nano/vae/vae.safetensors                              stage 2: text encoder, then UNet
    python -m minisd.train all --run-dir runs/nano --out nano.safetensors   both, then copy the model file
    torchrun --nproc_per_node=2 -m minisd.train diffusion ...             stage 2 under DDP (gloo CPU / nccl GPU)
    torchrun --nproc_per_node=2 -m minisd.train all ...                   the VAE on rank 0, then stage 2 under DDP
    python -m minisd.train evaluate --model nano.safetensors --grid g.png  adherence, PSNR, a sample grid
    python -m minisd.train all ... --prediction-type v                    the same recipe, learning SD 2's v
    python -m minisd.train textual-inversion --out diamond.safetensors   teach the nano model "<diamond>", a new word
    python -m minisd.train lora --out diamond-lora.safetensors            teach it "diamond" with a LoRA

Every run resumes from its run directory's checkpoint.safetensors when there is one (run the same command again). The
defaults are the nano model's recipe; the seed fixes every random draw, so the same command on the same machine
and thread count gives the same weights.
"""

import argparse
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from minisd.arguments import ArgumentParser, positive_int  # the same checks and errors as `minisd`
from minisd.errors import MinisdError
from minisd.loading import check_device
from minisd.train.common import check_run_dir, init_distributed, read_log
from minisd.train.diffusion_training import DiffusionTrainingConfig, train_diffusion
from minisd.train.vae_training import VAETrainingConfig, train_vae


def _overrides(args: argparse.Namespace, prefix: str, names: tuple[str, ...]) -> dict:
    """The config fields given on the command line (prefix "vae_" for the VAE stage under `all`)."""
    values = {name: getattr(args, prefix + name, None) for name in names}
    return {name: value for name, value in values.items() if value is not None}


FIELDS = ("steps", "batch_size", "lr", "num_pictures", "seed", "checkpoint_every")


def _add_fields(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    flag = "--" + prefix.replace("_", "-")
    parser.add_argument(flag + "steps", dest=prefix + "steps", type=int, help="training steps")
    parser.add_argument(flag + "batch-size", dest=prefix + "batch_size", type=int, help="global batch size")
    parser.add_argument(flag + "lr", dest=prefix + "lr", type=float, help="AdamW learning rate")
    parser.add_argument(flag + "num-pictures", dest=prefix + "num_pictures", type=int, help="training pictures")
    parser.add_argument(flag + "seed", dest=prefix + "seed", type=int, help="the seed of every random draw")
    parser.add_argument(flag + "checkpoint-every", dest=prefix + "checkpoint_every", type=int)


def main(argv: list[str] | None = None) -> int:
    """Bad settings and files: one line on stderr and exit status 2, as in `minisd`'s own command line."""
    try:
        return _main(argv)
    except (MinisdError, FloatingPointError) as error:
        print(f"python -m minisd.train: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2


def prediction_type(text: str) -> str:
    """An argparse type: "epsilon", or "v" / "v_prediction" (SD 2's velocity target)."""
    names = {"epsilon": "epsilon", "eps": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction"}
    if text not in names:
        raise argparse.ArgumentTypeError(f"expected epsilon or v (v_prediction), got {text!r}")
    return names[text]


def _add_text_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prediction-type", type=prediction_type, help="what the UNet learns: epsilon (default, SD v1) or v "
        "(SD 2's velocity, v_prediction)",
    )  # fmt: skip
    parser.add_argument("--text-steps", type=int, help="steps of the text encoder's contrastive pretraining")
    parser.add_argument(
        "--train-text-encoder",
        action="store_true",
        help="train the text encoder on with the UNet (default: frozen after its pretraining, as SD v1's CLIP; "
        "with --text-steps 0, trained from scratch with the UNet)",
    )


def diffusion_config(args: argparse.Namespace) -> DiffusionTrainingConfig:
    """The nano recipe with the command line's changes."""
    config = replace(DiffusionTrainingConfig(), **_overrides(args, "", FIELDS))
    if args.text_steps is not None:
        config.text_pretraining = replace(config.text_pretraining, steps=args.text_steps)
    if args.train_text_encoder:
        config.freeze_text_encoder = False
    if args.prediction_type is not None:
        config.prediction_type = args.prediction_type
    return config


def _main(argv: list[str] | None) -> int:
    parser = ArgumentParser(prog="python -m minisd.train", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=positive_int, default=1, help="CPU threads (default 1: reproducible, and "
                        "faster than 2 on a shared 2-core machine)")  # fmt: skip
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    vae = commands.add_parser("vae", help="train the VAE")
    vae.add_argument("--run-dir", type=Path, required=True)
    _add_fields(vae)
    diffusion = commands.add_parser("diffusion", help="pretrain the text encoder, then train the UNet (VAE latents)")
    diffusion.add_argument("--run-dir", type=Path, required=True)
    diffusion.add_argument("--vae", type=Path, required=True, help="vae.safetensors from the vae stage")
    _add_fields(diffusion)
    _add_text_options(diffusion)
    both = commands.add_parser("all", help="vae, then diffusion, then copy the model file to --out")
    both.add_argument("--run-dir", type=Path, required=True, help="gets vae/ and diffusion/")
    both.add_argument("--out", type=Path, required=True, help="where the finished .safetensors goes")
    both.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    _add_fields(both)
    _add_fields(both, prefix="vae_")
    _add_text_options(both)
    both.add_argument("--guidance-seeds", type=int, default=4, help="pictures per caption when choosing the "
                      "default guidance scale (4; 0 keeps SD's 7.5)")  # fmt: skip
    evaluate = commands.add_parser("evaluate", help="held-out prompt adherence, VAE PSNR and a sample grid")
    evaluate.add_argument("--model", type=Path, help="a trained model file (default: the shipped nano model)")
    evaluate.add_argument("--seeds", type=positive_int, default=4, help="pictures per caption (4)")
    evaluate.add_argument("--steps", type=positive_int, default=25, help="sampling steps (25)")
    evaluate.add_argument("--sampler", default="DPM++ 2M", help="sampler name (DPM++ 2M)")
    evaluate.add_argument("--guidance", type=float, help="guidance scale (default: the model's)")
    evaluate.add_argument("--phrasings", action="store_true", help="also adherence per phrasing family on the "
                          "held-out scenes (over, beneath, left of, the, a full stop, ...)")  # fmt: skip
    evaluate.add_argument("--grid", type=Path, help="write a labelled sample grid here (a new .png)")
    evaluate.add_argument("--overwrite", action="store_true", help="replace an existing --grid file")
    evaluate.add_argument("--fast", action="store_true", help="measure the fast path: minisd.fast.make_fast, in "
                          "bfloat16 where the CPU computes it natively (as minisd generate --fast)")  # fmt: skip
    for name, what in (("textual-inversion", "learn a new word <diamond> for a new shape"), ("lora", "learn a "
                       "LoRA for the word diamond")):  # fmt: skip
        finetune = commands.add_parser(name, help=f"{what} from 48 pictures (train/concept.py, finetune.py)")
        finetune.add_argument("--out", type=Path, required=True, help="the file to write: .safetensors (textual "
                              "inversion: diffusers' format), or .pt (A1111's embedding)")  # fmt: skip
        finetune.add_argument("--model", type=Path, help="the model to teach (default: the shipped nano model)")
        finetune.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
        for field in ("steps", "batch_size", "seed", "num_vectors", "rank"):
            finetune.add_argument("--" + field.replace("_", "-"), type=positive_int)
        finetune.add_argument("--lr", type=float, help="AdamW learning rate (default: the method's)")
        finetune.add_argument("--initializer", help="textual inversion: the word v* starts from (square)")
        finetune.add_argument("--alpha", type=float, help="LoRA: alpha (default: the rank)")
        finetune.add_argument("--unet-only", action="store_true", help="LoRA: leave the text encoder as it is")
        finetune.add_argument("--preserve", type=int, help="pictures of the model's own training captions mixed "
                              "in (prior preservation, DreamBooth's; default 0)")  # fmt: skip
        finetune.add_argument("--eval-seeds", type=int, default=2, help="pictures per held-out caption before and "
                              "after (2; 0: no measurement)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.device is not None:
        check_device(args.device, "--device")
    if args.command == "evaluate":
        torch.set_num_threads(args.threads)
        return _evaluate(args)
    if args.command in ("textual-inversion", "lora"):
        torch.set_num_threads(args.threads)
        return _finetune(args)

    check_run_dir(args.run_dir)
    torch.set_num_threads(args.threads)
    distributed = init_distributed()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and distributed.world_size > 1:
        device = f"cuda:{distributed.local_rank}"

    def say(message: str) -> None:
        if distributed.is_main:  # one voice under torchrun
            print(message)

    if args.command == "all":  # every setting checked before the first stage starts, not after it
        replace(VAETrainingConfig(), **_overrides(args, "vae_", FIELDS)).check()
        diffusion_config(args).check(distributed.world_size)
        if args.out.exists() and not args.overwrite:
            raise MinisdError(f"--out {args.out} exists (--overwrite replaces it)")
        if args.out.suffix != ".safetensors" or not args.out.parent.is_dir():
            raise MinisdError(f"--out must be a .safetensors path in an existing folder, got {args.out}")
    start = time.perf_counter()

    if args.command == "vae" and distributed.world_size > 1:
        print("the vae stage runs in one process; start it without torchrun", file=sys.stderr)
        return 2
    if args.command in ("vae", "all") and distributed.is_main:  # under torchrun `all`: rank 0, the others wait
        prefix = "vae_" if args.command == "all" else ""
        config = replace(VAETrainingConfig(), **_overrides(args, prefix, FIELDS))
        run_dir = args.run_dir / "vae" if args.command == "all" else args.run_dir
        vae_path = train_vae(run_dir, config, device=device).path
        last = read_log(run_dir / "log.jsonl")[-1]
        say(f"vae: {vae_path} (step {last['step']}, l1 {last['l1']:.4f}, psnr {last['psnr']:.2f} dB)")
    distributed.barrier()  # (init_distributed's timeout outlasts the VAE stage)
    if args.command in ("diffusion", "all"):
        vae_path = args.vae if args.command == "diffusion" else args.run_dir / "vae" / "vae.safetensors"
        config = diffusion_config(args)
        run_dir = args.run_dir / "diffusion" if args.command == "all" else args.run_dir
        model_path = train_diffusion(run_dir, vae_path, config, device=device, distributed=distributed).path
        last = read_log(run_dir / "log.jsonl")[-1] if distributed.is_main else {}
        say(f"diffusion: {model_path} (step {last.get('step')}, loss {last.get('loss', float('nan')):.4f})")
        if args.command == "all" and distributed.is_main:
            partial = args.out.with_name(args.out.stem + ".partial.safetensors")  # --out appears only when done
            shutil.copyfile(model_path, partial)
            if args.guidance_seeds > 0:
                from minisd.loading import load_components
                from minisd.train.evaluate import choose_guidance, record_guidance

                components = load_components(partial, dtype=torch.float32)
                best, rates = choose_guidance(components, seeds=args.guidance_seeds)
                record_guidance(partial, best)
                table = ", ".join(f"{w:g}: {100 * r:.0f}%" for w, r in rates.items())
                say(f"guidance scale {best:g} (adherence on training captions by scale: {table})")
            os.replace(partial, args.out)
            say(f"model: {args.out}")
    say(f"done in {time.perf_counter() - start:.0f} s")
    if distributed.world_size > 1:
        torch.distributed.destroy_process_group()
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from minisd.api import default_model
    from minisd.fast import fast_dtype, make_fast
    from minisd.loading import load_components
    from minisd.train import evaluate, shapes

    model = args.model or default_model()
    if model is None or not Path(model).is_file():
        raise MinisdError(f"no model file {model}; pass --model")
    if args.grid is not None:  # before any work: the grid comes last
        if args.grid.suffix.lower() != ".png" or not args.grid.parent.is_dir():
            raise MinisdError(f"--grid must be a .png path in an existing folder, got {args.grid}")
        if (args.grid.exists() or args.grid.is_symlink()) and not args.overwrite:
            raise MinisdError(f"--grid {args.grid} exists (--overwrite replaces it)")
    dtype = (fast_dtype("cpu") or torch.float32) if args.fast else torch.float32
    components = load_components(model, dtype=dtype)
    if args.fast:
        for network in (components.unet, components.vae, components.text_encoder):
            make_fast(network)
    guidance = components.guidance_scale if args.guidance is None else args.guidance
    sampling = {"num_inference_steps": args.steps, "sampler": args.sampler, "guidance_scale": guidance}
    print(f"{model}: {args.seeds} pictures per caption, {args.sampler}, {args.steps} steps, guidance {guidance:g}"
          + (f", fast in {str(dtype).removeprefix('torch.')}" if args.fast else ""))  # fmt: skip
    for split, captions in (("held-out", shapes.heldout_captions()), ("training", evaluate.training_sample())):
        result = evaluate.adherence(components, captions, seeds=args.seeds, **sampling)
        print(
            f"{split} captions: {result.accepted}/{result.total} = {100 * result.rate:.1f}% adherence "
            f"({len(captions)} captions; failed on {result.failures or 'nothing'}; {result.seconds:.3f} s/picture "
            "batched)"
        )
    if args.phrasings:
        print("held-out scenes by phrasing family:")
        for family, captions in evaluate.phrasing_families().items():
            result = evaluate.adherence(components, captions, seeds=args.seeds, **sampling)
            failed = ", ".join(f"{n} {part}" for part, n in result.failures.items()) or "none"
            print(f"  {family:18} {100 * result.rate:5.1f}% ({result.accepted}/{result.total}; failed: {failed})")
    psnr_components = load_components(model, dtype=torch.float32) if args.fast else components  # the VAE as trained
    print(f"VAE reconstruction PSNR on 512 held-out pictures: {evaluate.vae_psnr(psnr_components):.2f} dB")
    if args.grid is not None:
        captions = evaluate.sample_captions_for_grid()
        pictures = evaluate.generate(components, captions, seed=0, **sampling)
        with open(args.grid, "wb" if args.overwrite else "xb") as file:  # "x": never replaces a file made meanwhile
            evaluate.labelled_grid(pictures, captions).save(file, format="PNG")
        print(f"grid: {args.grid}")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    """Measure (the base model, the plain word), train, write --out, load it back with the public loaders, measure
    again."""
    from minisd.api import default_model
    from minisd.loading import load_components
    from minisd.train import concept
    from minisd.train.finetune import FinetuneConfig, train_lora, train_textual_inversion

    names = ("steps", "batch_size", "seed", "num_vectors", "rank", "lr", "initializer", "preserve")
    given = {k: getattr(args, k) for k in names}
    config = replace(FinetuneConfig(), **{k: v for k, v in given.items() if v is not None})
    if args.alpha is not None or args.rank is not None:
        config.alpha = args.alpha if args.alpha is not None else float(config.rank)
    config.text_encoder = not args.unet_only
    config.check()
    if args.out.exists() and not args.overwrite:
        raise MinisdError(f"--out {args.out} exists (--overwrite replaces it)")
    suffixes = (".safetensors", ".pt") if args.command == "textual-inversion" else (".safetensors",)
    if args.out.suffix not in suffixes or not args.out.parent.is_dir():
        raise MinisdError(f"--out must be a {' or '.join(suffixes)} path in an existing folder, got {args.out}")
    model = args.model or default_model()
    components = load_components(model, dtype=torch.float32)
    if args.eval_seeds > 0:
        before = concept.adherence(components, concept.CONCEPT, args.eval_seeds)
        print(f"before ({concept.CONCEPT}): {_line(before)}")
    start = time.perf_counter()
    train = train_textual_inversion if args.command == "textual-inversion" else train_lora
    losses = train(components, args.out, config)
    seconds = time.perf_counter() - start
    size = args.out.stat().st_size
    n = min(20, len(losses))  # the mean of the first and last n steps' losses
    print(f"{args.command}: {config.steps} steps in {seconds:.0f} s (loss {sum(losses[:n]) / n:.4f} -> "
          f"{sum(losses[-n:]) / n:.4f}); wrote {args.out} ({size:,} bytes)")  # fmt: skip
    if args.eval_seeds > 0:
        from minisd.api import StableDiffusion

        pipe = StableDiffusion.from_pretrained(model)  # a fresh model, the file read back by the public loaders
        if args.command == "textual-inversion":
            word = pipe.load_textual_inversion(args.out)
        else:
            pipe.load_lora_weights(args.out)
            word = concept.CONCEPT
        after = concept.adherence(pipe.components, word, args.eval_seeds)
        print(f"after ({word}): {_line(after)}")
        if args.command == "lora":  # what the LoRA does to the nano model's own held-out captions
            from minisd.train import evaluate, shapes

            sampling = {
                "num_inference_steps": 25,
                "sampler": "DPM++ 2M",
                "guidance_scale": pipe.components.guidance_scale,
            }
            own = evaluate.adherence(pipe.components, shapes.heldout_captions(), seeds=args.eval_seeds, **sampling)
            print(f"the model's own held-out captions with the LoRA: {_line(own)}")
    return 0


def _line(result) -> str:
    return (
        f"{result.accepted}/{result.total} = {100 * result.rate:.1f}% drawn right (failed: {result.failures or 'none'})"
    )


if __name__ == "__main__":
    sys.exit(main())

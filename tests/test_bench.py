"""The speed benchmark runs end to end on the CPU at a tiny config and prints a table that parses; its two sides
compute the same image. No timing assertions: CI machines are too noisy for them."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import speed
from benchmarks.__main__ import main
from minisd.fast import fast_dtype

CASES = ["text_encode", "unet_step", "vae_decode", "image_2"]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the tiny models run ~1,000 small ops, and on a shared 2-core CI machine each op's
    two-thread barrier can wait a whole scheduler slice for a descheduled thread (seconds per tiny UNet step)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def parse_table(out: str) -> dict[tuple[str, str], list[float]]:
    """{(case, runner): [seconds, x diffusers, peak MB, error]} from the printed table."""
    lines = out.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["case", "runner", "dtype"])
    rows = {}
    for line in lines[header + 1 :]:
        case, runner, _dtype, *numbers = line.split()
        rows[case, runner] = [float(x) for x in numbers]
    return rows


@pytest.mark.parametrize("fast", [False, True], ids=["eager", "fast"])
def test_speed_table_on_cpu(capsys, fast):
    argv = ["--model", "tiny", "--size", "64", "--steps", "2", "--repeat", "2"] + (["--fast"] if fast else [])
    main(argv)
    out = capsys.readouterr().out
    assert "minisd vs diffusers: model tiny, cpu fp32, 64x64 px, median of 2" in out
    assert "CPU: " in out and "load average" in out
    rows = parse_table(out)
    runners = ["minisd", "diffusers"]
    if fast:
        runners.append("minisd-fast")
        if fast_dtype("cpu") == torch.bfloat16:
            runners.append("diffusers-bf16")
    assert list(rows) == [(case, runner) for case in CASES for runner in runners]
    in_bf16 = {"diffusers-bf16"} | ({"minisd-fast"} if fast_dtype("cpu") == torch.bfloat16 else set())
    for (case, runner), (seconds, ratio, mb, error) in rows.items():
        assert seconds > 0 and ratio > 0 and mb >= 0, (case, runner)  # tiny models may add no measurable memory
        # The numerical cost beside the time. float32 runners agree to float32 rounding (1e-5: see
        # test_both_sides_compute_the_same_image). bfloat16 rounds each op's result to 2⁻⁹ of itself: through the tiny
        # networks that came to 1-3 % of the output's largest value per call, and to 11-12 % for both libraries after
        # 2 guided steps (guidance multiplies the text-minus-empty difference by 7.5, and its rounding with it).
        # So minisd's bfloat16 must be about as close as diffusers' own bfloat16 (2× leaves room for a different
        # summation order), which an O(1) slip is not.
        assert error < (0.25 if runner in in_bf16 else 1e-5), (case, runner, error)
        if runner == "minisd-fast" and "diffusers-bf16" in runners:
            assert error <= 2 * rows[case, "diffusers-bf16"][3] + 1e-3, (case, error, rows[case, "diffusers-bf16"])


def test_cases_subset_and_bad_arguments(capsys):
    main(["--model", "tiny", "--size", "64", "--repeat", "1", "--cases", "unet_step"])
    assert list(parse_table(capsys.readouterr().out)) == [("unet_step", "minisd"), ("unet_step", "diffusers")]
    with pytest.raises(SystemExit, match="--size must be a multiple of 8"):
        main(["--model", "tiny", "--size", "60"])
    with pytest.raises(SystemExit, match="unknown case 'unet'"):
        main(["--model", "tiny", "--size", "64", "--repeat", "1", "--cases", "unet"])


def test_both_sides_compute_the_same_image():
    """The whole-image case compares like with like: the same weights, inputs and loop give the same image."""
    ours, ref = speed.build_twins("tiny", seed=1)
    g = torch.Generator().manual_seed(1)
    context = torch.randn(2, 77, ours["unet"].config.cross_attention_dim, generator=g)
    noise = torch.randn(1, 4, 8, 8, generator=g)
    with torch.inference_mode():
        image = speed.denoise_and_decode(ours["unet"], ours["vae"].decode, context, noise, steps=3)
        image_ref = speed.denoise_and_decode(
            lambda x, t, c: ref["unet"](x, t, encoder_hidden_states=c).sample,
            lambda z: ref["vae"].decode(z).sample,
            context,
            noise,
            steps=3,
        )
    assert image.shape == (1, 3, 64, 64)
    # Both sides run the same fp32 CPU kernels in the same order (the UNet and VAE parity tests measure 0 error);
    # 1e-5 of the image's scale leaves room for a different summation order only (measured: 1.3e-6, from the
    # tiny VAE and UNet summing in another order somewhere through 3 steps and the decode).
    torch.testing.assert_close(image, image_ref, rtol=0, atol=1e-5 * image_ref.abs().max().item())


def test_load_subcommand_still_parses(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["load", "--help"])
    assert exit_info.value.code == 0
    assert "--repeat" in capsys.readouterr().out


def test_the_old_name_runs_the_same_command():
    """`python -m minisd.bench ...` (the name commands already written down use) hands on to `python -m benchmarks`."""
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-m", "minisd.bench", "load", "--help"], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "usage: python -m benchmarks load" in result.stdout and "--repeat" in result.stdout

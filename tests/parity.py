"""Shared tools of the parity tests: compare an output with the reference's, and on failure name the first
module whose output diverges (hooked at the same dotted path in both models, which share their module trees)."""

from collections.abc import Callable

import torch
from torch import Tensor, nn

# (test, component, measured max |error| / scale, bar) rows, printed at the end of the run by conftest.py.
REPORT: list[tuple[str, str, float, float]] = []


def relative_error(ours: Tensor, ref: Tensor) -> float:
    """max |ours − ref| / max |ref|: the error relative to the output's scale."""
    ours, ref = ours.detach().double(), ref.detach().double()
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _record_outputs(model: nn.Module, run: Callable[[], object]) -> dict[str, Tensor]:
    """Run `run()` with a forward hook on every submodule; return {dotted name: first tensor output} in call order."""
    outputs: dict[str, Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(_module, _args, out, name=name):
            while isinstance(out, (tuple, list)) and out:
                out = out[0]
            if isinstance(out, Tensor) and name not in outputs:
                outputs[name] = out.detach()

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return outputs


def first_divergence(
    ours: nn.Module, ref: nn.Module, run_ours: Callable[[], object], run_ref: Callable[[], object], rel_tol: float
) -> str:
    """The dotted path of the first module (in minisd's call order) whose output differs from the reference's."""
    got = _record_outputs(ours, run_ours)
    want = _record_outputs(ref, run_ref)
    for name, out in got.items():
        if name in want and out.shape == want[name].shape and relative_error(out, want[name]) > rel_tol:
            return f"{name} (relative error {relative_error(out, want[name]):.3g})"
    return "none found at module level (the difference is in code between modules)"


def assert_parity(
    test: str,
    component: str,
    ours_out: Tensor,
    ref_out: Tensor,
    rel_tol: float,
    models: tuple[nn.Module, nn.Module, Callable[[], object], Callable[[], object]] | None = None,
) -> float:
    """Assert max |ours − ref| <= rel_tol · max |ref|; record the error for the summary; on failure name where it
    starts. `models` = (ours, ref, run_ours, run_ref) enables the divergence search."""
    assert ours_out.shape == ref_out.shape, f"{component}: shape {tuple(ours_out.shape)} != {tuple(ref_out.shape)}"
    assert torch.isfinite(ours_out).all(), f"{component}: non-finite output"
    err = relative_error(ours_out, ref_out)
    REPORT.append((test, component, err, rel_tol))
    if err > rel_tol:
        where = first_divergence(*models, rel_tol=rel_tol) if models else "(no models given to search)"
        raise AssertionError(f"{component}: max |error| / scale = {err:.3g} > {rel_tol:g}; first divergent: {where}")
    return err

"""Input checks shared by the ops. Every failure is a ``ValueError`` that names the
argument and says what was expected."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_float(name: str, t: torch.Tensor, *, min_dim: int = 0) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected a float16/bfloat16/float32/float64 tensor, got {t.dtype}")
    if t.dim() < min_dim:
        raise ValueError(f"{name}: expected at least {min_dim} dimensions, got shape {_shape(t)}")


def check_int(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in INT_DTYPES:
        raise ValueError(f"{name}: expected an integer tensor (e.g. int64), got {t.dtype}")


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int], what: str) -> None:
    if _shape(t) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)} ({what}), got {_shape(t)}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devices = {k: v.device for k, v in tensors.items() if v is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise ValueError(f"tensors must share one device, got {listed}")


def _compiling() -> bool:
    fn = getattr(torch.compiler, "is_compiling", None)
    if fn is None:  # torch < 2.3
        from torch import _dynamo

        fn = _dynamo.is_compiling
    return bool(fn())


def should_validate(validate: bool | None, *tensors: torch.Tensor | None) -> bool:
    """Whether to run the checks that need a value from the device (one host sync each).

    ``validate=None`` (the default of every op): yes when all tensors are on the CPU (a check
    costs no sync there), no on a GPU and while ``torch.compile`` traces (a sync would serialise
    the launch queue, block CUDA graphs and break the graph). ``True`` / ``False`` force it.
    """
    if validate is None:
        if _compiling():
            return False
        return all(t.device.type == "cpu" for t in tensors if t is not None)
    return bool(validate)


def bad_targets(
    targets: torch.Tensor, vocab_size: int, ignore_index: int, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Elementwise, on the device (no sync): True where a target is outside ``[0, vocab_size)``,
    is not ``ignore_index`` and (if given) ``valid`` is True."""
    bad = ((targets < 0) | (targets >= vocab_size)) & (targets != ignore_index)
    return bad if valid is None else bad & valid


def screen_targets(
    targets: torch.Tensor,
    vocab_size: int,
    ignore_index: int,
    validate: bool | None,
    valid: torch.Tensor | None = None,
    *,
    name: str = "targets",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The target-range check of every op, with or without a host sync.

    Validating (see :func:`should_validate`): raises ``ValueError`` on a bad target and returns
    ``(targets, None)``. Not validating: returns ``(targets with bad ones set to ignore_index,
    bad)`` so the kernels never index out of range; the op then writes NaN log-probs where
    ``bad`` is True (and treats those tokens as ignored: zero gradient, masked)."""
    if should_validate(validate, targets):
        check_targets(name, targets, vocab_size, ignore_index, valid)
        return targets, None
    bad = bad_targets(targets, vocab_size, ignore_index, valid)
    return torch.where(bad, torch.full_like(targets, ignore_index), targets), bad


def mark_bad(x: torch.Tensor | None, bad: torch.Tensor | None) -> torch.Tensor | None:
    """``x`` with NaN where ``bad`` (same shape) is True; ``x`` itself when there is nothing to mark."""
    if x is None or bad is None:
        return x
    return torch.where(bad, torch.full((), float("nan"), dtype=x.dtype, device=x.device), x)


def check_targets(
    name: str, targets: torch.Tensor, vocab_size: int, ignore_index: int, valid: torch.Tensor | None = None
) -> None:
    """Targets must lie in ``[0, vocab_size)`` except ``ignore_index`` and positions where
    ``valid`` is False. One small reduction (a device sync on GPU)."""
    if targets.numel() == 0:
        return
    bad = bad_targets(targets, vocab_size, ignore_index, valid)
    if bool(bad.any()):  # the only sync; the example value is looked up on failure alone
        example = int(targets[bad].flatten()[0])
        raise ValueError(
            f"{name}: expected token ids in [0, {vocab_size}) or ignore_index={ignore_index}, found {example}"
        )


def check_temperature(temperature: float) -> float:
    try:
        value = float(temperature)
    except (TypeError, ValueError):
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
    return value


def check_lam_eps(lam: float, eps_w: float) -> tuple[float, float]:
    try:
        lam_f, eps_f = float(lam), float(eps_w)
    except (TypeError, ValueError):
        raise ValueError(f"lam, eps_w: expected numbers, got {lam!r}, {eps_w!r}") from None
    if not (0.0 <= lam_f <= 1.0):
        raise ValueError(f"lam: expected a number in [0, 1], got {lam!r}")
    if not (0.0 <= eps_f < 1.0):
        raise ValueError(f"eps_w: expected a number in [0, 1), got {eps_w!r}")
    return lam_f, eps_f


def check_mask(mask: torch.Tensor | None, shape: Sequence[int]) -> torch.Tensor | None:
    """A mask of any real dtype, as bool: ``bool`` as given, integer or float ``mask != 0``
    (the 0/1 ``completion_mask`` / ``response_mask`` tensors of TRL and verl; nonzero counts).
    Elementwise, no host sync."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask: expected a tensor (bool, integer or float; nonzero = token counts) or None, "
                         f"got {type(mask).__name__}")  # fmt: skip
    if mask.is_complex():
        raise ValueError(f"mask: expected a bool, integer or float tensor (nonzero = token counts), got {mask.dtype}")
    check_shape("mask", mask, shape, "one entry per token")
    return mask if mask.dtype == torch.bool else mask != 0


def check_advantages(advantages: torch.Tensor, token_shape: Sequence[int]) -> None:
    """Advantages are per sequence (``token_shape[:-1]``) or per token (``token_shape``)."""
    check_float("advantages", advantages)
    shape = _shape(advantages)
    if shape not in (tuple(token_shape[:-1]), tuple(token_shape)):
        raise ValueError(
            f"advantages: expected shape {tuple(token_shape[:-1])} (one per sequence) or "
            f"{tuple(token_shape)} (one per token), got {shape}"
        )

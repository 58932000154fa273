"""Nothing non-finite is ever saved: the names of a state's non-finite tensors, the refusal every rank raises
together, and the snapshot of a model's buffers that lets a skipped update (`--skip-nonfinite`) leave no trace.

Light at import: torch is loaded when a tensor is looked at."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from trainer.config import UserError

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

SHOWN = 3  # names in the one line; the count says how many more


def nonfinite_names(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity (a DTensor is checked on its local shard)."""
    import torch

    bad = []
    for name, tensor in named:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        if torch.is_floating_point(local) and local.numel() and not bool(torch.isfinite(local.detach()).all()):
            bad.append(name)
    return bad


def refuse_nonfinite(accelerator: Accelerator | None, bad: list[str], what: str, step: int, kept: str) -> None:
    """Every rank calls this with its own findings: if any rank found a non-finite tensor, all raise the same
    UserError (a rank that saved alone, or raised alone, would leave the others hanging in the next collective).

    `what`: what was about to be written; `kept`: which earlier files stay as they were."""
    import torch

    failed = float(bool(bad))
    if accelerator is not None and accelerator.num_processes > 1:
        flag = torch.tensor(failed, device=accelerator.device)
        failed = accelerator.reduce(flag, reduction="sum").item()  # Collective: every rank calls it.
    if not failed:
        return
    names = ", ".join(bad[:SHOWN]) + (f" and {len(bad) - SHOWN} more" if len(bad) > SHOWN else "")
    found = f"{len(bad)} non-finite tensor(s) ({names})" if bad else "non-finite tensors on another process"
    raise UserError(
        f"step {step}: refusing to save {what}: {found}; {kept}; the run diverged: start a new run with a lower "
        "--lr or with --clip-grad (--resume refuses both: they change what the run computes)"
    )


class BufferSnapshot:
    """A copy of a model's buffers (BatchNorm running statistics, their batch counts) taken before the first forward
    of an accumulation window, restored when that window's update is skipped: the forwards had already moved them.

    One copy into buffers allocated once: a few hundred kB for a ResNet-50, copied once per optimizer step."""

    def __init__(self, model: torch.nn.Module):
        import torch

        self.buffers = list(model.buffers())
        self.saved = [torch.empty_like(b) for b in self.buffers]
        self.taken = False

    def take(self) -> None:
        """Copy the buffers, unless this window's copy is already taken."""
        import torch

        if not self.taken and self.buffers:
            torch._foreach_copy_(self.saved, self.buffers)
        self.taken = True

    def restore(self) -> None:
        """Put the window's copy back (the update is skipped); the next window takes a new one."""
        import torch

        if self.taken and self.buffers:
            with torch.no_grad():
                torch._foreach_copy_(self.buffers, self.saved)
        self.taken = False

    def release(self) -> None:
        """The window's update went through: the next window takes a new copy."""
        self.taken = False

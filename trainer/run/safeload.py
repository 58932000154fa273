"""Safe loading of checkpoints: every pickle-format file is read as plain data before accelerate or torch loads it,
so a payload that would run code is refused, never executed. Also routes accelerate's own loading of registered
objects through its weights-only reader (`custom_states_weights_only`)."""

from __future__ import annotations

import pickle
from contextlib import contextmanager
from pathlib import Path

import torch

from trainer.config import UserError


def check_safe(path: Path, hint: str = "") -> None:
    """Load every pickle-format file of a checkpoint as plain data (torch.load weights_only=True with accelerate's
    numpy allow-list) before accelerate loads it: a payload that would run code is refused, never executed, and a
    truncated file is reported here instead of being skipped (accelerate ignores unreadable RNG states silently)."""
    from accelerate.utils import load

    for metadata in sorted(Path(path).glob("*/.metadata")):  # sharded (FSDP) state: torch.distributed.checkpoint
        try:
            check_distcp(metadata.parent)
        except Exception as e:
            raise UserError(f"--resume: {metadata.parent} is unreadable or unsafe ({type(e).__name__}); {hint}") from e
    for file in sorted(Path(path).iterdir()):
        if file.suffix not in (".bin", ".pkl", ".pt", ".pth"):
            continue  # safetensors and JSON cannot carry code
        try:
            load(file, map_location="cpu")
        except Exception as e:  # UnpicklingError for forbidden globals; EOFError, RuntimeError for torn files
            unsafe = "weights only" in str(e).lower() or "unsupported global" in str(e).lower()
            what = (
                "holds pickled objects that could run code: refused"
                if unsafe
                else f"is unreadable ({type(e).__name__})"
            )
            raise UserError(f"--resume: {file} {what}; {hint}".rstrip("; ")) from e


class _DistcpMetadataUnpickler(pickle.Unpickler):
    """Unpickles a torch.distributed.checkpoint `.metadata` file (which torch reads with plain pickle) allowing
    only the plain-data classes such a file holds."""

    def find_class(self, module: str, name: str):
        import torch.distributed.checkpoint.filesystem as dcp_filesystem

        allowed = (
            module == "torch.distributed.checkpoint.metadata"
            or (module == "torch.distributed.checkpoint.filesystem" and name == "_StorageInfo")
            or (module == "torch.serialization" and name == "_get_layout")
            or (module == "pathlib" and name in ("Path", "PosixPath", "PurePosixPath", "WindowsPath"))
            or (module == "collections" and name == "OrderedDict")
            or (module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)))
        )
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not plain checkpoint metadata")
        if module == "torch.distributed.checkpoint.filesystem":
            return dcp_filesystem._StorageInfo
        return super().find_class(module, name)


def check_distcp(folder: Path) -> None:
    """Check a torch.distributed.checkpoint folder as plain data before torch loads it: torch reads its `.metadata`
    with plain pickle and its non-tensor entries (e.g. optimizer hyperparameters) with torch.load(weights_only=False).
    Here the metadata goes through an allow-list and every such entry through torch.load(weights_only=True)."""
    import io

    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    with open(folder / ".metadata", "rb") as f:
        metadata = _DistcpMetadataUnpickler(f).load()
    for index, info in (metadata.storage_data or {}).items():
        if isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            with open(folder / info.relative_path, "rb") as f:
                f.seek(info.offset)
                torch.load(io.BytesIO(f.read(info.length)), map_location="cpu", weights_only=True)


@contextmanager
def custom_states_weights_only():
    """accelerate.load_state reads registered objects (EMA, timm schedulers, ...) with weights_only=False, i.e. full
    pickle. Route them through accelerate's weights-only `load` for the duration of our load_state call."""
    import accelerate.accelerator as accelerator_module
    from accelerate.utils import load

    original = accelerator_module.load_custom_state

    def load_custom_state(obj, path: str, index: int = 0) -> None:
        obj.load_state_dict(load(f"{path}/custom_checkpoint_{index}.pkl", map_location="cpu"))

    accelerator_module.load_custom_state = load_custom_state
    try:
        yield
    finally:
        accelerator_module.load_custom_state = original

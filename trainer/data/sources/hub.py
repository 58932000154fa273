"""HF hub dataset ids (`--data user/name`): from the local HF cache, or fetched with --allow-download."""

from __future__ import annotations

from trainer.config import UserError
from trainer.data.sources.builtin import BUILTIN
from trainer.data.sources.standard import Source


def hub_description(name: str, config_name: str | None) -> str:
    """How a hub id is named in the run's records: `hub:user/name[/config]` (streams prefix `stream:`)."""
    return f"hub:{name}" + (f"/{config_name}" if config_name else "")


def load_hub(name: str, config_name: str) -> Source:
    """A hub id's splits as they are (standardised after); offline, only what the local HF cache holds."""
    import datasets

    try:
        loaded = datasets.load_dataset(name, config_name or None)
    except ConnectionError as e:  # raised offline for ids missing from the cache
        raise UserError(
            f"--data {name}: not a built-in name ({', '.join(BUILTIN)}), a path, or a dataset in the local HF cache; "
            "run once with --allow-download to fetch it from the hub"
        ) from e
    except Exception as e:  # hub, config and script errors all mean: cannot load this id
        raise UserError(f"--data {name}: cannot load from the HF hub ({type(e).__name__}: {e})".split("\n")[0]) from e
    return Source(dict(loaded), [], hub_description(name, config_name))

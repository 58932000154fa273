"""FSDP support that needs no process group: the block classes FSDP wraps, grad checkpointing, refusals, and the
plain-data check of sharded checkpoints."""

from __future__ import annotations

import pytest
import timm
import torch

from trainer.config import UserError, build_config
from trainer.train.launch import build_accelerator, check_fsdp_options
from trainer.train.model import block_classes, build_model, mark_fsdp_blocks


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("vit_large_patch16_224", ["Block"]),  # `blocks`
        ("eva02_tiny_patch14_224", ["EvaBlock"]),
        ("swin_tiny_patch4_window7_224", ["SwinTransformerBlock"]),  # `layers`, each stage with its `blocks`
        ("convnext_atto", ["ConvNeXtBlock"]),  # `stages` with `blocks`
        ("efficientnet_b0", ["DepthwiseSeparableConv", "InvertedResidual"]),  # `blocks` of plain Sequential stages
        ("resnet10t", []),  # layer1..4: no blocks named as such; FSDP then shards the model as one unit
    ],
)
def test_block_classes_found_from_the_timm_model(name, expected):
    with torch.device("meta"):  # structure only, no weights
        model = timm.create_model(name)
    assert block_classes(model) == expected
    # Every name resolves to a module class of the model, as accelerate's wrap policy requires.
    assert all(any(type(m).__name__ == cls for m in model.modules()) for cls in expected)


def test_mark_fsdp_blocks_sets_what_accelerates_wrap_policy_reads():
    from accelerate.utils import FullyShardedDataParallelPlugin
    from timm.models.vision_transformer import Block

    model = timm.create_model("test_vit", num_classes=3, img_size=32)
    assert mark_fsdp_blocks(model) == ["Block"]
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    plugin.set_auto_wrap_policy(model)  # what Accelerator.prepare does before fully_shard
    assert plugin.auto_wrap_policy.keywords["transformer_layer_cls"] == {Block}


def test_grad_checkpointing_gives_the_same_gradients():
    cfg = build_config({"model": {"model": "test_vit", "grad_checkpointing": True}}).model
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model(
            build_config({"model": {"model": "test_vit"}}).model if not checkpointing else cfg, 5, 3, 32
        )
        assert model.grad_checkpointing is checkpointing
        model(x).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_fsdp_refuses_sync_bn():
    with pytest.raises(UserError, match="--sync-bn does not work with FSDP"):
        check_fsdp_options(build_config({"model": {"sync_bn": True}}))
    check_fsdp_options(build_config({"optim": {"ema": True}}))  # the rest passes; the EMA is sharded too


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_fsdp_launch_that_did_not_get_fsdp_is_refused(monkeypatch):
    """What `accelerate launch --config_file accelerate_configs/fsdp.yaml` sets; on a CPU Accelerate ignores it."""
    for key, value in {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}.items():
        monkeypatch.setenv(key, value)
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine Accelerate does set up FSDP")
    with pytest.raises(UserError, match=r"the launch asked for FSDP but Accelerate set up NO on cpu \(it shards only"):
        build_accelerator(build_config({"run": {"tracker": "none"}}))


class _Payload:
    """Unpickles as a call to open(marker, "w"): full pickle creates the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_sharded_checkpoint_is_checked_as_plain_data(tmp_path):
    """torch.distributed.checkpoint reads `.metadata` with plain pickle and non-tensor entries with
    weights_only=False; check_distcp reads both as plain data first and refuses code, without running it."""
    import pickle

    import torch.distributed.checkpoint as dcp

    from trainer.run.safeload import check_distcp

    good = tmp_path / "good"
    dcp.save(
        {"w": torch.arange(4.0), "hyper": {"lr": 0.1, "betas": (0.9, 0.999)}}, checkpoint_id=str(good), no_dist=True
    )
    check_distcp(good)  # tensors and plain values pass

    marker = tmp_path / "pwned"
    evil_entry = tmp_path / "evil_entry"
    dcp.save({"w": torch.zeros(1), "x": _Payload(str(marker))}, checkpoint_id=str(evil_entry), no_dist=True)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):
        check_distcp(evil_entry)
    evil_metadata = tmp_path / "evil_metadata"
    evil_metadata.mkdir()
    (evil_metadata / ".metadata").write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(pickle.UnpicklingError, match=r"io\.open is not plain checkpoint metadata"):
        check_distcp(evil_metadata)
    assert not marker.exists()

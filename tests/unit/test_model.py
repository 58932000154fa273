"""timm model creation, safe weight loading, and the SyncBatchNorm decision and conversion."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import BatchNormAct2d, SyncBatchNormAct
from timm.layers import convert_sync_batchnorm as timm_convert_sync_batchnorm

from trainer.config import ModelConfig, UserError
from trainer.train.model import apply_sync_bn, build_model, decide_sync_bn, has_batchnorm, load_weights, size_kwargs

# Small timm model (~0.4 M parameters) whose norm layers are timm's BatchNormAct2d (with Hardswish).
BN_ACT_MODEL = "lcnet_035"


def _bn_act_layers(model: torch.nn.Module) -> dict[str, BatchNormAct2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, BatchNormAct2d)}


@pytest.fixture(scope="module")
def bn_act_model() -> torch.nn.Module:
    model = timm.create_model(BN_ACT_MODEL, pretrained=False, num_classes=10)
    layers = _bn_act_layers(model)
    # Preconditions: the model really has BatchNorm+activation layers with a non-trivial activation.
    assert layers
    assert any(not isinstance(m.act, torch.nn.Identity) for m in layers.values())
    return model


@pytest.mark.parametrize(
    ("requested", "num_processes", "device_type", "applied", "why"),
    [
        (False, 2, "cuda", False, "not requested"),
        (True, 1, "cuda", False, "one process"),
        (True, 2, "cpu", False, "only on CUDA"),
        (True, 2, "cuda", True, "2 processes on CUDA"),
    ],
)
def test_decide_sync_bn(requested, num_processes, device_type, applied, why):
    decision = decide_sync_bn(requested, num_processes, device_type)
    assert decision.applied is applied
    assert why in decision.reason


def test_apply_sync_bn_skipped_on_cpu_returns_model_unchanged(bn_act_model):
    model, decision = apply_sync_bn(bn_act_model, True, 2, "cpu")
    assert model is bn_act_model
    assert not decision.applied
    assert has_batchnorm(model)
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())


def test_apply_sync_bn_converts_and_keeps_activations():
    # Conversion is pure module surgery and runs on CPU; only SyncBatchNorm's training forward needs CUDA.
    original = timm.create_model(BN_ACT_MODEL, pretrained=False, num_classes=10)
    acts = {name: type(m.act) for name, m in _bn_act_layers(original).items()}
    model, decision = apply_sync_bn(original, True, 2, "cuda")
    assert decision.applied
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, torch.nn.SyncBatchNorm) for m in norms)
    converted = dict(model.named_modules())
    for name, act_type in acts.items():
        assert isinstance(converted[name], SyncBatchNormAct)
        assert type(converted[name].act) is act_type


def test_torch_converter_drops_timm_activation_but_timm_converter_keeps_it():
    """Why model.py uses timm's converter: torch's turns BatchNormAct2d into a SyncBatchNorm whose forward
    never calls the activation."""
    torch.manual_seed(0)
    bn_act = BatchNormAct2d(4, act_layer=torch.nn.ReLU).eval()
    x = torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        expected = bn_act(x)
        by_torch = torch.nn.SyncBatchNorm.convert_sync_batchnorm(torch.nn.Sequential(bn_act))[0].eval()
        by_timm = timm_convert_sync_batchnorm(torch.nn.Sequential(bn_act))[0].eval()
        assert type(by_torch) is torch.nn.SyncBatchNorm  # plain: its forward has no activation
        assert isinstance(by_timm, SyncBatchNormAct)
        assert expected.min() >= 0  # ReLU applied
        assert by_torch(x).min() < 0  # activation silently gone
        torch.testing.assert_close(by_timm(x), expected)


def test_unknown_model_suggests_close_names():
    with pytest.raises(UserError, match=r"--model 'resnet181' is not a timm model; did you mean .*\bresnet18\b"):
        build_model(ModelConfig(model="resnet181"), num_classes=10, in_chans=1)


def test_build_model_classes_and_channels():
    model = build_model(ModelConfig(model="resnet10t"), num_classes=10, in_chans=1).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 32, 32)).shape == (1, 10)


@pytest.fixture(scope="module")
def saved_resnet(tmp_path_factory):
    """A resnet10t (5 classes, 1 channel) saved as safetensors, and its state dict."""
    torch.manual_seed(1)
    source = timm.create_model("resnet10t", num_classes=5, in_chans=1)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path_factory.mktemp("weights") / "source.safetensors"
    save_file(state, str(path))
    return path, state


def test_pretrained_path_loads_backbone_and_reinitialises_classifier(saved_resnet):
    path, source = saved_resnet
    torch.manual_seed(2)  # a different init, so equal tensors can only come from the file
    model = build_model(ModelConfig(model="resnet10t", pretrained=str(path)), num_classes=10, in_chans=1)
    state = model.state_dict()
    assert state["fc.weight"].shape == (10, source["fc.weight"].shape[1])
    torch.testing.assert_close(state["conv1.0.weight"], source["conv1.0.weight"], rtol=0, atol=0)
    for key, value in source.items():
        if not key.startswith("fc."):
            torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
    random_init = timm.create_model("resnet10t", num_classes=10, in_chans=1).state_dict()
    assert not torch.equal(random_init["conv1.0.weight"], source["conv1.0.weight"])


def test_pretrained_path_with_same_class_count_keeps_classifier(saved_resnet):
    path, source = saved_resnet
    torch.manual_seed(2)
    model = build_model(ModelConfig(model="resnet10t", pretrained=str(path)), num_classes=5, in_chans=1)
    torch.testing.assert_close(model.state_dict()["fc.weight"], source["fc.weight"], rtol=0, atol=0)


def test_load_weights_unwraps_checkpoint_dicts(tmp_path):
    state = {"w": torch.arange(3.0)}
    torch.save({"model": state, "epoch": 3}, tmp_path / "ckpt.pth")
    loaded = load_weights(str(tmp_path / "ckpt.pth"))
    assert set(loaded) == {"w"}
    assert torch.equal(loaded["w"], state["w"])


class _Payload:
    """Pickles as a call to open(marker, "w"): unpickling it with full pickle creates the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": _Payload(str(marker))}, path)
    with pytest.raises(UserError, match=r"--pretrained .*evil\.pth: not a readable weights file"):
        load_weights(str(path))
    assert not marker.exists()
    # Control: the payload is live, so the refusal above is what kept the marker from appearing.
    with open(path, "rb") as f:
        torch.load(f, weights_only=False)
    assert marker.exists()


def test_not_a_state_dict_is_refused(tmp_path):
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(UserError, match="expected a state dict of tensors"):
        load_weights(str(tmp_path / "list.pth"))


def test_missing_weights_file(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        build_model(ModelConfig(pretrained=str(tmp_path / "nope.safetensors")), num_classes=10, in_chans=1)


# ---- models built for a fixed input size (ViT, DeiT, Swin, ...) at --imgsz --------------------------------------


def test_fixed_size_model_is_built_for_imgsz():
    # Without img_size timm's ViT asserts "Input height (32) doesn't match model (160)" on the first batch.
    model = build_model(ModelConfig(model="test_vit"), num_classes=10, in_chans=1, imgsz=32).eval()
    assert model.patch_embed.img_size == (32, 32)
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(
    ("name", "imgsz", "expected"),
    [
        ("resnet10t", 32, {}),  # convolutional: pools any size
        ("test_vit", 160, {}),  # its own size
        ("test_vit", 48, {"img_size": 48}),
        ("swin_tiny_patch4_window7_224", 64, {"img_size": 64}),
        ("test_vit", None, {}),  # size unknown (not asked)
    ],
)
def test_size_kwargs(name, imgsz, expected):
    assert size_kwargs(name, 10, 3, imgsz) == expected


@pytest.mark.parametrize(
    ("name", "imgsz", "why"),
    [
        ("vit_tiny_patch16_224", 8, "Kernel size can't be greater"),  # smaller than one 16 px patch
        ("crossvit_tiny_240", 32, "RuntimeError"),  # its two branches' token grids no longer line up
    ],
)
def test_size_a_model_cannot_take_is_one_line(name, imgsz, why):
    with pytest.raises(UserError) as raised:
        build_model(ModelConfig(model=name), num_classes=10, in_chans=3, imgsz=imgsz)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"--model {name} is built for ") and f"cannot take --imgsz {imgsz}" in message
    assert why in message


def test_pretrained_file_at_default_size_loads_at_another_size(tmp_path):
    """Weights saved at the model's default 160 px, fine-tuned at 32 px: timm resamples the position embedding
    (10x10 patches -> 2x2), every other tensor comes from the file unchanged."""
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(1)
    source = timm.create_model("test_vit", num_classes=5, in_chans=1)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(tmp_path / "vit160.safetensors"))
    torch.manual_seed(2)  # a different init, so equal tensors can only come from the file
    model = build_model(
        ModelConfig(model="test_vit", pretrained=str(tmp_path / "vit160.safetensors")), 5, in_chans=1, imgsz=32
    )
    loaded = model.state_dict()
    expected_pos = resample_abs_pos_embed(state["pos_embed"], new_size=(2, 2), num_prefix_tokens=1)
    assert loaded["pos_embed"].shape == (1, 1 + 2 * 2, state["pos_embed"].shape[-1])
    torch.testing.assert_close(loaded["pos_embed"], expected_pos)
    for key, value in state.items():
        if key != "pos_embed":
            torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 1, 32, 32)).shape == (1, 5)

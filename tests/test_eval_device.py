"""Devices of the feature extractor and the evaluation jobs, checked on the CPU.

The extractor is loaded for real onto the CPU (named by a string or a torch.device); for a
GPU, torch.cuda is made to report devices and every move of a module or tensor is recorded,
so the test sees that the model, the centers and every input reach the device that
pipeline.devices chose. The jobs' planning (which Ray resources the tasks ask for) and the
devices their tasks compute on are checked through the functions the jobs call.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipeline import devices
from pipeline.config import EvalSpec, load_config
from shards.errors import UserError
from pipeline.evaluate import features, jobs, schedule
from pipeline.evaluate.cells import run_cell
from pipeline.evaluate.plan import ClassPlan, ShardImages
from pipeline.evaluate.threads import computing_on

CUDA5 = torch.device("cuda", 5)


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> str:
    from pipeline.backbone import build_backbone
    from pipeline.config import BackboneSpec, ProjectorSpec
    from pipeline.export import save_export
    from pipeline.projector import Projector

    bspec = BackboneSpec(name="tf_efficientnet_lite0", levels=[2, 3], image_size=64, weights="random", bf16=False)
    pspec = ProjectorSpec(memory_size=8, heads=2)
    backbone = build_backbone(bspec)
    torch.manual_seed(0)
    projector = Projector.from_spec(backbone.widths, pspec)
    folder = str(tmp_path_factory.mktemp("export"))
    centers = [torch.randn(w) for w in backbone.widths]
    return save_export(folder, projector.state_dict(), centers, backbone, bspec, pspec, {})


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _tensors(fx) -> list[torch.Tensor]:
    mods = [fx.backbone, fx.projector]
    return [t for m in mods for t in (*m.parameters(), *m.buffers())] + list(fx.centers)


def test_extractor_on_the_device_named_or_given(export):
    from pipeline.export import load_feature_extractor

    images, refs = _images(3, 1), _images(2, 2)
    out = {}
    for device in ("cpu", torch.device("cpu")):
        fx = load_feature_extractor(export, device)
        assert fx.device == torch.device("cpu")
        assert all(t.device == fx.device for t in _tensors(fx))
        bank = fx.bank(refs)
        got = {"bank": bank, "raw": fx.raw(images), "residual": fx.residual(images, bank),
               "features": fx.features(images, refs)}
        for name, levels in got.items():
            assert all(f.device == fx.device for f in levels), name
        out[str(type(device))] = got
    a, b = out.values()
    for name in a:
        assert all(torch.equal(x, y) for x, y in zip(a[name], b[name])), name
    # features from a tensor of references equal those from its bank
    assert all(torch.equal(x, y) for x, y in zip(a["features"], fx.features(images, a["bank"])))


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda reports 8 devices, the current one cuda:5, and ``.to(cuda)`` of a module or a
    tensor is recorded: a tensor comes back as a copy tagged with the device it was sent to."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 5)
    set_to: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: set_to.append(torch.device(d)))
    moved: list[tuple[str, torch.device]] = []
    module_to, tensor_to = torch.nn.Module.to, torch.Tensor.to

    def target(args, kwargs) -> torch.device | None:
        d = kwargs.get("device", args[0] if args else None)
        if isinstance(d, (str, torch.device)) and torch.device(d).type == "cuda":
            return torch.device(d)
        return None

    def fake_module_to(self, *args, **kwargs):
        d = target(args, kwargs)
        if d is None:
            return module_to(self, *args, **kwargs)
        moved.append((type(self).__name__, d))
        return self

    def fake_tensor_to(self, *args, **kwargs):
        d = target(args, kwargs)
        if d is None:
            return tensor_to(self, *args, **kwargs)
        out = self.detach().clone()
        out.sent_to = d
        return out

    monkeypatch.setattr(torch.nn.Module, "to", fake_module_to)
    monkeypatch.setattr(torch.Tensor, "to", fake_tensor_to)
    return moved, set_to


def test_extractor_moves_model_centers_and_inputs_to_the_device(export, fake_cuda, monkeypatch):
    import pipeline.matching
    import pipeline.transforms
    from pipeline.export import load_feature_extractor

    moved, _ = fake_cuda
    fx = load_feature_extractor(export, "cuda")
    assert fx.device == CUDA5 == devices.resolve("cuda")
    assert ("FeatureExtractor", CUDA5) in moved and ("Projector", CUDA5) in moved
    assert all(getattr(c, "sent_to", None) == CUDA5 for c in fx.centers)

    seen: dict[str, list] = {"images": [], "bank": []}
    normalize, match = pipeline.transforms.normalize, pipeline.matching.match_residual

    def spy_normalize(x, mean, std):
        seen["images"].append(getattr(x, "sent_to", None))
        return normalize(x, mean, std)

    def spy_match(f, b, chunk):
        seen["bank"].append(getattr(b, "sent_to", None))
        return match(f, b, chunk)

    monkeypatch.setattr(pipeline.transforms, "normalize", spy_normalize)
    monkeypatch.setattr(pipeline.matching, "match_residual", spy_match)
    images, refs = _images(2, 3), _images(2, 4)
    fx.features(images, refs)  # references encoded, images encoded, matched against the bank
    fx.residual(images, [torch.randn(1, 10, w) for w in fx.backbone.widths])  # a bank held elsewhere
    fx.raw(images)
    assert seen["images"] == [CUDA5] * 4
    assert seen["bank"] == [CUDA5] * (2 * len(fx.backbone.widths))


def test_extractor_on_cuda_without_cuda_is_a_clear_error(export, monkeypatch):
    from pipeline.export import load_feature_extractor

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", torch.device("cuda", 1)):
        with pytest.raises(UserError, match="asks for a CUDA GPU but this machine has none"):
            load_feature_extractor(export, device)


def test_task_resources_ask_ray_for_the_gpu_fraction():
    on_gpu = {"num_cpus": 1, "num_gpus": 0.25}
    on_cpu = {"num_cpus": 1, "num_gpus": 0}
    assert schedule.task_resources(EvalSpec(), 2) == (True, on_gpu)
    assert schedule.task_resources(EvalSpec(), 0) == (False, on_cpu)
    assert schedule.task_resources(EvalSpec(device="cuda"), 1) == (True, on_gpu)
    assert schedule.task_resources(EvalSpec(device="cpu"), 8) == (False, on_cpu)
    assert schedule.task_resources(EvalSpec(device="cuda", gpus_per_task=0.5), 1) == (True, {"num_cpus": 1,
                                                                                       "num_gpus": 0.5})
    with pytest.raises(UserError, match="eval.device is cuda but the Ray cluster has no GPU"):
        schedule.task_resources(EvalSpec(device="cuda"), 0)


def _config(tmp_path, **eval_keys):
    return load_config({
        "name": "devtest",
        "workdir": str(tmp_path / "runs"),
        "sources": [{"name": "pre", "layout": "mvtec", "root": str(tmp_path / "pre"), "split": "pretrain"},
                    {"name": "ev", "layout": "mvtec", "root": str(tmp_path / "ev"), "split": "eval"}],
        "shards": {"url": str(tmp_path / "shards")},
        "backbone": {"name": "tf_efficientnet_lite0", "levels": [2, 3], "weights": "random"},
        "train": {"steps": 1, "storage": str(tmp_path / "ray")},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"},
        "eval": eval_keys,
    })


def test_ray_tasks_are_planned_with_the_gpu_fraction(tmp_path, monkeypatch):
    """_run_ray asks Ray for eval.gpus_per_task for the feature and method tasks when the
    cluster has GPUs; shard decoding stays a CPU task."""
    import ray

    import pipeline.rayctx

    asked: dict[str, dict] = {}

    class Planned(Exception):
        pass

    def remote(**options):
        def wrap(fn):
            asked[fn.__name__] = options

            class Remote:
                def remote(self, *args):
                    raise Planned

            return Remote()
        return wrap

    monkeypatch.setattr(pipeline.rayctx, "init_ray", lambda spec: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 2.0})
    monkeypatch.setattr(ray, "remote", remote)
    monkeypatch.setattr(ray, "put", lambda x: x)
    cfg = _config(tmp_path, gpus_per_task=0.5)
    with pytest.raises(Planned):
        schedule.run_ray(cfg, None, [(SimpleNamespace(name="ev"), [("shard-0.tar", 8)], ["plan"])], 64, progress=False)
    assert asked["features_task"] == {"num_returns": len(cfg.eval.kinds) + 1, "num_cpus": 1, "num_gpus": 0.5}
    assert asked["cell_task"] == {"num_cpus": 1, "num_gpus": 0.5}
    assert asked["decode_shard"] == {"num_cpus": 1}


def test_ray_tasks_compute_on_the_gpu_ray_gave_them(fake_cuda, monkeypatch):
    import ray

    _, set_to = fake_cuda
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [5])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    got = []
    monkeypatch.setattr(schedule, "class_features", lambda blob, plan, kinds, device, *shards: got.append(device))
    monkeypatch.setattr(schedule, "run_cell", lambda method, kind, spec, feats, info, device: got.append(device))
    expected = devices.task_device(True)
    assert expected == torch.device("cuda", 1)  # GPU 5 is the second device Ray left visible
    schedule.features_task(True, "blob", "plan", ["raw"], "shard-a", "shard-b")
    schedule.cell_task(True, "patchcore", "raw", EvalSpec(), ("fit", "test"), "info")
    assert got == [expected, expected]
    assert set_to == [expected] * 3  # each task made its GPU the current device
    got.clear()
    schedule.features_task(False, "blob", "plan", ["raw"])
    schedule.cell_task(False, "patchcore", "raw", EvalSpec(), ("fit", "test"), "info")
    assert got == [devices.CPU, devices.CPU]


def _shard(n_train: int = 4, n_test: int = 4, size: int = 64) -> ShardImages:
    import numpy as np

    g = np.random.default_rng(0)
    n = n_train + n_test
    labels = np.array([0] * n_train + [0, 1] * (n_test // 2), np.int8)
    masks = np.zeros((n, size, size), bool)
    masks[labels == 1, 20:40, 20:40] = True
    return ShardImages(keys=[f"k{i}" for i in range(n)], classes=["c"] * n,
                       splits=["train"] * n_train + ["test"] * n_test, labels=labels,
                       has_mask=labels == 1, images=g.integers(0, 256, (n, 3, size, size), np.uint8),
                       masks=masks)


def test_tasks_load_the_export_from_its_bytes_and_write_nothing(export, tmp_path, monkeypatch):
    """A task's extractor is built from the blob's bytes: the same model as the folder's, and no
    file under the temporary directory (nothing a run could leave behind on a node)."""
    import tempfile

    from pipeline.export import load_feature_extractor

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    blob = features.ExportBlob.read(export)
    features._extractors.clear()
    fx, ref = features._extractor(blob, devices.CPU), load_feature_extractor(export)
    assert features._extractor(blob, devices.CPU) is fx  # loaded once per process
    assert list(tmp_path.iterdir()) == []
    images, refs = _images(2, 3), _images(2, 4)
    for a, b in zip(fx.features(images, refs), ref.features(images, refs)):
        assert torch.equal(a, b)
    broken = features.ExportBlob(blob.digest + "x", {**blob.files, "spec.json": b'{"format": 99}'})
    with pytest.raises(UserError, match=r"export .*spec.json: export format 99 is not supported"):
        features._extractor(broken, devices.CPU)


def test_features_and_methods_on_the_device_equal_the_cpu(export, fake_cuda, monkeypatch):
    """The jobs' feature and method functions on (fake) cuda:5 move every input there, return
    CPU tensors, and compute what they compute on the CPU."""
    import pipeline.evaluate.methods
    import pipeline.transforms

    blob, shard = features.ExportBlob.read(export), _shard()
    plan = ClassPlan("ev", "eval", "c", True, k_shot=2, seed=0, max_test=None)
    kinds = ["raw", "pretrained"]
    sent: list = []
    normalize, make_method = pipeline.transforms.normalize, pipeline.evaluate.methods.make_method

    def spy_normalize(x, mean, std):
        sent.append(getattr(x, "sent_to", None))
        return normalize(x, mean, std)

    class SpyMethod:
        def __init__(self, method):
            self.method = method

        def fit(self, feats):
            sent.extend(getattr(f, "sent_to", None) for f in feats)
            self.method.fit(feats)
            return self

        def predict(self, feats, size):
            sent.extend(getattr(f, "sent_to", None) for f in feats)
            return self.method.predict(feats, size)

    monkeypatch.setattr(pipeline.transforms, "normalize", spy_normalize)
    monkeypatch.setattr(pipeline.evaluate.methods, "make_method", lambda m, spec: SpyMethod(make_method(m, spec)))
    results = {}
    for device in (devices.CPU, CUDA5):
        sent.clear()
        *per_kind, info = features.class_features(blob, plan, kinds, device, shard)
        assert sent == [device if device.type == "cuda" else None] * 3  # references, fit images, test images
        assert features._extractors[blob.digest, device].device == device
        assert all(f.device == devices.CPU for fit, test in per_kind for f in (*fit, *test))
        sent.clear()
        cells = [run_cell(m, k, EvalSpec(coreset_ratio=0.5), feats, info, device)
                 for k, feats in zip(kinds, per_kind) for m in ("featurenorm", "patchcore", "padim")]
        assert sent == [device if device.type == "cuda" else None] * (len(cells) * 2 * 2)  # fit, test x levels
        results[device.type] = (per_kind, [c.metrics for c in cells], [c.scores for c in cells])
    cpu, gpu = results["cpu"], results["cuda"]  # the same up to the CPU's thread count (one vs all)
    for (fit_a, test_a), (fit_b, test_b) in zip(cpu[0], gpu[0]):
        for x, y in zip([*fit_a, *test_a], [*fit_b, *test_b]):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-4)
    for a, b in zip(cpu[2], gpu[2]):
        torch.testing.assert_close(torch.from_numpy(a), torch.from_numpy(b), rtol=1e-5, atol=1e-4)
    assert [{k: pytest.approx(v, rel=1e-4) for k, v in m.items()} for m in cpu[1]] == gpu[1]


@pytest.mark.parametrize("device, expected", [("auto", CUDA5), ("cuda", CUDA5), ("cpu", devices.CPU)])
def test_in_process_evaluation_computes_on_the_resolved_device(tmp_path, fake_cuda, monkeypatch, device, expected):
    got = []
    monkeypatch.setattr(schedule, "decode_shard", lambda url, count, size: url)
    monkeypatch.setattr(schedule, "class_features",
                        lambda blob, plan, kinds, device, *shards: (got.append(device), ("fit", "test"), "info")[1:])
    monkeypatch.setattr(schedule, "run_cell", lambda method, kind, spec, feats, info, device: got.append(device))
    cfg = _config(tmp_path, device=device, kinds=["raw"], methods=["featurenorm", "padim"])
    infos, _ = schedule.run_sequential(cfg, None, [(None, [("shard-0.tar", 8)], ["plan"])], 64, progress=False)
    assert infos == ["info"]
    assert got == [devices.resolve(device)] * 3 == [expected] * 3


def test_eval_device_cuda_without_cuda_fails_before_ray(tmp_path, monkeypatch):
    import pipeline.rayctx

    def no_ray(spec):
        raise AssertionError("Ray started")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(pipeline.rayctx, "init_ray", no_ray)
    with pytest.raises(UserError, match="eval.device asks for a CUDA GPU but this machine has none"):
        jobs.evaluate(_config(tmp_path, device="cuda"), progress=False)


def test_one_thread_on_the_cpu_only():
    before = torch.get_num_threads()
    with computing_on(devices.CPU):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    torch.set_num_threads(2)
    try:
        with computing_on(CUDA5):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_fit_set_is_capped_by_max_fit_without_touching_references_or_test_images():
    from pipeline.evaluate.plan import select_images

    shard = _shard(n_train=10, n_test=4)
    whole = select_images(ClassPlan("ev", "eval", "c", True, k_shot=2, seed=0, max_test=None), [shard])
    capped = select_images(ClassPlan("ev", "eval", "c", True, k_shot=2, seed=0, max_test=None, max_fit=3), [shard])
    assert whole.fit_images.shape[0] == 8 and capped.fit_images.shape[0] == 3
    assert capped.refs == whole.refs and capped.test_keys == whole.test_keys
    # the capped set is a part of the whole one (the first three in the seeded order)
    assert {bytes(x.numpy()) for x in capped.fit_images} < {bytes(x.numpy()) for x in whole.fit_images}



def test_the_config_s_cap_reaches_every_class_plan():
    from pipeline.config import load_config
    from pipeline.evaluate.plan import _class_plans

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "ci.yaml", ["eval.max_fit_images=3"])
    src = next(s for s in cfg.sources if s.split == "val")
    plans = _class_plans(cfg, src, {"sources": {src.name: {"split": "val", "classes": ["b", "a"]}}})
    assert [(p.cls, p.max_fit) for p in plans] == [("a", 3), ("b", 3)]

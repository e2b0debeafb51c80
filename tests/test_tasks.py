"""Tests of the four benchmark tasks (``tasks/``): registry, presets, data, models, gauges.

Everything runs offline and fast: models at the ``tiny`` size, CIFAR as a small fake
dataset in torchvision's on-disk format (``cifar_fixture.py``), the built-in text corpus
cached in a temporary folder.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

import ddc
import tasks
from tasks import TASKS, build_task
from tasks.config import SIZES, meta_param_count
from tasks.transformer import Attention, apply_rope

try:
    from cifar_fixture import write_fake_cifar
except ImportError:  # tests/ imported as a package
    from tests.cifar_fixture import write_fake_cifar

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO / "configs" / "task"
CPU = torch.device("cpu")
EVAL_KEYS = {"gpt_lm": {"loss", "ppl"}, "vit_cifar": {"loss", "acc"},
             "resnet_cifar": {"loss", "acc"}, "grok_modadd": {"loss", "acc"}}
MODULES = {"gpt_lm": "tasks.gpt_lm", "vit_cifar": "tasks.vit_cifar",
           "resnet_cifar": "tasks.resnet_cifar", "grok_modadd": "tasks.grok_modadd"}


# --------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and two OpenMP threads on a busy
    2-core machine can be many times slower than one: run this module single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One cache folder for the built-in corpus, shared by this module's tests."""
    return str(tmp_path_factory.mktemp("corpus_cache"))


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fake CIFAR-10 and CIFAR-100 side by side (100 train / 40 test images each)."""
    root = tmp_path_factory.mktemp("cifar")
    write_fake_cifar(root, "cifar10", n_train=100, n_test=40)
    write_fake_cifar(root, "cifar100", n_train=100, n_test=40)
    return root


def tiny_cfg(name: str, corpus_cache: str, cifar_root: Path, **data) -> dict:
    """The tiny config of task ``name`` with offline data locations filled in."""
    cfg = {"name": name, "size": "tiny"}
    if name == "gpt_lm":
        cfg["data"] = {"cache_dir": corpus_cache, **data}
    elif name in ("vit_cifar", "resnet_cifar"):
        cfg["data"] = {"root": str(cifar_root), **data}
    elif data:
        cfg["data"] = data
    return cfg


def logits_of(task, model: nn.Module, batch):
    """(loss, logits) for ``ddc.verify_gauges`` (logits flattened to (N, classes))."""
    inputs, targets = batch
    logits = model(inputs)
    logits = logits.reshape(-1, logits.shape[-1])
    return F.cross_entropy(logits, targets.reshape(-1)), logits


# --------------------------------------------------------------------------------------
# Every task at tiny size
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(TASKS))
def test_tiny_task_trains_and_evaluates(name, corpus_cache, cifar_root, no_network):
    torch.manual_seed(0)
    task = build_task(tiny_cfg(name, corpus_cache, cifar_root))
    assert task.name == name
    assert isinstance(task.batch_size, int) and task.batch_size > 0
    assert isinstance(task.steps, int) and task.steps > 0
    assert task.unit_name in ("samples", "tokens")

    model = task.build_model()
    n_params = sum(p.numel() for p in model.parameters())
    assert 5_000 <= n_params <= 100_000, "tiny models stay small (fast tests)"
    assert task.describe()["params"] == n_params
    assert isinstance(model.readout, nn.Linear)

    batch = next(iter(task.train_batches(seed=0)))
    assert task.batch_units(batch) == (batch[0].numel() if name == "gpt_lm" else task.batch_size)
    loss, extra = task.loss(model, batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} gets no gradient"
        assert torch.isfinite(p.grad).all(), pname
    if name != "gpt_lm":
        assert 0.0 <= extra["acc"] <= 1.0

    for split in ("train", "val"):
        metrics = task.evaluate(model, split, CPU)
        assert set(metrics) == EVAL_KEYS[name]
        assert all(math.isfinite(v) for v in metrics.values())
        if "ppl" in metrics:
            assert metrics["ppl"] == pytest.approx(math.exp(metrics["loss"]))
        if "acc" in metrics:
            assert 0.0 <= metrics["acc"] <= 1.0
        # The same fixed examples at every evaluation.
        assert task.evaluate(model, split, CPU) == pytest.approx(metrics)
    assert model.training, "evaluate restores the training mode"


@pytest.mark.parametrize("name", sorted(TASKS))
def test_a_few_steps_reduce_the_loss(name, corpus_cache, cifar_root):
    """The pieces fit together: Adam on a fixed batch drives its loss down."""
    torch.manual_seed(0)
    task = build_task(tiny_cfg(name, corpus_cache, cifar_root))
    model = task.build_model()
    batch = next(iter(task.train_batches(seed=0)))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = task.loss(model, batch)[0].item()
    for _ in range(15):
        optimizer.zero_grad()
        task.loss(model, batch)[0].backward()
        optimizer.step()
    with torch.no_grad():
        last = task.loss(model, batch)[0].item()
    assert last < 0.8 * first


# --------------------------------------------------------------------------------------
# Registry, presets and configs
# --------------------------------------------------------------------------------------

def test_registry_rejects_unknown_task():
    with pytest.raises(ValueError, match="unknown task 'nope'") as err:
        build_task({"name": "nope", "size": "tiny"})
    for name in TASKS:
        assert name in str(err.value)


@pytest.mark.parametrize("name", ["grok_modadd", "gpt_lm"])
def test_unknown_size_names_the_accepted_sizes(name):
    with pytest.raises(ValueError, match="unknown size 'huge'") as err:
        build_task({"name": name, "size": "huge"})
    for size in SIZES:
        assert size in str(err.value)


def test_explicit_fields_override_the_preset(corpus_cache):
    task = build_task({"name": "gpt_lm", "size": "tiny", "batch_size": 3, "steps": 7,
                       "model": {"depth": 3, "width": None, "rope": False},
                       "data": {"cache_dir": corpus_cache}})
    tiny = tasks.gpt_lm.PRESETS["tiny"]
    assert (task.batch_size, task.steps) == (3, 7)
    model = task.build_model()
    assert len(model.blocks) == 3                                         # overridden
    assert model.embed.embedding_dim == tiny["model"]["width"]            # null -> preset
    assert model.pos_embed is not None                                    # rope off
    assert task.config["model"]["heads"] == tiny["model"]["heads"]
    assert next(iter(task.train_batches(0)))[0].shape == (3, tiny["model"]["context"])


def test_omegaconf_node_from_the_yaml_builds(corpus_cache):
    """The runner builds from ``cfg.task`` (a DictConfig composed from
    configs/task/NAME.yaml) through ``ddc_bench.plan.task_config``, which chooses the
    target of the size from the YAML's ``target.by_size``."""
    from ddc_bench.plan import task_config

    node = OmegaConf.load(CONFIG_DIR / "gpt_lm.yaml")
    node.data.cache_dir = corpus_cache
    node.model.depth = 1
    task = build_task(task_config(node))
    assert len(task.build_model().blocks) == 1
    tiny = OmegaConf.to_container(node.target.by_size)["tiny"]  # size null: tiny
    assert task.target == {"metric": "val_loss", "value": tiny, "mode": "min"}


def test_hydra_composition_reaches_the_builder(corpus_cache):
    """``task=... task.size=... task.model.depth=...`` through Hydra's own composition."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=["task=grok_modadd", "task.size=tiny",
                                           "task.model.depth=2", "task.data.op=mul"])
    from ddc_bench.plan import task_config

    task = build_task(task_config(cfg.task))
    assert len(task.build_model().blocks) == 2
    assert task.op == "mul" and task.p == tasks.grok_modadd.PRESETS["tiny"]["data"]["p"]
    assert task.target == {"metric": "val_acc", "value": 0.99, "mode": "max"}


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="unknown config field 'task.model.dept'"):
        build_task({"name": "grok_modadd", "size": "tiny", "model": {"dept": 3}})
    with pytest.raises(ValueError, match="unknown task config field"):
        build_task({"name": "grok_modadd", "size": "tiny", "lr": 0.1})
    with pytest.raises(ValueError, match="'task.model.depth' must be of type int"):
        build_task({"name": "grok_modadd", "size": "tiny", "model": {"depth": "three"}})
    with pytest.raises(ValueError, match="task.model.mlp must be one of"):
        build_task({"name": "grok_modadd", "size": "tiny", "model": {"mlp": "tanh"}})
    with pytest.raises(ValueError, match="task.data.op must be one of"):
        build_task({"name": "grok_modadd", "size": "tiny", "data": {"op": "pow"}})
    with pytest.raises(ValueError, match="task.steps must be a positive integer"):
        build_task({"name": "grok_modadd", "size": "tiny", "steps": 0})


def test_targets():
    grok = build_task({"name": "grok_modadd", "size": "tiny"})
    assert grok.target == {"metric": "val_acc", "value": 0.99, "mode": "max"}
    off = build_task({"name": "grok_modadd", "size": "tiny", "target": {"value": None}})
    assert off.target is None
    mine = build_task({"name": "grok_modadd", "size": "tiny",
                       "target": {"metric": "val_loss", "value": 0.1, "mode": "min"}})
    assert mine.target == {"metric": "val_loss", "value": 0.1, "mode": "min"}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_yaml_matches_the_builder(name):
    """configs/task/NAME.yaml lists exactly the builder's fields; preset-supplied fields
    are null there; the other defaults agree with the code."""
    yaml = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / f"{name}.yaml"))
    module = __import__(MODULES[name], fromlist=["DEFAULTS", "PRESETS"])
    defaults, presets = module.DEFAULTS, module.PRESETS
    assert yaml["name"] == name and yaml["size"] in SIZES
    assert set(yaml) == {"name", "size", "batch_size", "steps", "model", "data", "target"}
    assert yaml["batch_size"] is None and yaml["steps"] is None
    # The YAML states the calibrated target of each size (target.by_size, resolved by
    # ddc_bench.plan.task_config); metric and direction are the builder's.
    target = yaml["target"]
    assert {k: target[k] for k in ("metric", "mode")} == \
        {k: defaults["target"][k] for k in ("metric", "mode")}
    assert target["value"] is None  # by size, or no target (the CIFAR tasks)
    assert "by_size" not in target or set(target["by_size"]) == set(SIZES)
    assert set(presets) == set(SIZES)
    for section in ("model", "data"):
        assert set(yaml[section]) == set(defaults[section]), section
        preset_keys = set().union(*(p.get(section, {}) for p in presets.values()))
        for key, value in yaml[section].items():
            if key in preset_keys:
                assert value is None, f"{section}.{key} comes from the preset: null in the YAML"
            else:
                assert value == defaults[section][key], f"{section}.{key}"


@pytest.mark.parametrize("name", sorted(TASKS))
def test_preset_sizes_grow(name):
    """tiny < small < paper in parameters (counted on the meta device, nothing built)."""
    module = __import__(MODULES[name], fromlist=["PRESETS"])
    counts = []
    for size in SIZES:
        m = {**module.DEFAULTS["model"], **module.PRESETS[size]["model"]}
        if name == "gpt_lm":
            build = lambda m=m: module.GPT(vocab=256, **m)  # noqa: E731
        elif name == "vit_cifar":
            build = lambda m=m: module.ViT(num_classes=10, **m)  # noqa: E731
        elif name == "resnet_cifar":
            build = lambda m=m: module.ResNet(num_classes=10, **m)  # noqa: E731
        else:
            p = module.PRESETS[size]["data"]["p"]
            build = lambda m=m, p=p: module.GrokTransformer(vocab=p + 2, num_classes=p, **m)  # noqa: E731
        counts.append(meta_param_count(build))
    if name == "grok_modadd":  # small and paper share the standard model
        assert counts[0] < counts[1] == counts[2]
    else:
        assert counts[0] < counts[1] < counts[2]
    if name == "gpt_lm":
        assert 80e6 < counts[2] < 90e6  # GPT-2-small shape on bytes
    if name == "resnet_cifar":
        assert 11.0e6 < counts[2] < 11.3e6  # CIFAR ResNet-18


# --------------------------------------------------------------------------------------
# Gauges
# --------------------------------------------------------------------------------------

GAUGE_VARIANTS = [
    ("gpt_lm", {}),
    ("gpt_lm", {"rope": False, "mlp": "relu", "norm": "rmsnorm", "bias": True}),
    ("gpt_lm", {"tied": True, "mlp": "gelu"}),
    ("vit_cifar", {}),
    ("vit_cifar", {"mlp": "swiglu", "norm": "rmsnorm"}),
    ("resnet_cifar", {}),
    ("grok_modadd", {}),
    ("grok_modadd", {"rope": True, "mlp": "swiglu", "bias": True}),
]


@pytest.mark.parametrize("name,model_cfg", GAUGE_VARIANTS)
def test_declared_gauges_are_exact(name, model_cfg, corpus_cache, cifar_root):
    from ddc.gauges import HeadRotation, HeadRotationVO, LogitShift, NormGain, UnitRescale

    torch.manual_seed(0)
    cfg = tiny_cfg(name, corpus_cache, cifar_root)
    cfg["model"] = model_cfg
    task = build_task(cfg)
    model = task.build_model()
    # Move off the initial point (zero biases, unit gains) so the check is not degenerate.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = next(iter(task.train_batches(seed=0)))
    if name == "resnet_cifar":  # give the BatchNorms non-trivial running statistics
        with torch.no_grad():
            model(batch[0])
    batch = tuple(t[:4] for t in batch)  # a few examples suffice (float64 is slow)
    gauges = model.gauges()
    report = ddc.verify_gauges(model, lambda m, b: logits_of(task, m, b), batch)
    assert len(report) == len(gauges)

    kinds = [type(g) for g in gauges]
    if name == "resnet_cifar":
        n_blocks = sum(len(stage) for stage in model.stages)
        assert kinds.count(NormGain) == n_blocks and kinds.count(LogitShift) == 1
        return
    depth = len(model.blocks)
    assert kinds.count(HeadRotation) == depth and kinds.count(HeadRotationVO) == depth
    default_mlp = {"gpt_lm": "swiglu", "vit_cifar": "gelu", "grok_modadd": "relu"}[name]
    mlp = model_cfg.get("mlp", default_mlp)
    assert kinds.count(UnitRescale) == (0 if mlp == "gelu" else depth)
    tied = model_cfg.get("tied", False)
    assert kinds.count(LogitShift) == (0 if tied else 1)
    assert kinds.count(NormGain) == 2 * depth + (0 if tied else 1)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_loss_keeps_float64(name, corpus_cache, cifar_root):
    """The harness verifies DDC's gauges with the task's own loss on a float64 copy of the
    model: a float32 cast inside the loss would read as a broken symmetry (it made seed 1 of
    gpt_lm tiny fail with a LogitShift 'not a symmetry' at 8.5e-8)."""
    task = build_task(tiny_cfg(name, corpus_cache, cifar_root))
    batch = tuple(t[:4] for t in next(iter(task.train_batches(seed=0))))
    for seed in range(4):
        torch.manual_seed(seed)
        model = task.build_model()
        loss, _ = task.loss(model.double(), tuple(t.double() if t.is_floating_point() else t for t in batch))
        assert loss.dtype == torch.float64
        ddc.verify_gauges(model, lambda m, b: task.loss(m, b)[0], batch)  # raises on failure


# --------------------------------------------------------------------------------------
# Transformer pieces
# --------------------------------------------------------------------------------------

def test_rope_interleaved_layout():
    """Pair (2i, 2i+1) at position t turns by t * base**(-2i/d): check by hand for d = 4."""
    x = torch.zeros(1, 1, 2, 4)
    x[..., :] = torch.tensor([1.0, 0.0, 1.0, 0.0])
    y = apply_rope(x)
    assert torch.allclose(y[0, 0, 0], x[0, 0, 0])  # position 0: identity
    angle0, angle1 = 1.0, 1.0 * 10000 ** (-2 / 4)
    expected = torch.tensor([math.cos(angle0), math.sin(angle0), math.cos(angle1), math.sin(angle1)])
    assert torch.allclose(y[0, 0, 1], expected, atol=1e-6)


def test_rope_scores_depend_on_relative_position_only():
    torch.manual_seed(0)
    q, k = torch.randn(8), torch.randn(8)
    seq_q, seq_k = q.expand(1, 1, 12, 8), k.expand(1, 1, 12, 8)
    rq, rk = apply_rope(seq_q)[0, 0], apply_rope(seq_k)[0, 0]
    assert torch.allclose(rq.norm(dim=-1), q.norm().expand(12), atol=1e-5)  # rotations
    assert torch.allclose(rq[5] @ rk[2], rq[9] @ rk[6], atol=1e-5)  # both offset 3
    assert not torch.allclose(rq[5] @ rk[2], rq[5] @ rk[4], atol=1e-3)


def test_rope_layout_is_the_declared_one(corpus_cache, cifar_root):
    """The gauge declares ``rope="interleaved"``: the other layout must not be a symmetry
    of this model (so the declaration and the implementation really agree)."""
    from ddc.gauges import HeadRotation

    torch.manual_seed(0)
    task = build_task(tiny_cfg("gpt_lm", corpus_cache, cifar_root))
    model = task.build_model()
    batch = tuple(t[:2] for t in next(iter(task.train_batches(seed=0))))
    attn = model.blocks[0].attn
    check = lambda layout: ddc.verify_gauges(  # noqa: E731
        model, lambda m, b: logits_of(task, m, b), batch,
        gauges=[HeadRotation(attn.q, attn.k, attn.heads, rope=layout)])
    check("interleaved")
    for wrong in ("half", None):
        with pytest.raises(ddc.GaugeDeclarationError):
            check(wrong)


def test_no_dead_key_bias_without_rope():
    """Without RoPE a key bias only adds a per-query constant to the scores (softmax
    ignores it): its gradient is zero, so the block leaves it out; with RoPE it stays."""
    torch.manual_seed(0)
    plain = Attention(16, 2, causal=False, rope=False, bias=True)
    assert plain.k.bias is None and all(getattr(plain, n).bias is not None for n in "qvo")
    assert Attention(16, 2, causal=False, rope=True, bias=True).k.bias is not None
    # The claim itself: a key bias has exactly no effect without RoPE.
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    plain = plain.double()
    reference = plain(x)
    plain.k.bias = nn.Parameter(torch.randn(16, dtype=torch.float64))
    assert torch.allclose(plain(x), reference, atol=1e-12)


def test_attention_has_separate_projections_and_is_causal(corpus_cache, cifar_root):
    torch.manual_seed(0)
    task = build_task(tiny_cfg("gpt_lm", corpus_cache, cifar_root))
    model = task.build_model().eval()
    attn = model.blocks[0].attn
    assert isinstance(attn, Attention)
    assert all(isinstance(getattr(attn, n), nn.Linear) for n in ("q", "k", "v", "o"))
    x = torch.randint(0, 256, (2, 16))
    x2 = x.clone()
    x2[:, 10:] = torch.randint(0, 256, (2, 6))
    with torch.no_grad():
        a, b = model(x), model(x2)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-5)  # the future is not seen
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_param_groups_roles_for_tied_and_untied(corpus_cache, cifar_root):
    from ddc.param_groups import parameter_roles

    untied = build_task(tiny_cfg("gpt_lm", corpus_cache, cifar_root)).build_model()
    roles = parameter_roles(untied)
    assert roles[untied.readout.weight] == "readout"
    assert roles[untied.embed.weight] == "embedding"
    assert roles[untied.blocks[0].attn.q.weight] == "matrix"
    cfg = tiny_cfg("gpt_lm", corpus_cache, cifar_root)
    cfg["model"] = {"tied": True}
    tied = build_task(cfg).build_model()
    assert tied.readout is None
    assert "readout" not in set(parameter_roles(tied).values())


# --------------------------------------------------------------------------------------
# gpt_lm data
# --------------------------------------------------------------------------------------

def test_builtin_corpus_is_offline_deterministic_and_big(tmp_path, no_network):
    from tasks.corpus import build_builtin_corpus, builtin_corpus

    data, path = builtin_corpus(tmp_path / "a")
    assert path.is_file() and path.read_bytes() == data
    assert len(data) > 5_000_000, "big enough that the small model does not memorise it"
    assert build_builtin_corpus() == data                    # same bytes when rebuilt
    assert builtin_corpus(tmp_path / "b")[0] == data         # and in another cache
    assert b"# file: json/decoder.py\n" in data               # stdlib source, sorted order
    assert data.index(b"# file: abc.py") < data.index(b"# file: zipfile") < len(data)
    assert b"# file: test/" not in data and b"# file: encodings/" not in data


def test_builtin_split_and_batches(corpus_cache):
    task = build_task({"name": "gpt_lm", "size": "tiny", "data": {"cache_dir": corpus_cache}})
    total = len(task.train_data) + len(task.val_data)
    assert len(task.val_data) == pytest.approx(0.1 * total, abs=1)
    assert task.describe()["data"]["source"] == "builtin"
    a, b = iter(task.train_batches(1)), iter(task.train_batches(1))
    for _ in range(3):
        (x, y), (x2, y2) = next(a), next(b)
        assert torch.equal(x, x2) and torch.equal(y, y2)     # seeded
        assert x.dtype == torch.long and x.shape == (task.batch_size, task.context)
        assert torch.equal(x[:, 1:], y[:, :-1])               # targets = inputs shifted
    assert not torch.equal(next(iter(task.train_batches(2)))[0], next(iter(task.train_batches(1)))[0])


def test_local_text_files_through_datasets(tmp_path, no_network):
    lines = [f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(400)]
    text = "".join(lines)
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    cfg = {"name": "gpt_lm", "size": "tiny",
           "data": {"source": "local", "files": [str(path)], "val_fraction": 0.25,
                    "cache_dir": str(tmp_path / "hf_cache")}}
    task = build_task(cfg)
    joined = bytes(task.train_data.tolist()) + bytes(task.val_data.tolist())
    assert joined == text.encode()                            # nothing lost or reordered
    assert len(task.val_data) == pytest.approx(0.25 * len(joined), abs=1)
    assert task.describe()["data"]["val_split"].startswith("last 0.25")
    assert math.isfinite(task.evaluate(task.build_model(), "val", CPU)["loss"])

    # With a validation split of its own, the dataset's split is used as is.
    val_path = tmp_path / "val.txt"
    val_path.write_text("validation text " * 20)
    cfg["data"]["files"] = {"train": [str(path)], "validation": [str(val_path)]}
    task = build_task(cfg)
    assert bytes(task.train_data.tolist()) == text.encode()
    assert bytes(task.val_data.tolist()) == ("validation text " * 20 + "\n").encode()


def test_hub_source_split_logic(monkeypatch):
    """The Hub branch (no network here): ``load_dataset(name, config_name)`` is replaced by
    an in-memory DatasetDict; its validation split is used when present."""
    import datasets

    calls = []
    stories = [f"Once upon a time there was story number {i}." for i in range(200)]

    def fake_load_dataset(name, config_name=None, cache_dir=None):
        calls.append((name, config_name))
        splits = {"train": datasets.Dataset.from_dict({"text": stories, "id": list(range(200))})}
        if config_name == "with-val":
            splits["validation"] = datasets.Dataset.from_dict({"text": ["held out\n", ""] * 30})
        return datasets.DatasetDict(splits)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    joined = "".join(s + "\n" for s in stories).encode()
    cfg = {"name": "gpt_lm", "size": "tiny", "data": {"source": "hub", "name": "someone/stories"}}
    task = build_task(cfg)
    assert calls[-1] == ("someone/stories", None)
    assert bytes(task.train_data.tolist()) + bytes(task.val_data.tolist()) == joined
    assert len(task.val_data) == pytest.approx(0.1 * len(joined), abs=1)

    cfg["data"]["config_name"] = "with-val"
    task = build_task(cfg)
    assert bytes(task.train_data.tolist()) == joined
    assert bytes(task.val_data.tolist()) == b"held out\n" * 30   # empty rows dropped
    assert task.describe()["data"]["val_split"] == "validation"

    cfg["data"]["text_field"] = "story"
    with pytest.raises(ValueError, match="no column 'story'"):
        build_task(cfg)
    with pytest.raises(ValueError, match="needs task.data.name"):
        build_task({"name": "gpt_lm", "size": "tiny", "data": {"source": "hub"}})


def test_local_source_errors(tmp_path):
    with pytest.raises(ValueError, match="task.data.files"):
        build_task({"name": "gpt_lm", "size": "tiny", "data": {"source": "local"}})
    with pytest.raises(FileNotFoundError, match="nothere.txt"):
        build_task({"name": "gpt_lm", "size": "tiny",
                    "data": {"source": "local", "files": [str(tmp_path / "nothere.txt")]}})
    with pytest.raises(ValueError, match="task.data.source must be one of"):
        build_task({"name": "gpt_lm", "size": "tiny", "data": {"source": "web"}})


# --------------------------------------------------------------------------------------
# CIFAR
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["vit_cifar", "resnet_cifar"])
@pytest.mark.parametrize("dataset,classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_from_torchvision_files(name, dataset, classes, cifar_root, no_network):
    task = build_task({"name": name, "size": "tiny",
                       "data": {"root": str(cifar_root), "dataset": dataset}})
    # The fixture's pickles, read back through torchvision.
    folder = "cifar-10-batches-py" if dataset == "cifar10" else "cifar-100-python"
    first = "data_batch_1" if dataset == "cifar10" else "train"
    with open(cifar_root / folder / first, "rb") as f:
        raw = pickle.load(f, encoding="latin1")
    label_key = "labels" if dataset == "cifar10" else "fine_labels"
    assert task.train_set.targets[:5] == raw[label_key][:5]
    assert (task.train_set.data[0] == raw["data"][0].reshape(3, 32, 32).transpose(1, 2, 0)).all()
    assert len(task.train_set) == 100 and len(task.test_set) == 40
    assert task.num_classes == classes
    info = task.describe()
    assert info["dataset"] == dataset and info["train_size"] == 100 and info["val_size"] == 40

    model = task.build_model()
    assert model.readout.out_features == classes
    images, labels = next(iter(task.train_batches(seed=0)))
    assert images.shape == (task.batch_size, 3, 32, 32) and images.dtype == torch.float32
    assert labels.min() >= 0 and labels.max() < classes
    assert -3 < images.mean() < 3  # normalised, not raw bytes
    for split in ("train", "val"):
        metrics = task.evaluate(model, split, CPU)
        assert set(metrics) == {"loss", "acc"}
        assert metrics["loss"] == pytest.approx(math.log(classes), rel=0.5)


def test_cifar_fast_eval_path_matches_torchvision_transform(cifar_root):
    task = build_task({"name": "resnet_cifar", "size": "tiny", "data": {"root": str(cifar_root)}})
    images, labels = task._eval_sets["val"]
    assert len(labels) == 40 and torch.equal(labels, torch.tensor(task.test_set.targets))
    pil_image, label = task.test_set.data[7], task.test_set.targets[7]
    from PIL import Image

    reference = task.eval_transform(Image.fromarray(pil_image))
    assert torch.allclose(task.normalize(images[7:8])[0], reference, atol=1e-6)
    assert labels[7].item() == label


def test_cifar_eval_subset_is_fixed(cifar_root):
    cfg = {"name": "vit_cifar", "size": "tiny", "data": {"root": str(cifar_root), "eval_examples": 10}}
    a, b = build_task(cfg), build_task(cfg)
    assert torch.equal(a._eval_sets["train"][0], b._eval_sets["train"][0])
    assert len(a._eval_sets["train"][1]) == 10 and len(a._eval_sets["val"][1]) == 10


def test_cifar_batches_are_seeded_with_workers(cifar_root):
    """With DataLoader workers, shuffling and augmentation follow ``seed`` alone."""
    task = build_task({"name": "resnet_cifar", "size": "tiny", "data": {"root": str(cifar_root)}},
                      num_workers=1)
    a, b = next(iter(task.train_batches(3))), next(iter(task.train_batches(3)))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("dataset,folder", [("cifar10", "cifar-10-batches-py"),
                                            ("cifar100", "cifar-100-python")])
def test_missing_cifar_names_path_and_flag(tmp_path, dataset, folder, no_network):
    cfg = {"name": "vit_cifar", "size": "tiny",
           "data": {"root": str(tmp_path / "nowhere"), "dataset": dataset, "download": False}}
    with pytest.raises(FileNotFoundError) as err:
        build_task(cfg)
    message = str(err.value)
    assert "\n" not in message
    assert str(tmp_path / "nowhere" / folder) in message
    assert "task.data.download=true" in message and "task.data.root" in message


def test_partly_missing_cifar_names_the_missing_file(tmp_path):
    write_fake_cifar(tmp_path, "cifar10", n_train=50, n_test=10)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="missing data_batch_3"):
        build_task({"name": "resnet_cifar", "size": "tiny", "data": {"root": str(tmp_path)}})


# --------------------------------------------------------------------------------------
# grok_modadd data
# --------------------------------------------------------------------------------------

def test_modular_equations_are_all_pairs_with_correct_answers():
    from tasks.grok_modadd import modular_equations

    p = 97
    for op in ("add", "sub", "mul"):
        pairs, answers = modular_equations(p, op)
        assert len(pairs) == p * p
        assert {tuple(x) for x in pairs.tolist()} == {(a, b) for a in range(p) for b in range(p)}
    pairs, answers = modular_equations(p, "div")
    assert len(pairs) == p * (p - 1) and (pairs[:, 1] != 0).all()
    assert ((answers * pairs[:, 1]) % p == pairs[:, 0]).all()  # c * b = a (mod p)

    def answer(op: str, a: int, b: int) -> int:
        pairs, answers = modular_equations(p, op)
        row = ((pairs[:, 0] == a) & (pairs[:, 1] == b)).nonzero().item()
        return answers[row].item()

    assert answer("add", 5, 96) == 4          # 101 - 97
    assert answer("add", 0, 0) == 0
    assert answer("sub", 3, 5) == 95          # -2 + 97
    assert answer("sub", 50, 8) == 42
    assert answer("mul", 10, 10) == 3         # 100 - 97
    assert answer("mul", 96, 96) == 1         # (-1)(-1)
    assert answer("div", 1, 2) == 49          # 2 * 49 = 98 = 1
    assert answer("div", 6, 3) == 2
    with pytest.raises(ValueError, match="prime"):
        modular_equations(12, "div")


def test_grok_split_is_disjoint_complete_and_deterministic():
    cfg = {"name": "grok_modadd", "size": "tiny", "data": {"p": 13, "op": "sub", "train_fraction": 0.4}}
    a, b = build_task(cfg), build_task(cfg)
    train = {tuple(x) for x in a.train_x.tolist()}
    val = {tuple(x) for x in a.val_x.tolist()}
    assert not train & val
    assert len(train) + len(val) == 13 * 13 == len(train | val)
    assert len(train) == round(0.4 * 169)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.val_y, b.val_y)
    # Sequences are [a, OP, b, EQ] and the labels are the answers.
    assert (a.train_x[:, 1] == 13).all() and (a.train_x[:, 3] == 14).all()
    assert torch.equal(a.train_y, (a.train_x[:, 0] - a.train_x[:, 2]) % 13)
    other = build_task({**cfg, "data": {**cfg["data"], "seed": 1}})
    assert not torch.equal(other.train_x, a.train_x)


def test_grok_batches_cover_each_example_once_per_epoch():
    full = build_task({"name": "grok_modadd", "size": "tiny"})  # batch 512 > 60 examples
    assert full.batch_size == len(full.train_y)
    x, y = next(iter(full.train_batches(0)))
    assert torch.equal(x, full.train_x)

    task = build_task({"name": "grok_modadd", "size": "tiny", "batch_size": 20})
    n = len(task.train_y)
    assert n == 60
    stream = iter(task.train_batches(0))
    epoch = torch.cat([next(stream)[0] for _ in range(n // 20)])
    assert sorted(map(tuple, epoch.tolist())) == sorted(map(tuple, task.train_x.tolist()))

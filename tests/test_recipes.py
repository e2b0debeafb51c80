"""The optimizer recipes (configs/optimizer/*.yaml and configs/recipe/*.yaml) as composed.

* every YAML states its authors' published values (pinned below with their sources, which
  the YAML comments repeat);
* ``ddc`` keeps exactly ``adamw``'s hyperparameters and ``ddc_muon`` exactly ``muon``'s,
  and ``adamp`` ``adamw``'s Adam ones, for every task (a per-task recipe included);
* a per-task recipe (configs/recipe/) applies to its task only, and the command line wins.
"""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from conftest import CONFIG_DIR, compose, config_names

TASKS = config_names("task")

#: The published values each YAML must state (source in the YAML's comments).
PUBLISHED = {
    # GPT-3 (Brown et al. 2020, App. B), nanoGPT train.py / train_shakespeare_char.py
    "adamw": {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1},
    # clovaai/AdamP signature defaults for its own options; adamw's Adam values
    "adamp": {"delta": 0.1, "wd_ratio": 0.1, "nesterov": False, "weight_decay": 0.1},
    # KellerJordan/Muon (momentum, nesterov, Newton-Schulz), Moonshot's match_rms_adamw lr
    "muon": {"momentum": 0.95, "nesterov": True, "ns_steps": 5, "eps": 1e-7,
             "ns_coefficients": [3.4445, -4.775, 2.0315], "adjust_lr_fn": "match_rms_adamw",
             "adam_betas": [0.9, 0.95], "adam_lr_ratio": 1.0, "lr": 1e-3,
             "weight_decay": 0.1},
    # transformer tasks: measured grid (sgd.yaml); ResNet: He et al. 2016 (configs/recipe)
    "sgd": {"lr": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0},
    # OptimAI-Lab/Minimalist_LLM_Pretraining scripts/130m_scale.sh and utils/args.py
    "scale": {"lr": 1e-3, "momentum": 0.9, "weight_decay": 0.0, "normalization": "rms",
              "adam_lr_ratio": 20.0, "adam_betas": [0.9, 0.999], "adam_eps": 1e-8},
}

#: ddc_muon key -> muon key (the two YAMLs name the AdamW part and NS eps differently).
MUON_KEYS = {"lr": "lr", "weight_decay": "weight_decay", "momentum": "momentum",
             "nesterov": "nesterov", "ns_coefficients": "ns_coefficients",
             "ns_eps": "eps", "ns_steps": "ns_steps", "adjust_lr_fn": "adjust_lr_fn",
             "betas": "adam_betas", "eps": "adam_eps"}


def optimizer_cfg(optimizer: str, task: str, *extra: str) -> dict:
    cfg, _ = compose([f"optimizer={optimizer}", f"task={task}", *extra])
    return OmegaConf.to_container(cfg.optimizer, resolve=True)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_yaml_states_the_published_recipe(name: str) -> None:
    cfg = optimizer_cfg(name, "gpt_lm")
    for key, value in PUBLISHED[name].items():
        assert cfg[key] == pytest.approx(value) if isinstance(value, float) else \
            cfg[key] == value, (name, key, cfg[key], value)


@pytest.mark.parametrize("task", TASKS)
def test_ddc_keeps_adamw_hyperparameters(task: str) -> None:
    adamw, ddc = optimizer_cfg("adamw", task), optimizer_cfg("ddc", task)
    assert ddc["base"] == "adam"
    for key in ("lr", "betas", "eps", "weight_decay"):
        assert ddc[key] == adamw[key], (task, key)
    assert set(adamw) - {"name"} <= set(ddc)


@pytest.mark.parametrize("task", TASKS)
def test_ddc_muon_keeps_muon_hyperparameters(task: str) -> None:
    muon, ddc = optimizer_cfg("muon", task), optimizer_cfg("ddc_muon", task)
    assert ddc["base"] == "muon"
    for dkey, mkey in MUON_KEYS.items():
        assert ddc[dkey] == muon[mkey], (task, dkey, mkey)
    # every muon option is mirrored, or (adam_lr_ratio) at the value DDC's single lr implies
    assert set(muon) - {"name"} == set(MUON_KEYS.values()) | {"adam_lr_ratio"}
    assert muon["adam_lr_ratio"] == 1.0


@pytest.mark.parametrize("task", TASKS)
def test_adamp_keeps_adamw_adam_hyperparameters(task: str) -> None:
    adamw, adamp = optimizer_cfg("adamw", task), optimizer_cfg("adamp", task)
    for key in ("lr", "betas", "eps", "weight_decay"):
        assert adamp[key] == adamw[key], (task, key)


def test_task_recipe_applies_to_its_task_only_and_the_command_line_wins() -> None:
    default = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "optimizer" / "sgd.yaml"))
    assert optimizer_cfg("sgd", "gpt_lm") == default
    resnet = optimizer_cfg("sgd", "resnet_cifar")
    assert resnet["lr"] == 0.1 and resnet["weight_decay"] == 1e-4
    assert resnet != default
    assert optimizer_cfg("sgd", "resnet_cifar", "optimizer.lr=0.05")["lr"] == 0.05


@pytest.mark.parametrize("task", ["grok_modadd", "gpt_lm"])
def test_ddc_muon_ns_is_ddc_muon_with_muons_orthogonaliser(task: str) -> None:
    """grok_depth's matched DDC-Muon: ddc_muon.yaml, named ddc_muon (its runs land where
    ddc_muon's do), with muon's Newton-Schulz instead of the exact svd default."""
    base, variant = optimizer_cfg("ddc_muon", task), optimizer_cfg("ddc_muon_ns", task)
    assert base["orthogonalizer"] == "svd" and variant["orthogonalizer"] == "newton_schulz"
    assert variant["name"] == "ddc_muon"
    assert {k: v for k, v in variant.items() if k != "orthogonalizer"} == \
        {k: v for k, v in base.items() if k != "orthogonalizer"}

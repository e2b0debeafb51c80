"""DDC-Muon and the Muon baseline give every parameter the same role (so the same step
kind: Muon for ``matrix``, AdamW for the rest) on every task model: one rule,
``ddc.param_groups.parameter_roles(model, muon=True)``, sends the input layer (ViT patch
embedding, ResNet stem) to AdamW in both."""

import itertools

import pytest
import torch

from baselines import BASELINES
from ddc import DDC
from ddc.param_groups import input_layer, parameter_roles
from task_models import CASES, build_case



def roles_of(optimizer):
    return {id(p): g["role"] for g in optimizer.param_groups for p in g["params"]}


@pytest.mark.parametrize("case", CASES)
def test_ddc_muon_and_muon_assign_identical_roles(case, cifar_root):
    task, model = build_case(case, cifar_root)
    muon = BASELINES["muon"](model)
    ddc_muon = DDC(model, base="muon")
    assert roles_of(ddc_muon) == roles_of(muon)
    expected = {id(p): r for p, r in parameter_roles(model, muon=True).items()}
    assert roles_of(muon) == expected
    # The input layer's weight is never orthogonalised, and after a step DDC-Muon keeps
    # Adam moments for it, not a momentum buffer.
    first = getattr(input_layer(model), "weight", None)
    assert first is not None and roles_of(muon)[id(first)] != "matrix"
    batch = next(itertools.islice(task.train_batches(0), 1))
    task.loss(model, batch)[0].backward()
    ddc_muon.step()
    assert "exp_avg" in ddc_muon.state[first] and "momentum_buffer" not in ddc_muon.state[first]
    hidden = [p for p in model.parameters() if roles_of(muon).get(id(p)) == "matrix"]
    assert hidden and all("momentum_buffer" in ddc_muon.state[p] for p in hidden)


def test_only_the_input_layer_changes_role():
    """``muon=True`` changes exactly one parameter's role: the input layer's weight,
    ``matrix`` → ``embedding`` (a patch-embedding convolution here)."""
    from tasks.vit_cifar import ViT

    model = ViT(num_classes=10, depth=1, width=16, heads=2)
    plain, muon = parameter_roles(model), parameter_roles(model, muon=True)
    changed = [p for p in plain if plain[p] != muon[p]]
    assert changed == [model.patch_embed.weight]
    assert (plain[changed[0]], muon[changed[0]]) == ("matrix", "embedding")

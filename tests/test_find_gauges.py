"""ddc.find_gauges: finds at least every task model's hand declarations, only exact
symmetries (each passes verify_gauges), lists what it leaves out; works on torchvision's
resnet18 and nn.TransformerEncoder (both norm orders); DDC(gauges="auto") uses it."""

import pytest
import torch
from torch import nn

from ddc import DDC, find_gauges, verify_gauges
from ddc.gauges import (HeadRotation, HeadRotationVO, LogitShift, NormGain, RotationGauge, ScaleGauge,
                        UnitRescale)
from ddc_models import TinyTransformer, classification_loss, equivariance_deviation, make_batches
from test_ddc_tasks import CASES, build, float64_loss


def signature(gauge):
    """What a gauge acts on, independent of how it was built."""
    if isinstance(gauge, ScaleGauge):
        return type(gauge).__name__, frozenset((id(m.param), m.axis, m.sign) for m in gauge.members)
    if isinstance(gauge, RotationGauge):
        return type(gauge).__name__, frozenset((id(m.param), m.axis, m.block, tuple(m.perm.tolist()))
                                               for m in gauge.members)
    return type(gauge).__name__, frozenset(id(p) for p in gauge.parameters())


@pytest.mark.parametrize("case", CASES)
def test_finds_every_hand_declaration_of_the_task_models(case, cifar_root):
    model, batches = build(case, cifar_root)
    found = find_gauges(model, batches[0][0], loss="cross_entropy")
    missing = {signature(g) for g in model.gauges()} - {signature(g) for g in found}
    assert not missing, f"{case}: not found: {missing}\n{found.summary()}"
    verify_gauges(model, float64_loss, batches[0], gauges=list(found))   # all exact


def test_resnet18():
    import torchvision

    model = torchvision.models.resnet18(num_classes=10)
    found = find_gauges(model, torch.randn(2, 3, 32, 32), loss="cross_entropy")
    blocks = [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]
    expected = [NormGain(b.bn1, [b.conv2]) for b in blocks] + [LogitShift(model.fc)]
    assert {signature(g) for g in found} == {signature(g) for g in expected}, found.summary()


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_transformer_encoder(norm_first):
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, norm_first=norm_first,
                                       batch_first=True)
    model = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16), enable_nested_tensor=False)
    found = find_gauges(model, torch.randn(2, 5, 16), loss=None)
    expected = [UnitRescale([lay.linear1], lay.linear2) for lay in model.layers]
    expected += [HeadRotation.packed(lay.self_attn) for lay in model.layers]     # slices of in_proj
    expected += [HeadRotationVO.packed(lay.self_attn) for lay in model.layers]
    if norm_first:   # pre-norm: each norm's output is read only by the next layer
        expected += [NormGain(lay.norm1, [lay.self_attn]) for lay in model.layers]
        expected += [NormGain(lay.norm2, [lay.linear1]) for lay in model.layers]
    assert {signature(g) for g in found} == {signature(g) for g in expected}, found.summary()
    # post-norm: norms feed the residual stream, so their candidates are proven false and listed
    rejected = " ".join(label for label, _ in found.rejected)
    assert ("NormGain(layers.0.norm1" in rejected) == (not norm_first)


def encoder(norm_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, norm_first=norm_first,
                                       batch_first=True)
    return nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(8), enable_nested_tensor=False).double()


@pytest.mark.parametrize("base,options", [("adam", {}), ("muon", {"orthogonalizer": "svd"})], ids=["adam", "muon"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_ddc_is_equivariant_with_found_gauges_on_transformer_encoder(norm_first, base, options):
    """Packed q/k/v slices, norm and unit gauges found automatically; 10 float64 steps."""
    model = encoder(norm_first)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(2, 5, 8, generator=generator, dtype=torch.float64),
                torch.randn(2, 5, 8, generator=generator, dtype=torch.float64)) for _ in range(10)]
    select = lambda m: list(find_gauges(m, batches[0][0], loss=None))
    assert any(isinstance(g, HeadRotation) for g in select(model))
    mse = lambda m, batch: (((m(batch[0]) - batch[1]) ** 2).mean(), m(batch[0]))
    make = lambda m, gauges: DDC(m, gauges=gauges, base=base, lr=1e-2, weight_decay=0.1, **options)
    assert equivariance_deviation(model, make, mse, batches, select) <= 1e-8
    adamw = lambda m, gauges: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    assert equivariance_deviation(model, adamw, mse, batches, select) >= 1e-4


class TwoReaders(nn.Module):
    """A ReLU layer read by two layers: no single-output unit gauge is exact."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 3), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(h) + self.c(h)


def test_rejected_candidates_are_listed_with_the_measured_change():
    found = find_gauges(TwoReaders(), torch.randn(5, 4), loss="cross_entropy")
    reasons = dict(found.rejected)
    assert "not a symmetry" in reasons["UnitRescale([a], b)"]
    assert "not a symmetry" in reasons["UnitRescale([a], c)"]
    model = TinyTransformer(mlp="gelu", rope="interleaved")
    found = find_gauges(model, make_batches(model, 1)[0][0], loss="cross_entropy")
    assert "not a symmetry" in dict(found.rejected)["HeadRotation(q, k, heads=2, rope=None)"]
    assert not any(isinstance(g, UnitRescale) for g in found)   # GELU: not even proposed


def test_ddc_auto_uses_find_gauges():
    model = TinyTransformer().double()
    batch = make_batches(model, 1)[0]
    auto = DDC(model, gauges="auto", example_input=batch[0], loss="cross_entropy", lr=1e-2)
    # the hand declaration plus the RoPE per-pair Q/K scale (enforced since issue 18)
    found = {signature(g) for g in auto.gauges}
    pair = {sig for sig in found if sig[0] == "QKPairScale"}
    assert len(pair) == 1 and found - pair == {signature(g) for g in model.gauges()}
    classification_loss(model, batch)[0].backward()
    auto.step()
    with pytest.raises(ValueError, match="'auto' with a model and an example_input"):
        DDC(model, gauges="auto")


def tiny_gpt2(tied):
    import transformers   # the `hf` extra, which `make test` installs

    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16,
                                     tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_hugging_face_gpt2(tied):
    """Conv1D layers (stored in × out) and the fused c_attn: gauge members are column
    slices of one parameter. A tied lm_head has neither the logit shift nor ln_f's gauge."""
    model = tiny_gpt2(tied)
    found = find_gauges(model, torch.randint(0, 50, (2, 8)), loss="cross_entropy")
    blocks = model.transformer.h
    expected = [NormGain(b.ln_1, [b.attn.c_attn]) for b in blocks] + [NormGain(b.ln_2, [b.mlp.c_fc]) for b in blocks]
    expected += [HeadRotation.fused(b.attn.c_attn, 2) for b in blocks]
    expected += [HeadRotationVO.fused(b.attn.c_attn, b.attn.c_proj, 2) for b in blocks]
    if not tied:
        expected += [NormGain(model.transformer.ln_f, [model.lm_head]), LogitShift(model.lm_head)]
    assert {signature(g) for g in found} == {signature(g) for g in expected}, found.summary()
    rejected = dict(found.rejected)
    assert "not a symmetry" in rejected["UnitRescale([transformer.h.0.mlp.c_fc], transformer.h.0.mlp.c_proj)"]  # GELU


@pytest.mark.parametrize("base,options", [("adam", {}), ("muon", {"orthogonalizer": "svd"})], ids=["adam", "muon"])
def test_ddc_is_equivariant_on_gpt2_with_found_gauges(base, options):
    model = tiny_gpt2(tied=False).double()
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 50, (2, 8), generator=generator),) * 2 for _ in range(10)]

    def loss(m, batch):
        logits = m(batch[0]).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), batch[1][:, 1:].reshape(-1)), logits

    select = lambda m: list(find_gauges(m, batches[0][0], loss="cross_entropy"))
    make = lambda m, gauges: DDC(m, gauges=gauges, base=base, lr=1e-2, weight_decay=0.1, **options)
    assert equivariance_deviation(model, make, loss, batches, select) <= 1e-8
    adamw = lambda m, gauges: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    assert equivariance_deviation(model, adamw, loss, batches, select) >= 1e-4

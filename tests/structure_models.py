"""Models for the structural gauge-finding tests and ``scripts/gauge_survey.py``: written
here (a Llama-style decoder with a user-written RMSNorm, GQA and RoPE, explicit attention;
separate q/k/v/o layers with ``scaled_dot_product_attention``; an MSE regressor), built from
``transformers`` configs (never downloaded) and from torchvision, all tiny.

Each entry of :data:`ZOO` builds ``(model, example_input, loss, loss_fn, batches)``:
``loss`` is what ``find_gauges`` is told, ``loss_fn(model, batch) -> (loss, outputs)``
trains it, ``batches`` are 10 float64-ready training batches.

:func:`dead_parameters` and :func:`mute_dead` deal with parameters whose gradient is zero in
exact arithmetic (attention key biases, BatchNorm biases read only through 1×1 convolutions
into another BatchNorm): the equivariance runs mute them, for every optimizer alike.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn


class MyRMSNorm(nn.Module):
    """A user-written RMSNorm; its gain is called ``g`` (no class or name to recognise)."""

    def __init__(self, width: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.g * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rope_half(x: torch.Tensor) -> torch.Tensor:
    """RoPE with pairs (k, k + d/2) (Llama's layout) on (B, H, T, D)."""
    t, d = x.shape[-2], x.shape[-1]
    freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=x.dtype) / d))
    angle = torch.arange(t, dtype=x.dtype)[:, None] * freq[None, :]
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class LlamaBlockLM(nn.Module):
    """Embedding → [RMSNorm → GQA attention with RoPE (explicit matmul-softmax-matmul) →
    RMSNorm → SwiGLU] → RMSNorm → untied readout. No head-count attribute, odd names."""

    def __init__(self, vocab: int = 32, width: int = 32, n_query: int = 4, n_kv: int = 2, hidden: int = 48) -> None:
        super().__init__()
        self.d = width // n_query
        self.shape = (n_query, n_kv)
        self.tok = nn.Embedding(vocab, width)
        self.n1, self.n2, self.nf = MyRMSNorm(width), MyRMSNorm(width), MyRMSNorm(width)
        self.wq = nn.Linear(width, n_query * self.d, bias=False)
        self.wkv = nn.Linear(width, 2 * n_kv * self.d, bias=False)   # keys and values fused
        self.wo = nn.Linear(n_query * self.d, width, bias=False)
        self.w1, self.w3 = nn.Linear(width, hidden, bias=False), nn.Linear(width, hidden, bias=False)
        self.w2 = nn.Linear(hidden, width, bias=False)
        self.out = nn.Linear(width, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens)
        b, t, _ = x.shape
        hq, hkv = self.shape
        h = self.n1(x)
        q = self.wq(h).view(b, t, hq, self.d).transpose(1, 2)
        k, v = self.wkv(h).view(b, t, 2, hkv, self.d).unbind(2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        q, k = rope_half(q), rope_half(k)
        k, v = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.d)
        mask = torch.ones(t, t, dtype=torch.bool).tril()
        att = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
        x = x + self.wo(att.transpose(1, 2).reshape(b, t, -1))
        h = self.n2(x)
        x = x + self.w2(F.silu(self.w1(h)) * self.w3(h))
        return self.out(self.nf(x))


class SDPABlock(nn.Module):
    """Separate ``query/key/value/proj`` layers and ``F.scaled_dot_product_attention`` (MHA,
    no RoPE), LayerNorm pre-norm, ReLU MLP, untied readout (nanoGPT layout, other names)."""

    def __init__(self, vocab: int = 32, width: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.split = heads
        self.tok = nn.Embedding(vocab, width)
        self.ln1, self.ln2, self.lnf = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
        self.proj = nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens)
        b, t, w = x.shape
        h = self.ln1(x)
        q, k, v = (layer(h).view(b, t, self.split, -1).transpose(1, 2) for layer in (self.query, self.key, self.value))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, w))
        x = x + self.down(torch.relu(self.up(self.ln2(x))))
        return self.head(self.lnf(x))


class MSERegressor(nn.Module):
    """A ReLU MLP with 4 real outputs, trained with MSE: no logit shift exists."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


# ----------------------------------------------------------------------------------------

def _tokens(vocab: int, shape=(2, 8), seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, shape, generator=generator) for _ in range(10)]


def lm_loss(model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy; works for a tensor output and Hugging Face's ``.logits``."""
    out = model(batch)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)), logits


def _classifier_case(model: nn.Module, shape, classes: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(shape, generator=generator, dtype=torch.float64),
                torch.randint(0, classes, (shape[0],), generator=generator)) for _ in range(10)]

    def loss_fn(m, batch):
        out = m(batch[0].to(next(m.parameters()).dtype))
        logits = out if isinstance(out, torch.Tensor) else out.logits
        return F.cross_entropy(logits, batch[1]), logits
    return model, batches[0][0], "cross_entropy", loss_fn, batches


def _lm_case(model: nn.Module, vocab: int):
    batches = _tokens(vocab)
    return model, batches[0], "cross_entropy", lm_loss, batches


def llama_block():
    torch.manual_seed(0)
    return _lm_case(LlamaBlockLM(), 32)


def sdpa_block():
    torch.manual_seed(0)
    return _lm_case(SDPABlock(), 32)


def mse_regressor():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 6, generator=generator, dtype=torch.float64),
                torch.randn(8, 4, generator=generator, dtype=torch.float64)) for _ in range(10)]

    def loss_fn(m, batch):
        out = m(batch[0].to(next(m.parameters()).dtype))
        return F.mse_loss(out, batch[1].to(out.dtype)), out
    return MSERegressor(), batches[0][0], None, loss_fn, batches


def hf_llama(n_kv: int = 2):
    import transformers
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=n_kv, max_position_embeddings=32,
                                      attn_implementation="sdpa")
    torch.manual_seed(0)
    return _lm_case(transformers.LlamaForCausalLM(config), 64)


def hf_gpt2(zero_mlp_out: bool = True):
    """GPT-2 (untied) with its MLP output projections zero-initialised: the start where a
    GELU unit rescaling once passed the proof."""
    import transformers
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16,
                                     tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    if zero_mlp_out:
        for block in model.transformer.h:
            nn.init.zeros_(block.mlp.c_proj.weight)
    return _lm_case(model, 50)


def hf_bert():
    import transformers
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                     attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 50, (4, 8), generator=generator), torch.randint(0, 3, (4,), generator=generator))
               for _ in range(10)]
    return model, batches[0][0], "cross_entropy", lambda m, b: _ce(m(b[0]).logits, b[1]), batches


def _ce(logits, labels):
    return F.cross_entropy(logits, labels), logits


def hf_vit():
    import transformers
    config = transformers.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=32, num_labels=5, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0, attn_implementation="sdpa")
    torch.manual_seed(0)
    return _classifier_case(transformers.ViTForImageClassification(config), (2, 3, 16, 16), 5)


def tv_vit():
    """torchvision's ViT: its head is zero-initialised (logits 0 at the start)."""
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=16, mlp_dim=32, num_classes=5)
    return _classifier_case(model, (2, 3, 16, 16), 5)


# ResNet and MobileNet end at 1×1 maps: their last BatchNorms normalise over the batch
# alone, and with 2 or 4 images its outputs barely depend on the inputs, so every gradient
# below them is rounding that Adam amplifies (10 DDC-Adam steps: 1.2 with 2 images, 1e-5
# with 4, 8e-11 with 8). 8 images.
def tv_resnet():
    import torchvision
    torch.manual_seed(0)
    return _classifier_case(torchvision.models.resnet18(num_classes=5), (8, 3, 32, 32), 5)


def tv_mobilenet():
    import torchvision
    torch.manual_seed(0)
    # dropout 0: its classifier's Dropout(0.2) would draw different masks in the two
    # trajectories of an equivariance test
    return _classifier_case(torchvision.models.mobilenet_v3_small(num_classes=5, dropout=0.0), (8, 3, 32, 32), 5)


def tv_convnext():
    import torchvision
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    torch.manual_seed(0)
    model = ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=5)
    return _classifier_case(model, (2, 3, 32, 32), 5)


ZOO = {
    "llama_block": llama_block, "sdpa_block": sdpa_block, "mse_regressor": mse_regressor,
    "hf_llama_gqa": hf_llama, "hf_llama_mqa": lambda: hf_llama(n_kv=1), "hf_llama_mha": lambda: hf_llama(n_kv=4), "hf_gpt2_zero_mlp": hf_gpt2,
    "hf_bert": hf_bert, "hf_vit": hf_vit, "tv_vit": tv_vit, "tv_resnet18": tv_resnet,
    "tv_mobilenet_v3": tv_mobilenet, "tv_convnext": tv_convnext,
}


@torch.no_grad()
def dead_parameters(model: nn.Module, loss_fn, batch, tol: float = 1e-12) -> tuple[list[str], float]:
    """Names of the vector parameters (biases, gains) that a random translation (N(0, 1) per
    entry) changes the training loss by at most ``tol`` relative, both at the model's point
    and at a perturbed one (``ddc.verify``'s rule: zero tensors drawn afresh, so a parameter
    dead only behind a zero-initialised layer is not counted), train mode, float64, each
    evaluation on a fresh copy so BatchNorm's running statistics play no part; and the
    largest such change.

    MobileNet-v3's projection BatchNorms are the example: their output reaches the loss only
    through 1×1 convolutions into another BatchNorm, whose batch mean removes a per-channel
    shift. Such a parameter's gradient is zero in exact arithmetic, so after a few steps it is
    rounding noise (1e-12) that any optimizer moves differently from θ and from g·θ: relative
    to its own size the deviation is O(1), and it says nothing about equivariance."""
    from ddc.verify import _perturbed

    work = copy.deepcopy(model).double().train()
    generator = torch.Generator().manual_seed(0)
    origin = [p.detach().clone() for p in work.parameters()]
    worst: dict[str, float] = {}
    for start in (origin, _perturbed(origin, generator)):
        for p, v in zip(work.parameters(), start):
            p.copy_(v)
        base = float(loss_fn(copy.deepcopy(work), batch)[0])
        for name, param in work.named_parameters():
            if param.ndim != 1 or not param.requires_grad or worst.get(name, 0.0) > tol:
                continue
            saved = param.clone()
            param.add_(torch.randn(param.shape, generator=generator, dtype=torch.float64))
            change = abs(float(loss_fn(copy.deepcopy(work), batch)[0]) - base) / abs(base)
            param.copy_(saved)
            worst[name] = max(worst.get(name, 0.0), change)
    dead = [name for name, change in worst.items() if change <= tol]
    return dead, max((worst[name] for name in dead), default=0.0)


def mute_dead(gauges: list, model: nn.Module, dead: list[str] = ()) -> None:
    """Zero the gradients of dead parameters: the key-bias rows of each ``HeadRotation`` in
    ``gauges`` (built on ``model``) and the parameters of ``model`` named in ``dead``.

    A key bias adds ``q·b_k``, the same for every key, to each row of scores: softmax ignores
    it. Its translation (and a dead BatchNorm bias's, :func:`dead_parameters`) is not a gauge
    kind of ours, so it is muted, the same for DDC and AdamW, rather than compared as noise."""
    from ddc.gauges import HeadRotation

    for gauge in gauges:
        if isinstance(gauge, HeadRotation):
            biases = [m for m in gauge.members if m.param.ndim == 1]
            if len(biases) == 2:   # query bias, key bias
                key = biases[1]
                key.param.register_hook(lambda grad, rows=key.perm: grad.index_fill(0, rows.to(grad.device), 0.0))
    named = dict(model.named_parameters())
    for name in dead:
        named[name].register_hook(torch.zeros_like)


"""Models composed the way compressed and hand-written transformers compose rewrite sites,
for the composition fuzzer (``tests/fuzz.py``).

Building blocks:

* :class:`LowRank`: a low-rank pair ``y = (x A + a) B + b`` in one of :data:`SPELLINGS`
  (``nn.Linear`` pairs, ``F.linear`` with a separate bias, GPT-2's ``Conv1D``/``addmm``
  with views, ``@`` with reshapes, ``x @ W.T``, ``einsum``, ``einsum`` over head dims), with
  optional ops between its two linears (dropout, reshape, cast, ...).
* :class:`Dense`: one projection in the same spellings.
* :class:`Connect`: ops between layers (activations, norms, residual, scalar scale, a cast
  round trip, eval dropout, reshapes, a transpose of leading dims, a separate shift).
* :class:`Attention`: attention whose q/k/v/o are dense or low-rank, or one fused QKV
  projection split in the grouped layouts of Qwen/Phi-3/ChatGLM/Falcon/GPT-NeoX/ViT;
  SDPA, SDPA with ``enable_gqa``, eager softmax or einsum attention; RoPE none/full/partial.
* SwiGLU/GELU MLPs, shared bases (Basis Sharing, Palu), multi-layer pre-norm blocks.

Each ``make_<family>(rng)`` returns a :class:`Case`: the module, its inputs, and what the
report of ``backend="bd"`` must say about it (:class:`ChainExpect`, :class:`AttnExpect`).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention_models import LatentAttention, rope as apply_rope
from lowrank_models import Conv1D

# ------------------------------------------------------------------------------ expectations
PIFA_BUDGET_REASONS = ("budget", "singular", "non-finite")   # legitimate numerical refusals
BD_BUDGET_REASONS = ("budget", "singular", "non-finite")
# limitations the pass documents in its skip reasons: a pair skipped with one of these is not
# counted as a failure, but the fuzzer reports how often it happened
PIFA_KNOWN_LIMITS = ("does not rewrite that form yet",)


@dataclass
class ChainExpect:
    """One low-rank pair of the model. ``status``: ``"apply"`` (a legal chain: PIFA applied,
    or skipped for a numerical reason), ``"skip:<text>"`` (must be skipped with a reason
    containing text), ``"any"`` (not predicted)."""
    key: str                       # the pair's module path (or the second linear's) as the report names it
    weights: tuple[str, str]       # qualified names of the two weights
    status: str
    params: int                    # weight elements of the pair (both weights and biases)
    d_in: int = 0
    r: int = 0
    d_out: int = 0
    bias: bool = False             # either linear has a bias
    shared: tuple = ()             # weights also read by other linears (a shared basis, a tied pair):
                                   # a skip whose reason names one of them is a legitimate decision


@dataclass
class AttnExpect:
    """One attention block: BD kinds that must be applied (or skipped for a numerical reason)
    at sites under ``path``, and those that are structurally legal there."""
    path: str
    required: set = field(default_factory=set)
    possible: set = field(default_factory=set)


@dataclass
class Case:
    family: str
    model: nn.Module
    args: tuple
    desc: dict
    chains: list = field(default_factory=list)
    attns: list = field(default_factory=list)
    dtype: torch.dtype = torch.float32

    def expectations(self) -> None:
        """Fill ``chains``/``attns`` from the modules (call after building)."""
        self.chains, self.attns = [], []
        tied: list[str] = []
        for path, m in self.model.named_modules():
            if isinstance(m, LowRank):
                self.chains.append(m.expect(path))
            if isinstance(m, TiedStack):
                tied.append(f"{path}.pair" if path else "pair")
            if isinstance(m, SharedBasisStack):
                self.chains.extend(m.expect(path))
            if isinstance(m, (Attention, MLA)):
                self.attns.append(m.expect(path))
        for c in self.chains:
            if c.key in tied:
                c.shared = c.weights


# ------------------------------------------------------------------------------ low-rank pairs
SPELLINGS = ("linear", "flinear", "conv1d", "matmul", "matmul_T", "einsum", "einsum_heads")
# ops between the two linears of a pair: the first list keeps it a chain, "svals" (an explicit
# singular-value vector, U diag(s) V) is not a chain by the pass's definition
INNER_KEEP = ("none", "dropout", "reshape", "contiguous", "cast_same", "flatten", "unsqueeze", "clone")
INNER_BREAK = ("svals",)


def _factor2(n: int, rng: random.Random) -> tuple[int, int]:
    """(h, e) with h * e == n, h > 1 when n is composite."""
    divs = [h for h in range(2, n) if n % h == 0]
    h = rng.choice(divs) if divs else 1
    return h, n // h


def _w(*shape, fan_in: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape) / math.sqrt(max(fan_in, 1)))


def _b(n: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(n) * 0.1)


class LowRank(nn.Module):
    """A low-rank pair in one spelling, with ``inner`` ops between its two linears."""

    def __init__(self, spelling: str, d_in: int, r: int, d_out: int, bias_first: bool = False,
                 bias_second: bool = True, inner: str = "none", init: str = "gauss",
                 rng: random.Random | None = None):
        super().__init__()
        rng = rng or random.Random(0)
        if spelling == "conv1d":              # addmm always carries a bias
            bias_first = bias_second = True
        self.spelling, self.inner, self.d_in, self.r, self.d_out = spelling, inner, d_in, r, d_out
        self.has_a, self.has_b = bias_first, bias_second
        A, B = self._factors(d_in, r, d_out, init)          # (d_in, r), (r, d_out)
        if spelling == "linear":
            self.v_proj = nn.Linear(d_in, r, bias=bias_first)
            self.u_proj = nn.Linear(r, d_out, bias=bias_second)
            with torch.no_grad():
                self.v_proj.weight.copy_(A.T)
                self.u_proj.weight.copy_(B.T)
            self._names = ("v_proj.weight", "u_proj.weight")
        elif spelling == "conv1d":
            self.down = Conv1D(d_in, r)
            self.up = Conv1D(r, d_out)
            with torch.no_grad():
                self.down.weight.copy_(A)
                self.up.weight.copy_(B)
            self._names = ("down.weight", "up.weight")
        elif spelling == "matmul":
            self.A, self.B = nn.Parameter(A.clone()), nn.Parameter(B.clone())
            self._names = ("A", "B")
        elif spelling == "einsum_heads":
            self.h1, self.e1 = _factor2(d_in, rng)
            self.h2, self.e2 = _factor2(d_out, rng)
            self.A = nn.Parameter(A.reshape(self.h1, self.e1, r).clone())
            self.B = nn.Parameter(B.reshape(r, self.h2, self.e2).clone())
            self._names = ("A", "B")
        else:                                 # flinear, matmul_T, einsum: (out, in) weights
            self.V, self.U = nn.Parameter(A.T.clone()), nn.Parameter(B.T.clone())
            self._names = ("V", "U")
        if spelling not in ("linear", "conv1d"):
            self.a = _b(r) if bias_first else None
            self.b = _b(d_out) if bias_second else None
        if inner == "svals":
            self.s = nn.Parameter(torch.rand(r) + 0.5)
        self.drop = nn.Dropout(0.25)
        self.absorbed = 0       # elements of a 1-D weight added right after the pair (becomes its bias)

    @staticmethod
    def _factors(d_in, r, d_out, init):
        if init == "svd":        # ASVD/SVD-LLM: sqrt of the singular values folded into both factors
            W = torch.randn(d_in, d_out) / math.sqrt(d_in)
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            s = S[:r].sqrt()
            return U[:, :r] * s, s[:, None] * Vh[:r]
        if init == "decay":      # a quickly decaying spectrum (ill-conditioned factors)
            A = torch.randn(d_in, r) / math.sqrt(d_in)
            B = torch.randn(r, d_out) / math.sqrt(r)
            return A, B * torch.logspace(0, -2, r)[:, None]
        return torch.randn(d_in, r) / math.sqrt(d_in), torch.randn(r, d_out) / math.sqrt(r)

    # --- the two linears, each in the pair's spelling
    def first(self, x):
        s = self.spelling
        if s == "linear":
            return self.v_proj(x)
        if s == "conv1d":
            return self.down(x)
        if s == "flinear":
            return F.linear(x, self.V, self.a)
        if s == "matmul":
            y = x @ self.A
        elif s == "matmul_T":
            y = x @ self.V.T
        elif s == "einsum":
            y = torch.einsum("...d,rd->...r", x, self.V)
        else:   # einsum_heads: contract (heads, channels) of the input
            y = torch.einsum("...he,her->...r", x.unflatten(-1, (self.h1, self.e1)), self.A)
        return y + self.a if self.a is not None else y

    def second(self, h):
        s = self.spelling
        if s == "linear":
            return self.u_proj(h)
        if s == "conv1d":
            return self.up(h)
        if s == "flinear":
            y = F.linear(h, self.U)
        elif s == "matmul":         # the bias is added before the view back, as MatmulChain does
            y = h.reshape(-1, self.r) @ self.B
            y = y + self.b if self.b is not None else y
            return y.reshape(*h.shape[:-1], self.d_out)
        elif s == "matmul_T":
            y = h @ self.U.T
        elif s == "einsum":
            y = torch.einsum("...r,or->...o", h, self.U)
        else:
            y = torch.einsum("...r,rhe->...he", h, self.B).flatten(-2)
        return y + self.b if self.b is not None else y

    def between(self, h):
        i = self.inner
        if i == "dropout":
            return self.drop(h)
        if i == "reshape":
            return h.reshape(-1, self.r).view(h.shape)
        if i == "contiguous":
            return h.contiguous()
        if i == "clone":
            return h.clone()
        if i == "cast_same":
            return h.to(h.dtype)
        if i == "flatten":
            return h.flatten(0, -2).unflatten(0, h.shape[:-1]) if h.dim() > 2 else h.flatten(0, -2)
        if i == "unsqueeze":
            return h.unsqueeze(0).squeeze(0)
        if i == "svals":
            return h * self.s
        return h

    def forward(self, x):
        return self.second(self.between(self.first(x)))

    @property
    def absorbs_add(self) -> bool:
        """A 1-D weight of size d_out added right after the pair is the second linear's bias
        (the pass folds ``y + b`` into the linear when the linear has none)."""
        return not self.has_b and self.spelling in ("linear", "flinear", "matmul_T", "einsum")

    def expect(self, path: str) -> ChainExpect:
        status = "any" if self.inner in INNER_BREAK else "apply"
        bias = self.has_a or self.has_b or self.absorbed > 0
        return ChainExpect(key=path, weights=tuple(f"{path}.{n}" if path else n for n in self._names),
                           status=status, params=sum(p.numel() for n, p in self.named_parameters()
                                                     if n != "s") + self.absorbed,
                           d_in=self.d_in, r=self.r, d_out=self.d_out, bias=bias)


DENSE_SPELLINGS = ("linear", "flinear", "conv1d", "matmul_T", "einsum")


class Dense(nn.Module):
    """One projection ``x W + b`` in one spelling."""

    def __init__(self, spelling: str, d_in: int, d_out: int, bias: bool = True):
        super().__init__()
        self.spelling = spelling
        if spelling == "linear":
            self.lin = nn.Linear(d_in, d_out, bias=bias)
        elif spelling == "conv1d":
            self.lin = Conv1D(d_in, d_out)
        else:
            self.W = _w(d_out, d_in, fan_in=d_in)
            self.b = _b(d_out) if bias else None

    @property
    def has_bias(self) -> bool:
        if self.spelling == "linear":
            return self.lin.bias is not None
        return self.spelling == "conv1d" or self.b is not None

    @property
    def absorbs_add(self) -> bool:
        return not self.has_bias and self.spelling in ("linear", "flinear", "matmul_T", "einsum")

    def forward(self, x):
        s = self.spelling
        if s in ("linear", "conv1d"):
            return self.lin(x)
        if s == "flinear":
            y = F.linear(x, self.W)
        elif s == "matmul_T":
            y = x @ self.W.T
        else:
            y = torch.einsum("...d,od->...o", x, self.W)
        return y + self.b if self.b is not None else y


def random_pair(rng: random.Random, d_in: int, d_out: int, spellings=SPELLINGS, r: int | None = None,
                inner_p: float = 0.2) -> LowRank:
    spelling = rng.choice(spellings)
    r = r if r is not None else random_rank(rng, d_in, d_out)
    inner = "none"
    if rng.random() < inner_p:
        inner = rng.choice(INNER_KEEP[1:] + INNER_BREAK)
    return LowRank(spelling, d_in, r, d_out, bias_first=rng.random() < 0.3, bias_second=rng.random() < 0.6,
                   inner=inner, init=rng.choice(["gauss", "gauss", "svd", "decay"]), rng=rng)


def random_rank(rng: random.Random, d_in: int, d_out: int) -> int:
    m = min(d_in, d_out)
    u = rng.random()
    if u < 0.15:
        return 1
    if u < 0.3:
        return m - 1
    return rng.randint(1, m - 1)


def random_width(rng: random.Random, lo: int = 2, hi: int = 80) -> int:
    u = rng.random()
    if u < 0.1:
        return rng.randint(lo, min(lo + 4, hi))
    return rng.randint(lo, hi)


# ------------------------------------------------------------------------------ connectors
ACTS = ("gelu", "gelu_tanh", "silu", "relu")
UNARY = ("tanh", "sigmoid", "neg")          # other element-wise ops (a chain may hand its order through them)
CONNECTORS = ACTS + UNARY + ("layernorm", "rmsnorm", "rmsnorm_hf", "residual", "scale", "div", "rscale", "cast",
                     "dropout", "fdropout", "reshape", "flatten", "transpose", "shift")


class HFRMSNorm(nn.Module):
    """Llama's RMSNorm: computed in float32 for half inputs, weight applied after the cast back."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(d))
        self.eps = eps

    def forward(self, x):
        dt = x.dtype
        h = x.to(torch.float32) if dt in (torch.float16, torch.bfloat16) else x
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dt)


def make_norm(kind: str, d: int) -> nn.Module:
    if kind == "layernorm":
        m = nn.LayerNorm(d)
        with torch.no_grad():
            m.weight.add_(0.1 * torch.randn(d))
            m.bias.add_(0.1 * torch.randn(d))
        return m
    if kind == "rmsnorm":
        m = nn.RMSNorm(d)
        with torch.no_grad():
            m.weight.add_(0.1 * torch.randn(d))
        return m
    return HFRMSNorm(d)


class Connect(nn.Module):
    """A sequence of ops between two layers; ``residual`` adds ``skip`` (same shape)."""

    def __init__(self, kinds: list[str], d: int):
        super().__init__()
        self.kinds = list(kinds)
        self.norms = nn.ModuleDict({str(i): make_norm(k, d) for i, k in enumerate(kinds)
                                    if k in ("layernorm", "rmsnorm", "rmsnorm_hf")})
        self.shifts = nn.ParameterDict({str(i): _b(d) for i, k in enumerate(kinds) if k == "shift"})
        self.drop = nn.Dropout(0.3)

    def forward(self, y, skip=None):
        for i, k in enumerate(self.kinds):
            if k == "gelu":
                y = F.gelu(y)
            elif k == "gelu_tanh":
                y = F.gelu(y, approximate="tanh")
            elif k == "silu":
                y = F.silu(y)
            elif k == "relu":
                y = torch.relu(y)
            elif k == "tanh":
                y = torch.tanh(y)
            elif k == "sigmoid":
                y = torch.sigmoid(y)
            elif k == "neg":
                y = -y
            elif k in ("layernorm", "rmsnorm", "rmsnorm_hf"):
                y = self.norms[str(i)](y)
            elif k == "residual":
                y = y + skip
            elif k == "scale":
                y = y * 0.75
            elif k == "div":
                y = y / 1.5
            elif k == "rscale":
                y = 1.25 * y
            elif k == "cast":
                wide = torch.float32 if y.dtype in (torch.float16, torch.bfloat16) else torch.float64
                y = y.to(wide).to(y.dtype)
            elif k == "dropout":
                y = self.drop(y)
            elif k == "fdropout":
                y = F.dropout(y, p=0.2, training=False)
            elif k == "reshape":
                y = y.reshape(-1, y.shape[-1]).view(y.shape)
            elif k == "flatten":
                y = y.flatten(0, -2) if y.dim() > 2 else y.unsqueeze(0)
            elif k == "transpose":      # contiguous: GPT-2's Conv1D views its input
                y = y.transpose(0, -2).contiguous() if y.dim() > 2 else y
            elif k == "shift":
                y = y + self.shifts[str(i)]
        return y


def random_connector(rng: random.Random, allow_residual: bool, max_len: int = 3) -> list[str]:
    n = min(rng.choice([0, 1, 1, 1, 2, 2, 3]), max_len)
    kinds = [rng.choice(CONNECTORS) for _ in range(n)]
    kinds = [k for k in kinds if k != "residual"]
    if allow_residual and rng.random() < 0.3:
        kinds.insert(0, "residual")     # first, while y still has skip's shape
    return kinds


# ------------------------------------------------------------------------------ families
class Seq(nn.Module):
    """Layers applied in turn (``layers.<i>``; a plain module rather than ``nn.Sequential``,
    whose compiled parameter names carry the wrapper's own prefix)."""

    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for m in self.layers:
            x = m(x)
        return x

    def __getitem__(self, i: int) -> nn.Module:
        return self.layers[i]

    def __iter__(self):
        return iter(self.layers)


class ChainStack(nn.Module):
    """Chains (and a few dense layers) feeding each other through connectors."""

    def __init__(self, widths: list[int], layers: list[nn.Module], connectors: list[list[str]]):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.connect = nn.ModuleList([Connect(k, widths[i + 1]) for i, k in enumerate(connectors)])
        for layer, kinds in zip(layers, connectors):
            if isinstance(layer, LowRank) and kinds[:1] == ["shift"] and layer.absorbs_add:
                layer.absorbed = layer.d_out

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            y = layer(x)
            if i < len(self.connect):
                y = self.connect[i](y, x)
            x = y
        return x


def make_chain_chain(rng: random.Random) -> Case:
    n = rng.choice([2, 2, 2, 3, 3, 4])
    widths = [random_width(rng, 2, 80)]
    layers, connectors = [], []
    for i in range(n):
        d_in = widths[-1]
        same = rng.random() < 0.35
        d_out = d_in if same else random_width(rng, 2, 80)
        dense = i > 0 and rng.random() < 0.12
        if min(d_in, d_out) < 2 or dense:
            layers.append(Dense(rng.choice(DENSE_SPELLINGS), d_in, d_out, bias=rng.random() < 0.5))
            dense = True
        else:
            layers.append(random_pair(rng, d_in, d_out))
        widths.append(d_out)
        if i < n - 1:
            kinds = random_connector(rng, allow_residual=(d_in == d_out))
            if dense and not any(k in kinds for k in ACTS + ("layernorm", "rmsnorm", "rmsnorm_hf")):
                kinds.append(rng.choice(ACTS))     # a dense layer never forms a chain with the next
            connectors.append(kinds)
    x = _tokens(rng, widths[0])
    model = ChainStack(widths, layers, connectors)
    desc = {"widths": widths, "layers": [_describe(m) for m in layers], "connectors": connectors,
            "x": list(x.shape)}
    return Case("chain_chain", model, (x,), desc)


def _describe(m: nn.Module) -> str:
    if isinstance(m, LowRank):
        return f"{m.spelling}({m.d_in}-{m.r}-{m.d_out}{',a' if m.has_a else ''}{',b' if m.has_b else ''}" \
               f"{',' + m.inner if m.inner != 'none' else ''})"
    if isinstance(m, Dense):
        return f"dense:{m.spelling}"
    return type(m).__name__


def _tokens(rng: random.Random, d: int, rank3: float = 0.85) -> torch.Tensor:
    u = rng.random()
    B = 1 if u < 0.25 else rng.randint(1, 3)
    T = 1 if rng.random() < 0.2 else rng.randint(1, 9)
    if rng.random() < rank3:
        return torch.randn(B, T, d)
    return torch.randn(T, d)


class MLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` (SwiGLU/GeGLU) or ``down(act(up(x)))``; each projection
    low-rank or dense; optionally pre-norm and residual."""

    def __init__(self, d: int, hidden: int, gated: bool, act: str, rng: random.Random,
                 lowrank_p: float = 0.85, norm: str | None = None, residual: bool = False):
        super().__init__()
        self.gated, self.act, self.residual = gated, act, residual
        self.norm = make_norm(norm, d) if norm else None

        def proj(d_in, d_out):
            if min(d_in, d_out) >= 2 and rng.random() < lowrank_p:
                return random_pair(rng, d_in, d_out)
            return Dense(rng.choice(DENSE_SPELLINGS), d_in, d_out, bias=rng.random() < 0.3)

        if gated:
            self.gate = proj(d, hidden)
        self.up = proj(d, hidden)
        self.down = proj(hidden, d)

    def forward(self, x):
        h = self.norm(x) if self.norm is not None else x
        act = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
               "relu": torch.relu}[self.act]
        if self.gated:
            y = self.down(act(self.gate(h)) * self.up(h))
        else:
            y = self.down(act(self.up(h)))
        return x + y if self.residual else y


def make_swiglu(rng: random.Random) -> Case:
    d = random_width(rng, 3, 64)
    hidden = random_width(rng, 3, 96)
    layers = rng.choice([1, 1, 2, 3])
    gated = rng.random() < 0.8
    act = "silu" if gated and rng.random() < 0.7 else rng.choice(ACTS)
    norm = rng.choice([None, "rmsnorm", "rmsnorm_hf", "layernorm"])
    model = Seq(*[MLP(d, hidden, gated, act, rng, norm=norm, residual=layers > 1 or rng.random() < 0.5)
                            for _ in range(layers)])
    x = _tokens(rng, d)
    desc = {"d": d, "hidden": hidden, "layers": layers, "gated": gated, "act": act, "norm": norm,
            "mlp": [[_describe(getattr(m, n)) for n in ("gate", "up", "down") if hasattr(m, n)] for m in model],
            "x": list(x.shape)}
    return Case("swiglu", model, (x,), desc)


class SharedBasisStack(nn.Module):
    """Basis Sharing: one basis linear ``d -> r`` reused by every layer, each layer with its own
    coefficient linear ``r -> d_out``. ``mode="layers"``: the basis is applied to each layer's
    own input (one chain per layer). ``mode="fanout"``: the basis output is computed once and
    read by every coefficient linear (Palu's block-diagonal up-projection, concatenated), so
    the intermediate has other users and no chain may be rewritten."""

    def __init__(self, d: int, r: int, layers: int, mode: str, rng: random.Random):
        super().__init__()
        self.mode = mode
        self.basis_spelling = rng.choice(["linear", "flinear", "matmul_T"])
        self.coef_spelling = rng.choice(["linear", "flinear", "matmul_T"])
        self.d, self.r = d, r
        if self.basis_spelling == "linear":
            self.basis = nn.Linear(d, r, bias=rng.random() < 0.3)
        else:
            self.basis_w = _w(r, d, fan_in=d)
        outs = [d] * layers if mode == "layers" else [rng.randint(2, 24) for _ in range(layers)]
        self.outs = outs
        self.coefs = nn.ModuleList()
        for o in outs:
            self.coefs.append(Dense(self.coef_spelling, r, o, bias=rng.random() < 0.6))
        self.connect = nn.ModuleList([Connect(random_connector(rng, allow_residual=True), d)
                                      for _ in outs]) if mode == "layers" else None

    def base(self, x):
        if self.basis_spelling == "linear":
            return self.basis(x)
        if self.basis_spelling == "flinear":
            return F.linear(x, self.basis_w)
        return x @ self.basis_w.T

    def forward(self, x):
        if self.mode == "layers":
            for coef, con in zip(self.coefs, self.connect):
                x = con(coef(self.base(x)), x)
            return x
        h = self.base(x)
        return torch.cat([coef(h) for coef in self.coefs], dim=-1)

    def expect(self, path: str) -> list[ChainExpect]:
        pre = f"{path}." if path else ""
        bw = f"{pre}basis.weight" if self.basis_spelling == "linear" else f"{pre}basis_w"
        out = []
        absorbed = [o if self.mode == "layers" and con.kinds[:1] == ["shift"] and coef.absorbs_add else 0
                    for o, coef, con in zip(self.outs, self.coefs, self.connect or [None] * len(self.outs))]
        basis_params = sum(p.numel() for n, p in self.named_parameters() if n.startswith("basis"))
        basis_bias = self.basis_spelling == "linear" and self.basis.bias is not None
        for i, (coef, o) in enumerate(zip(self.coefs, self.outs)):
            cw = f"{pre}coefs.{i}.lin.weight" if coef.spelling == "linear" else f"{pre}coefs.{i}.W"
            legal = o > self.r and self.d > self.r
            if self.mode == "layers":
                status = "apply" if legal else "any"
            else:
                status = "skip:other users" if legal else "any"
            out.append(ChainExpect(key=f"{pre}coefs.{i}", weights=(bw, cw), status=status,
                                   shared=(bw,) if len(self.outs) > 1 else (),
                                   params=basis_params + sum(p.numel() for p in coef.parameters()) + absorbed[i],
                                   d_in=self.d, r=self.r, d_out=o,
                                   bias=basis_bias or coef.has_bias or absorbed[i] > 0))
        return out


class TiedStack(nn.Module):
    """One low-rank pair applied by every layer (ALBERT-style sharing), connectors between."""

    def __init__(self, d: int, layers: int, rng: random.Random):
        super().__init__()
        self.pair = random_pair(rng, d, d, inner_p=0.1)
        # no shift right after the pair: it would become the bias of some of its uses only
        kinds = [random_connector(rng, allow_residual=True) for _ in range(layers)]
        kinds = [k[1:] + ["shift"] if k[:1] == ["shift"] else k for k in kinds]
        self.connect = nn.ModuleList([Connect(k, d) for k in kinds])
        self.n = layers

    def forward(self, x):
        for con in self.connect:
            x = con(self.pair(x), x)
        return x


def make_shared(rng: random.Random) -> Case:
    mode = rng.choice(["layers", "layers", "fanout", "tied"])
    if mode == "tied":
        d = random_width(rng, 3, 64)
        m = TiedStack(d, rng.choice([2, 3]), rng)
        x = _tokens(rng, d)
        return Case("shared", Seq(m), (x,), {"mode": mode, "d": d, "layers": m.n,
                                                       "pair": _describe(m.pair),
                                                       "connectors": [c.kinds for c in m.connect],
                                                       "x": list(x.shape)})
    d = random_width(rng, 3, 64)
    r = random_rank(rng, d, d) if d > 2 else 1
    layers = rng.choice([2, 3, 4])
    model = Seq(SharedBasisStack(d, r, layers, mode, rng))
    x = _tokens(rng, d)
    m = model[0]
    desc = {"mode": mode, "d": d, "r": r, "layers": layers, "basis": m.basis_spelling, "coef": m.coef_spelling,
            "outs": m.outs, "x": list(x.shape)}
    return Case("shared", model, (x,), desc)


# ------------------------------------------------------------------------------ attention
FUSED_STYLES = ("slice", "split", "chatglm", "falcon", "falcon_select", "neox", "vit", "chunk")
MHA_ONLY_STYLES = ("neox", "vit", "chunk")


class Attention(nn.Module):
    """Self-attention with q/k/v/o each dense or low-rank, or one fused QKV projection.

    ``fused``: None or a layout in :data:`FUSED_STYLES`; ``attn``: "sdpa" (GQA by
    expand/repeat_interleave), "sdpa_gqa" (``enable_gqa``), "eager" (matmul + softmax),
    "einsum"; ``rope``: "none" | "full" | "partial"."""

    def __init__(self, d: int, heads: int, kvh: int, hd: int, rng: random.Random, lowrank_p: float,
                 fused: str | None, rope: str, attn: str, causal: bool, gqa_style: str, qk_norm: bool,
                 bias: bool, cache: str = "none"):
        super().__init__()
        self.cache = cache      # "none" | "k" | "kv": also return the keys (and values) as a KV cache would
        self.d, self.h, self.kvh, self.hd = d, heads, kvh, hd
        self.fused, self.rope, self.attn, self.causal = fused, rope, attn, causal
        self.gqa_style, self.qk_norm = gqa_style, qk_norm
        self.lowrank: dict[str, bool] = {}

        def proj(name, d_in, d_out):
            lr = min(d_in, d_out) >= 2 and rng.random() < lowrank_p
            self.lowrank[name] = lr
            if lr:
                return random_pair(rng, d_in, d_out, inner_p=0.1)
            return Dense(rng.choice(DENSE_SPELLINGS), d_in, d_out, bias=bias)

        if fused:
            self.qkv = proj("qkv", d, (heads + 2 * kvh) * hd)
            self.lowrank.update(q=self.lowrank["qkv"], k=self.lowrank["qkv"], v=self.lowrank["qkv"])
        else:
            self.q = proj("q", d, heads * hd)
            self.k = proj("k", d, kvh * hd)
            self.v = proj("v", d, kvh * hd)
        self.o = proj("o", heads * hd, d)
        if qk_norm:
            self.q_norm = nn.RMSNorm(hd)
            self.k_norm = nn.RMSNorm(hd)

    def split(self, x):
        """(q, k, v) as (B, heads, T, hd), (B, kvh, T, hd) x2."""
        B, T = x.shape[0], x.shape[1]
        h, kvh, hd = self.h, self.kvh, self.hd
        if not self.fused:
            q, k, v = self.q(x), self.k(x), self.v(x)
            return (q.view(B, T, h, hd).transpose(1, 2), k.view(B, T, kvh, hd).transpose(1, 2),
                    v.view(B, T, kvh, hd).transpose(1, 2))
        qkv = self.qkv(x)
        s = self.fused
        if s == "slice":          # Phi-3
            q = qkv[..., : h * hd]
            k = qkv[..., h * hd: (h + kvh) * hd]
            v = qkv[..., (h + kvh) * hd:]
        elif s == "split":        # Qwen-1 / generic
            q, k, v = qkv.split([h * hd, kvh * hd, kvh * hd], dim=-1)
        elif s == "chatglm":      # split, then views with the head dim inferred
            q, k, v = qkv.split([h * hd, kvh * hd, kvh * hd], dim=-1)
            q = q.view(q.size()[:-1] + (h, hd))
            k = k.view(k.size()[:-1] + (kvh, hd))
            v = v.view(v.size()[:-1] + (kvh, hd))
            return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        elif s in ("falcon", "falcon_select"):   # per kv group: [g queries, key, value]
            g = h // kvh
            t = qkv.view(B, T, kvh, g + 2, hd)
            q = t[:, :, :, :-2]
            if s == "falcon":
                k, v = t[:, :, :, [-2]], t[:, :, :, [-1]]
            else:
                k, v = t[:, :, :, -2].unsqueeze(3), t[:, :, :, -1].unsqueeze(3)
            k = torch.broadcast_to(k, q.shape)
            v = torch.broadcast_to(v, q.shape)
            q, k, v = (u.flatten(2, 3).transpose(1, 2) for u in (q, k, v))
            return q, k, v          # kv already broadcast to every query head
        elif s == "neox":         # per head: [q, k, v]
            t = qkv.view(B, T, h, 3 * hd)
            q, k, v = t[..., :hd], t[..., hd: 2 * hd], t[..., 2 * hd:]
            return q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        elif s == "vit":          # timm: reshape (B, T, 3, h, hd), permute, unbind
            t = qkv.reshape(B, T, 3, h, hd).permute(2, 0, 3, 1, 4)
            return t.unbind(0)
        else:                     # chunk
            q, k, v = qkv.chunk(3, dim=-1)
        return (q.reshape(B, T, h, hd).transpose(1, 2), k.reshape(B, T, kvh, hd).transpose(1, 2),
                v.reshape(B, T, kvh, hd).transpose(1, 2))

    def forward(self, x):
        B, T = x.shape[0], x.shape[1]
        q, k, v = self.split(x)
        kvh = k.shape[1]
        v_cache = v
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope == "full":
            q, k = apply_rope(q, self.hd), apply_rope(k, self.hd)
        elif self.rope == "partial":
            r = self.hd // 2
            q = torch.cat((apply_rope(q[..., :r], r), q[..., r:]), dim=-1)
            k = torch.cat((apply_rope(k[..., :r], r), k[..., r:]), dim=-1)
        k_cache = k
        g = self.h // kvh
        if self.attn == "sdpa_gqa":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, enable_gqa=g > 1)
        else:
            if g > 1:
                if self.gqa_style == "expand":
                    k = k[:, :, None].expand(B, kvh, g, T, self.hd).reshape(B, self.h, T, self.hd)
                    v = v[:, :, None].expand(B, kvh, g, T, self.hd).reshape(B, self.h, T, self.hd)
                else:
                    k = k.repeat_interleave(g, dim=1)
                    v = v.repeat_interleave(g, dim=1)
            if self.attn == "sdpa":
                o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
            else:
                if self.attn == "einsum":
                    s = torch.einsum("bhtd,bhsd->bhts", q, k) / math.sqrt(self.hd)
                else:
                    s = (q @ k.transpose(-1, -2)) / math.sqrt(self.hd)
                if self.causal:
                    s = s + torch.full((T, T), float("-inf"), dtype=s.dtype).triu(1)
                p = torch.softmax(s, dim=-1)
                o = torch.einsum("bhts,bhsd->bhtd", p, v) if self.attn == "einsum" else p @ v
        o = o.transpose(1, 2).reshape(B, T, self.h * self.hd)
        out = self.o(o)
        if self.cache == "k":
            return out, k_cache
        if self.cache == "kv":
            return out, k_cache, v_cache
        return out

    def expect(self, path: str) -> AttnExpect:
        lr = self.lowrank
        possible = {"bd_vo"}
        if self.rope != "full" and not self.qk_norm:
            possible.add("bd_qk")
        required = set()
        if not lr["v"] and not lr["o"] and self.cache != "kv":
            required.add("bd_vo")
        if "bd_qk" in possible and not lr["q"] and not lr["k"] and self.cache == "none":
            required.add("bd_qk")
        # a returned cache escapes: the pairs it holds must be skipped (the fuzzer compares every
        # output, so a rewrite of them shows as a wrong cache)
        return AttnExpect(path=path, required=required, possible=possible)

    def describe(self) -> dict:
        projs = ("qkv", "o") if self.fused else ("q", "k", "v", "o")
        return {"d": self.d, "heads": self.h, "kvh": self.kvh, "hd": self.hd, "fused": self.fused,
                "rope": self.rope, "attn": self.attn, "causal": self.causal, "gqa_style": self.gqa_style,
                "qk_norm": self.qk_norm, "cache": self.cache,
                "proj": {p: _describe(getattr(self, p)) for p in projs}}


class MLA(LatentAttention):
    """DeepSeek-style latent attention (K-nope and V from one latent, RoPE on a shared part)."""

    def expect(self, path: str) -> AttnExpect:
        return AttnExpect(path=path, required={"bd_qk", "bd_vo"}, possible={"bd_qk", "bd_vo"})

    def describe(self) -> dict:
        return {"mla": True, "heads": self.h, "nope": self.nope, "rope": self.rd, "v": self.vd,
                "latent": self.latent}


def random_attention(rng: random.Random, d: int | None = None, lowrank_p: float = 0.5,
                     fused_p: float = 0.3, fused_style: str | None = None,
                     cache_p: float = 0.0) -> tuple[Attention, int]:
    hd = rng.choice([h for h in (2, 3, 4, 6, 8, 12, 16) if d is None or h < d])
    kvh = rng.choice([1, 1, 2, 3])
    g = rng.choice([1, 1, 2, 3, 4])
    heads = kvh * g
    if d is None:
        d = rng.choice([heads * hd + rng.randint(-hd + 1, 24), hd + rng.randint(1, 20), heads * hd])
    d = max(d, hd + 1)
    fused = None
    if fused_style or rng.random() < fused_p:
        fused = fused_style or rng.choice(FUSED_STYLES)
        if fused in MHA_ONLY_STYLES and kvh != heads:
            kvh = heads
    rope = rng.choice(["none", "full", "partial"])
    if (rope == "full" and hd % 2) or (rope == "partial" and hd % 4):
        rope = "none"
    attn = rng.choice(["sdpa", "sdpa_gqa", "eager", "einsum"])
    m = Attention(d, heads, kvh, hd, rng, lowrank_p, fused, rope, attn, causal=rng.random() < 0.7,
                  gqa_style=rng.choice(["expand", "repeat_interleave"]), qk_norm=rng.random() < 0.1,
                  bias=rng.random() < 0.5, cache=rng.choice(["k", "kv"]) if rng.random() < cache_p else "none")
    return m, d


def make_lowrank_attention(rng: random.Random) -> Case:
    """One attention block, q/k/v/o mostly low-rank."""
    m, d = random_attention(rng, lowrank_p=0.75, fused_p=0.0, cache_p=0.2)
    x = _seq(rng, d)
    return Case("lowrank_attn", Seq(m), (x,), {**m.describe(), "x": list(x.shape)})


def make_fused_qkv(rng: random.Random) -> Case:
    """One attention block with a fused QKV projection (dense or low-rank) in a grouped layout,
    optionally followed by a low-rank MLP."""
    m, d = random_attention(rng, lowrank_p=0.35, fused_p=1.0, cache_p=0.15)
    layers = [m]
    if m.cache == "none" and rng.random() < 0.5:
        layers.append(MLP(d, random_width(rng, 3, 64), rng.random() < 0.5, rng.choice(ACTS), rng,
                          norm=rng.choice([None, "rmsnorm", "layernorm"]), residual=True))
    x = _seq(rng, d)
    return Case("fused_qkv", Seq(*layers), (x,), {**m.describe(), "mlp": len(layers) > 1,
                                                             "x": list(x.shape)})


def _seq(rng: random.Random, d: int) -> torch.Tensor:
    B = 1 if rng.random() < 0.3 else rng.randint(1, 3)
    T = 1 if rng.random() < 0.15 else rng.randint(2, 10)
    return torch.randn(B, T, d)


class Block(nn.Module):
    """Pre-norm transformer layer: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, d: int, attn: nn.Module, mlp: nn.Module, norm: str):
        super().__init__()
        self.norm1, self.norm2 = make_norm(norm, d), make_norm(norm, d)
        self.attn, self.mlp = attn, mlp

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Blocks(nn.Module):
    def __init__(self, blocks: list[Block], head: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = head

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x) if self.head is not None else x


def make_blocks(rng: random.Random) -> Case:
    """Several pre-norm layers: attention (dense, low-rank, fused or MLA) next to low-rank MLPs
    (chains next to BD rewrites), optionally a low-rank head."""
    n = rng.choice([1, 2, 2, 3])
    first, d = random_attention(rng, lowrank_p=rng.choice([0.0, 0.3, 0.6]), fused_p=0.25)
    norm = rng.choice(["layernorm", "rmsnorm", "rmsnorm_hf"])
    blocks = []
    hidden = random_width(rng, 3, 96)
    gated = rng.random() < 0.5
    act = "silu" if gated else rng.choice(ACTS)
    mla = d >= 8 and rng.random() < 0.15
    for i in range(n):
        if mla:
            latent = rng.randint(4, 24)
            attn = MLA(d=d, heads=rng.choice([1, 2, 4]), latent=latent, nope=rng.randint(2, latent - 1),
                       rope_dim=rng.choice([2, 4, 6]), v_dim=rng.randint(2, latent - 1))
        elif i == 0:
            attn = first
        else:
            attn, _ = random_attention(rng, d=d, lowrank_p=rng.choice([0.0, 0.3, 0.6]), fused_p=0.25)
        mlp = MLP(d, hidden, gated, act, rng, lowrank_p=0.85)
        blocks.append(Block(d, attn, mlp, norm))
    head = None
    if rng.random() < 0.3:
        out = random_width(rng, 3, 64)
        head = random_pair(rng, d, out) if min(d, out) >= 2 else None
    model = Blocks(blocks, head)
    x = _seq(rng, d)
    desc = {"layers": n, "d": d, "norm": norm, "attn": [b.attn.describe() for b in blocks],
            "mlp": [[_describe(getattr(b.mlp, p)) for p in ("gate", "up", "down") if hasattr(b.mlp, p)]
                    for b in blocks], "head": _describe(head) if head is not None else None, "x": list(x.shape)}
    return Case("blocks", model, (x,), desc)


FAMILIES: dict[str, Callable[[random.Random], Case]] = {
    "chain_chain": make_chain_chain,
    "swiglu": make_swiglu,
    "shared": make_shared,
    "lowrank_attn": make_lowrank_attention,
    "fused_qkv": make_fused_qkv,
    "blocks": make_blocks,
}


def build(family: str, seed: int) -> Case:
    rng = random.Random(f"{family}:{seed}")
    torch.manual_seed(seed)
    case = FAMILIES[family](rng)
    case.model.eval()
    case.expectations()
    return case


def as_dtype(case: Case, dtype: torch.dtype) -> Case:
    case.model.to(dtype)
    case.args = tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                      for a in case.args)
    case.dtype = dtype
    return case


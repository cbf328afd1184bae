"""Muon for the hidden matrices, AdamW for the rest, in one `torch.optim.Optimizer`.

Muon (Jordan et al., 2024, "Muon: An optimizer for hidden layers in neural networks"; the optimiser of
the NanoGPT and airbench speed records): SGD momentum whose update, reshaped to a matrix (out, fan-in),
is replaced by its nearest semi-orthogonal matrix, found with a few Newton–Schulz iterations. Every
direction of the matrix then moves by the same amount, instead of the few that dominate the gradient.

The update is scaled to the root-mean-square of an AdamW update (0.2·√max(out, fan-in), Liu et al.,
2025, "Muon is Scalable for LLM Training"), so both kinds of group share the recipe's learning rate,
schedule and decoupled weight decay. Which parameters are "hidden" is `muon_params`' rule.

Beside it, `Lookahead` (`--lookahead`): airbench's slow copy of the weights, which the training loop
updates every few steps on top of any optimiser.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.adamw import adamw

# the quintic's coefficients from the Muon write-up: they drive singular values into ~[0.7, 1.2] in 5 steps
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
_NS_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def orthogonalize(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The approximate U Vᵀ of each matrix g = U S Vᵀ in (..., rows, cols), by `steps` Newton–Schulz
    iterations in `dtype` (bf16 suffices: the iteration only has to land singular values near 1)."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype).reshape(-1, *g.shape[-2:])  # (n, rows, cols)
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # singular values ≤ 1, where the iteration converges
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    for _ in range(steps):
        A = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(A, A, A, beta=b, alpha=c), x, beta=a)  # a·x + (b·A + c·A²)·x
    return (x.mT if tall else x).reshape(g.shape)


def muon_params(model: nn.Module) -> set[str]:
    """Names of the parameters Muon trains: ≥ 2-D weights of the transformer blocks and of the tokenizer's
    convolutions after the first. The input layer (first conv, word embedding), the positional embedding,
    the sequence pooling and the classifier stay with AdamW, as in the Muon write-up."""
    names = set()
    convs_seen = 0
    for name, p in model.named_parameters():
        if not p.requires_grad or p.ndim < 2:
            continue
        if name.startswith("blocks."):
            names.add(name)
        elif name.startswith("tokenizer.") and p.ndim == 4:
            if convs_seen:
                names.add(name)
            convs_seen += 1
    return names


class MuonAdamW(torch.optim.Optimizer):
    """Groups with `muon=True` take Muon steps, the others AdamW steps; `lr` and `weight_decay` mean the
    same in both (decoupled decay, p ← p·(1 − lr·wd)). `ns_precision="bf16"` runs the Newton–Schulz
    iterations in bf16, for where the training does (on an AMX CPU they are then nearly free)."""

    def __init__(self, groups: list[dict], *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, momentum: float = 0.95, ns_steps: int = 5,
                 ns_precision: str = "fp32"):
        assert ns_precision in _NS_DTYPES, f"ns_precision must be one of {tuple(_NS_DTYPES)}, got {ns_precision!r}"
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, momentum=momentum, ns_steps=ns_steps,
                                      ns_precision=ns_precision, weight_decay=0.0, muon=False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            (self._muon if group["muon"] else self._adamw)(group, params)
        return loss

    def _muon(self, group: dict, params: list[torch.Tensor]) -> None:
        if group["weight_decay"]:  # decoupled, as torch's AdamW applies it
            torch._foreach_mul_(params, 1.0 - group["lr"] * group["weight_decay"])
        mu = group["momentum"]
        for p in params:
            if not self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        bufs, grads = [self.state[p]["momentum_buffer"] for p in params], [p.grad for p in params]
        torch._foreach_lerp_(bufs, grads, 1 - mu)
        updates = [g.lerp(b, mu) for g, b in zip(grads, bufs)]  # Nesterov
        # matrices of one shape orthogonalised as one batch: (n, out, fan-in), a conv's filters as rows
        by_shape: dict[tuple, list[int]] = {}
        for i, u in enumerate(updates):
            by_shape.setdefault((u.shape[0], u[0].numel()), []).append(i)
        for (rows, cols), idx in by_shape.items():
            batch = torch.stack([updates[i].reshape(rows, cols) for i in idx])
            ortho = orthogonalize(batch, group["ns_steps"], _NS_DTYPES[group["ns_precision"]])
            scale = 0.2 * math.sqrt(max(rows, cols))
            for i, o in zip(idx, ortho):
                params[i].add_(o.view_as(params[i]).to(params[i].dtype), alpha=-group["lr"] * scale)

    def _adamw(self, group: dict, params: list[torch.Tensor]) -> None:
        """torch's own AdamW step (`torch.optim.adamw.adamw`, the function `torch.optim.AdamW` calls), foreach."""
        for p in params:
            if not self.state[p]:
                self.state[p].update(step=torch.zeros(()), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
              [s["step"] for s in states], foreach=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
              weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


class Lookahead:
    """airbench's lookahead (Jordan, 2024, after Zhang et al., 2019, "Lookahead Optimizer: k steps forward,
    1 step back"): a slow copy of `params`, every `every` steps pulled towards them, `slow ← lerp(slow, w, 1 − d)`,
    and copied back, `w ← slow`; after the run's last step the weights are the slow copy (`finish`).

    d = base^every · (t / T)³ for step t of T planned: no smoothing early, while the weights travel far, and at
    the end (d → 0.77) an average over roughly the last 20 steps, as the learning rate ends. T is whatever the run plans when
    the update runs, so a time budget's re-fit moves the schedule with the run's length.
    """

    def __init__(self, params: list[torch.Tensor], *, every: int = 5, base: float = 0.95):
        assert every >= 1 and 0 <= base < 1, f"every must be >= 1 and base in [0, 1), got {every}, {base}"
        self.every, self.base = every, base
        self.params = list(params)  # written in place under no_grad, as an optimiser writes them
        self.slow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int, total_steps: int) -> None:
        """After optimisation step `step` (counted from 1) of `total_steps`; the last one is `finish`'s."""
        if step % self.every or step >= total_steps:
            return
        decay = self.base ** self.every * (step / total_steps) ** 3
        torch._foreach_lerp_(self.slow, self.params, 1 - decay)
        torch._foreach_copy_(self.params, self.slow)

    @torch.no_grad()
    def finish(self) -> None:
        """The run's end: the weights become the slow copy (the fast steps since its last update are dropped)."""
        torch._foreach_copy_(self.params, self.slow)

    def state_dict(self) -> dict:
        return {"slow": [s.clone() for s in self.slow]}

    def load_state_dict(self, state: dict) -> None:
        slow = state["slow"]
        if len(slow) != len(self.slow) or any(a.shape != b.shape for a, b in zip(slow, self.slow)):
            raise ValueError("the lookahead's slow weights do not match the model's parameters")
        for s, saved in zip(self.slow, slow):
            s.copy_(saved)

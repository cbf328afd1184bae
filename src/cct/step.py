"""One optimisation step, its optimiser and its learning-rate schedule.

`TrainStep` is the per-batch work of `cct train`, and `cct bench` times the very same object, so a
benchmark measures exactly what training does. Its body is one ordered list, as nanoGPT's loop:
set lr → augment (→ scale down, at a reduced resolution) → forward → loss (+ the fine labels' head's, for
text with `--fine-aux`) → backward (→ the adversarial pass, for text with FGM) → gradient exchange → step →
zero_grad → metrics.
The learning-rate schedule is a small pure function of the step (`lr_at`); which parameters get
weight decay is part of the recipe (`param_groups`). The batch's kind (uint8 images, token batches)
is settled by its augmentation config (`cct.kinds.augmenter`): the step itself sees the model's
positional arguments and targets.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import typing

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import distributed
from .augment import mixup_target
from .errors import CCTError
from .kinds import TextAugmentConfig, augmenter
from .model import any_token_grid, count_macs
from .optim import Lookahead, MuonAdamW, muon_params
from .policies import AugmentConfig
from .recipes import TrainConfig, parse_res_schedule
from .runtime import autocast


# ---------------------------------------------------------------------- schedule and optimiser
def lr_at(step: int, *, lr: float, total_steps: int, warmup_steps: int = 0, warmup_lr: float = 0.0,
          min_lr: float = 0.0, cooldown_steps: int = 0, schedule: str = "cosine") -> float:
    """The learning rate of optimisation step `step` (0-based).

    Linear warm-up from `warmup_lr`, then constant or a cosine from `lr` to `min_lr` over the steps
    before the cooldown, then `min_lr`. As timm's CosineLRScheduler (warmup_prefix=False), the cosine
    is counted from step 0, so the warm-up overlaps its start.
    """
    if step < warmup_steps:
        return warmup_lr + (lr - warmup_lr) * step / warmup_steps
    if schedule == "constant":
        return lr
    decay_steps = max(1, total_steps - cooldown_steps)
    if step >= decay_steps:
        return min_lr
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * step / decay_steps))


def schedule_steps(cfg: TrainConfig, *, steps_per_epoch: float, total_steps: int) -> tuple[int, int, str | None]:
    """(warm-up steps, cooldown steps, a line for the log when a cap shortened them): a run shortened by --epochs
    or --time-budget keeps a schedule, warm-up at most half its steps and cooldown a quarter."""
    asked = round(cfg.warmup_epochs * steps_per_epoch), round(cfg.cooldown_epochs * steps_per_epoch)
    warmup, cooldown = min(asked[0], total_steps // 2), min(asked[1], total_steps // 4)
    capped = [f"{what} {a} → {b} steps (at most {share} of the run's {total_steps})" for what, a, b, share in
              (("warm-up", asked[0], warmup, "half"), ("cooldown", asked[1], cooldown, "a quarter")) if b < a]
    return warmup, cooldown, ("schedule: " + "; ".join(capped)) if capped else None


def resolution_at(step: int, *, total_steps: int, phases: list[tuple[float, int]], floor: int | None = None) -> int:
    """The input side of optimisation step `step` under progressive resizing (`cct.recipes.parse_res_schedule`):
    the last phase whose start (a fraction of `total_steps`) the step has reached, and at least `floor` (the
    largest side trained so far: a budget's re-fit that lengthens the run moves the phases' starts later, and
    the run must not go back to smaller images)."""
    side = phases[0][1]
    for start, s in phases:
        if step >= start * total_steps:
            side = s
    return max(side, floor or 0)


def res_phases(cfg: TrainConfig, model: nn.Module) -> list[tuple[float, int]] | None:
    """--res-schedule's phases as (start fraction, input height in pixels), checked against the model's tokenizer."""
    if not cfg.res_schedule:
        return None
    H = model.cfg.img_size[0]
    phases = [(start, max(1, round(H * scale))) for start, scale in parse_res_schedule(cfg.res_schedule)]
    for _, side in phases:
        try:
            model.tokenizer.grid(reduced_size(model.cfg.img_size, side))
        except ValueError:
            raise CCTError(f"--res-schedule {cfg.res_schedule!r}: {side} px is too small for {cfg.model}'s "
                           "tokenizer") from None
    return phases


def reduced_size(size: tuple[int, int], side: int) -> tuple[int, int]:
    """The (H, W) input `size` at height `side`, the width in proportion: what a reduced-resolution step trains at."""
    H, W = size
    return side, max(1, round(W * side / H))


def trained_macs(model: nn.Module, images: int, reduced: dict[int, int]) -> int:
    """Forward multiply-accumulates of `images` trained, `reduced[side]` of them at height `side` (progressive
    resizing), the rest at the model's native size."""
    macs = count_macs(model) * (images - sum(reduced.values()))
    for side, n in reduced.items():
        macs += count_macs(model, reduced_size(model.cfg.img_size, side)) * n
    return macs


def resize_batch(x: torch.Tensor, side: int) -> torch.Tensor:
    """Float images (B, C, H, W) scaled so that H becomes `side` (W in proportion), by area averaging: an
    anti-aliased downscale, a 2×2 mean at half size."""
    if side == x.shape[-2]:
        return x
    return F.interpolate(x, size=reduced_size(x.shape[-2:], side), mode="area")


def param_groups(model: nn.Module, weight_decay: float, decay_all: bool) -> list[dict]:
    """Keras decays every variable; timm exempts biases, norms (ndim < 2) and `no_weight_decay()` names."""
    if decay_all:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# devices with a fused AdamW kernel: one pass over each parameter instead of a dozen foreach passes
# (on the 2-core test machine 0.27 ms against 2.1 ms a step for cct_2_3x2_32_keras; bench_cpu.py)
_FUSED_ADAMW_DEVICES = ("cpu", "cuda")

# VAT's probe: how far (L2 norm per text) the power iteration's random start moves the word vectors, small beside
# the move itself yet well above bf16's rounding of them (benchmarks/trec_validation.py's --vat-xi default)
VAT_PROBE = 0.1


def make_optimizer(model: nn.Module, cfg: TrainConfig, *, precision: str = "fp32") -> torch.optim.Optimizer:
    """The recipe's AdamW over `param_groups`, fused where the device has the kernel; or, with
    `optimizer="muon"`, `cct.optim.MuonAdamW` with Muon for `muon_params(model)`, its orthogonalisation
    in bf16 when the training `precision` is."""
    groups = param_groups(model, cfg.weight_decay, cfg.weight_decay_all)
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if cfg.optimizer == "muon":
        names = muon_params(model)
        hidden = [p for n, p in model.named_parameters() if n in names]
        ids = {id(p) for p in hidden}
        rest = [{**g, "params": [p for p in g["params"] if id(p) not in ids]} for g in groups]
        return MuonAdamW([{"params": hidden, "weight_decay": cfg.weight_decay, "muon": True}, *rest], **kwargs,
                         ns_precision="bf16" if precision == "bf16" else "fp32")
    if all(p.device.type in _FUSED_ADAMW_DEVICES and p.is_floating_point() for g in groups for p in g["params"]):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except RuntimeError:  # PyTorch before 2.4 has no fused AdamW on CPUs
            pass
    return torch.optim.AdamW(groups, foreach=True, **kwargs)


def augment_config(cfg: TrainConfig, mean: tuple | None, std: tuple | None) -> AugmentConfig:
    """The recipe's augmentation, normalising with `mean`/`std` (fractions of 255; None: x / 255)."""
    # the alternating flip is the loop's (`cct.train`): it needs the images' indices and the epoch
    return AugmentConfig(translate=cfg.translate, hflip=cfg.hflip and not cfg.alternate_flip,
                         rrc_scale=cfg.rrc_scale, rrc_interpolation=cfg.rrc_interpolation,
                         rand_augment=cfg.rand_augment, auto_augment=cfg.auto_augment,
                         erasing=cfg.erasing, mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha,
                         mix_prob=cfg.mix_prob, switch_prob=cfg.switch_prob, mix_mode=cfg.mix_mode,
                         label_smoothing=cfg.label_smoothing, mean=mean, std=std)


def text_augment_config(cfg: TrainConfig) -> TextAugmentConfig:
    """The recipe's text augmentation: token dropout, word mixup, label smoothing, FGM, VAT and the fine labels'
    head."""
    return TextAugmentConfig(token_dropout=cfg.token_dropout, mixup_alpha=cfg.mixup_alpha,
                             label_smoothing=cfg.label_smoothing, fgm=cfg.fgm, fgm_norm=cfg.fgm_norm, vat=cfg.vat,
                             fine_aux=cfg.fine_aux)


# ---------------------------------------------------------------------- the step
class NonFiniteLossError(CCTError):
    """The loss became NaN or infinite."""


def reduce_metrics(values: torch.Tensor) -> torch.Tensor:
    """Per-process metric sums (loss × images, correct, images) summed over processes, on the CPU."""
    return distributed.all_reduce_sum(values)


class TrainStep:
    """One optimisation step on a batch: augment → forward → loss → backward → step → zero_grad.

    `train()` and `cct bench` both call this object, so a benchmark times exactly what training does.
    Running sums (loss, correct, images) stay on the device; `totals()` syncs once to read them.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 aug_cfg: AugmentConfig | TextAugmentConfig, *,
                 precision: str, device: torch.device | str, label_smoothing: float, num_classes: int,
                 generator: torch.Generator, skip_nonfinite: bool = False, sync_grads: bool = False,
                 lookahead: Lookahead | None = None):
        self.model, self.optimizer, self.aug_cfg = model, optimizer, aug_cfg
        self.lookahead = lookahead  # the loop updates it (it knows the step and the run's planned length)
        self.augment = augmenter(aug_cfg)  # the kind's: uint8 images → (x,), token batches → (ids, mask)
        self.sync_grads = sync_grads  # average gradients over processes here (a model not wrapped in DDP)
        self.precision, self.device = precision, torch.device(device)
        self.label_smoothing, self.num_classes, self.generator = label_smoothing, num_classes, generator
        self.skip_nonfinite = skip_nonfinite
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        self.skipped = 0
        self.shared: tuple[bool, ...] = ()
        self.resolution: int | None = None  # progressive resizing: the input side of the next steps (None: native)
        self.fgm = aug_cfg.fgm if isinstance(aug_cfg, TextAugmentConfig) else 0.0
        self.fgm_per_text = bool(self.fgm) and aug_cfg.fgm_norm == "text"
        self.vat = aug_cfg.vat if isinstance(aug_cfg, TextAugmentConfig) else 0.0
        self.fine_aux = aug_cfg.fine_aux if isinstance(aug_cfg, TextAugmentConfig) else 0.0
        head = getattr(getattr(model, "module", model), "aux_head", None)  # through DDP
        self.aux_classes = head.out_features if head is not None else 0
        self.aux_targets: torch.Tensor | None = None  # the batch's fine labels' soft targets, while `fine_aux` trains
        self.table = word_embedding(model) if self.fgm else None
        # FGM (per text) and VAT move its outputs, text by text
        self.words = word_embedding_module(model) if self.fgm_per_text or self.vat else None
        self.reset_totals()

    def reset_totals(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.correct = torch.zeros((), dtype=torch.int64, device=self.device)
        self.seen = torch.zeros((), dtype=torch.int64, device=self.device)

    def sums(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss × images, correct, images) since `reset_totals()`, summed over processes, on the CPU."""
        loss_sum, correct, seen = reduce_metrics(torch.stack([self.loss_sum, self.correct.double(),
                                                              self.seen.double()]))
        return loss_sum, correct, seen

    def totals(self) -> tuple[float, float, int]:
        """(mean loss, top-1 accuracy, images) since `reset_totals()`, summed over processes."""
        loss_sum, correct, seen = self.sums()
        seen = int(seen)
        return (float(loss_sum) / seen, float(correct) / seen, seen) if seen else (float("nan"), float("nan"), 0)

    def __call__(self, inputs, labels: torch.Tensor, lr: float, *, mix: bool = True,
                 share: typing.Callable[[], tuple[bool, ...]] | None = None) -> torch.Tensor:
        """Train on one batch (uint8 images (B, C, H, W), or a `cct.kinds.TokenBatch`) and int64 labels;
        returns the detached loss.

        `share`: the loop's stop decisions, read once the gradients are computed, OR-ed over processes
        and left in `self.shared`; they travel in the step's own collective where it has one, so that
        a step synchronises the processes once.
        """
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        args, targets = self.augment(inputs, labels, self.generator, self.aug_cfg, num_classes=self.num_classes,
                                     mix=mix)
        self.aux_targets = self._aux_targets(inputs, args)
        args = [a.to(self.device, non_blocking=True) for a in args]
        targets = targets.to(self.device, non_blocking=True)
        reduced = self.resolution is not None and self.resolution != args[0].shape[-2]
        if reduced:  # progressive resizing: augmented at full size, then scaled down
            args[0] = resize_batch(args[0], self.resolution)
        # every rank runs backward, finite or not (DDP exchanges inside it); the ranks then agree
        with word_outputs(self.words) as words:
            logits, loss = self.forward_backward(args, targets, any_token_grid(self.model) if reduced else None)
        checked = loss if not self.fgm else loss + self.adversarial_backward(args, targets, words)
        if self.vat:
            checked = checked + self.virtual_adversarial_backward(args, logits, words)
        if self.sync_grads:  # the gradients, the loss's finiteness and the flags in one exchange
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            finite, self.shared = distributed.average_gradients(params, finite=bool(torch.isfinite(checked)),
                                                                flags=share() if share is not None else ())
        else:  # one process, or DDP (the gradients are averaged already)
            finite, self.shared = distributed.all_finite(checked), ()
        if not finite:  # never step on a NaN (on any rank): every rank raises or skips together
            self.optimizer.zero_grad(set_to_none=True)
            if not self.skip_nonfinite:
                raise NonFiniteLossError(f"the loss became {loss.item()}")
            self.skipped += 1
        else:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            hard = targets if targets.ndim == 1 else targets.argmax(-1)
            self.loss_sum += loss.double() * labels.shape[0]
            self.correct += (logits.argmax(-1) == hard).sum()
            self.seen += labels.shape[0]
        if share is not None and not self.sync_grads:
            # no exchange of our own to carry them: read last, so that a signal arriving during this
            # step (its optimiser step included) stops the run right after it
            self.shared = distributed.any_true(*share())
        return loss

    def forward_backward(self, args: list[torch.Tensor], targets: torch.Tensor,
                         grid: contextlib.AbstractContextManager | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward (inside `grid`, if given) → loss → backward onto the gradients; returns the detached
        (logits, loss)."""
        aux = self.aux_targets
        with autocast(self.precision, self.device), grid if grid is not None else contextlib.nullcontext():
            logits, aux_logits = self._heads(self.model, args)
        # mixed (soft) targets already carry the smoothing: augment_batch applies it, as timm's Mixup does
        smoothing = self.label_smoothing if targets.ndim == 1 else 0.0
        loss = total = F.cross_entropy(logits.float(), targets, label_smoothing=smoothing)
        if aux is not None:  # the fine labels' head: a second task, left out of the loss the run reports
            total = loss + self.fine_aux * F.cross_entropy(aux_logits.float(), aux)
            loss = torch.where(torch.isfinite(total), loss, total)  # a non-finite total still stops the step
        (self.scaler.scale(total) if self.scaler is not None else total).backward()
        return logits.detach(), loss.detach()

    def _heads(self, model: nn.Module, args: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The first head's logits and the second head's (None without one). A text model's `forward` may predict
        with both heads (`aux_vote`); the step trains, reports and perturbs the first head's own logits."""
        return model(*args, with_aux=True) if self.aux_classes else (model(*args), None)

    def _aux_targets(self, inputs, args: list[torch.Tensor]) -> torch.Tensor | None:
        """On the device, the soft targets of a text batch's fine labels (`TokenBatch.aux`; None without them or
        `fine_aux`): smoothed and word-mixed as the main ones (λ is the model's third argument when mixing), a
        text without a fine label (-1) a zero row, so it adds no loss. Made once a step, for FGM's pass too."""
        aux = getattr(inputs, "aux", None) if self.fine_aux else None
        if aux is None:
            return None
        assert self.aux_classes, "fine labels to train on need a model with a second head (aux_classes > 0)"
        lam = float(args[2]) if len(args) == 3 else 1.0
        return mixup_target(aux, self.aux_classes, lam, self.label_smoothing).to(self.device, non_blocking=True)

    def adversarial_backward(self, args: list[torch.Tensor], targets: torch.Tensor,
                             words: list[torch.Tensor]) -> torch.Tensor:
        """FGM (Miyato et al. 2017): the batch's loss again with the word vectors moved `fgm` along their
        gradient, backpropagated onto the same gradients; returns that loss.

        `fgm_norm` "table": the gradient is normalised over the whole table, whose rows outside the batch have
        none, so only the batch's words move, each by one vector wherever it occurs; the table is put back bit
        for bit before the optimiser steps. "text": the clean pass's word vectors (`words`, kept by
        `word_outputs`) move, each text's by `fgm` along its own gradient, every occurrence apart."""
        if self.fgm_per_text:
            with word_outputs(self.words, per_text_shift(words[0].grad, self.fgm)):
                return self.forward_backward(args, targets)[1]
        grad = self.table.grad  # a GradScaler's scale cancels in the normalisation
        saved = self.table.detach().clone()
        with torch.no_grad():
            self.table.add_(grad, alpha=self.fgm / (float(grad.norm()) + 1e-12))
        _, loss = self.forward_backward(args, targets)
        with torch.no_grad():
            self.table.copy_(saved)
        return loss

    def virtual_adversarial_backward(self, args: list[torch.Tensor], logits: torch.Tensor,
                                     words: list[torch.Tensor]) -> torch.Tensor:
        """VAT (Miyato et al. 2017): KL(clean ‖ moved) of the first head's predictions, the clean ones (`logits`)
        held fixed, with each text's word vectors moved `vat` in the direction one power iteration finds from a
        random one (a probe `VAT_PROBE` long per text), backpropagated onto the same gradients; returns that KL.
        The labels play no part, so it asks the model to be smooth where FGM asks it to be right."""
        clean = logits.float().log_softmax(-1)
        inner = getattr(self.model, "module", self.model)  # the probe trains nothing: no DDP exchange for it

        def kl(model: nn.Module, shift: torch.Tensor) -> torch.Tensor:
            with word_outputs(self.words, shift), autocast(self.precision, self.device):
                out = self._heads(model, args)[0]
            return F.kl_div(out.float().log_softmax(-1), clean, log_target=True, reduction="batchmean")

        noise = torch.randn(words[0].shape, generator=self.generator).to(self.device) * args[1].unsqueeze(-1)
        probe = per_text_shift(noise, VAT_PROBE).requires_grad_()
        direction, = torch.autograd.grad(kl(inner, probe), probe)
        loss = kl(self.model, per_text_shift(direction, self.vat))
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return loss.detach()

    def state_dict(self) -> dict:
        return {"loss_sum": self.loss_sum.cpu(), "correct": self.correct.cpu(), "seen": self.seen.cpu(),
                "skipped": self.skipped, "scaler": self.scaler.state_dict() if self.scaler else None,
                "lookahead": self.lookahead.state_dict() if self.lookahead else None}

    def load_state_dict(self, state: dict) -> None:
        self.loss_sum = state["loss_sum"].to(self.device)
        self.correct = state["correct"].to(self.device)
        self.seen = state["seen"].to(self.device)
        self.skipped = int(state["skipped"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if (self.lookahead is None) != (state.get("lookahead") is None):
            raise ValueError("the run's lookahead setting differs from its last.pt's")
        if self.lookahead is not None:
            self.lookahead.load_state_dict(state["lookahead"])


def word_embedding_module(model: nn.Module) -> nn.Embedding:
    """A text model's one `nn.Embedding` (through any wrapper)."""
    tables = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    assert len(tables) == 1, f"FGM needs a text model with one word embedding, found {len(tables)} nn.Embedding"
    assert tables[0].weight.requires_grad, "FGM moves the word vectors along their gradient: they must be trained"
    return tables[0]


def word_embedding(model: nn.Module) -> nn.Parameter:
    """A text model's word-vector table: its one `nn.Embedding`'s weight (through any wrapper)."""
    return word_embedding_module(model).weight


@contextlib.contextmanager
def word_outputs(embedding: nn.Embedding | None,
                 shift: torch.Tensor | None = None) -> typing.Iterator[list[torch.Tensor]]:
    """Within it, the embedding's outputs (B, L, word_dim) are kept, their gradients retained, in the list it
    gives (`shift` None), or moved by `shift` (FGM's pass with `fgm_norm` "text"); `embedding` None: nothing
    is hooked and the list stays empty."""
    kept: list[torch.Tensor] = []
    if embedding is None:
        yield kept
        return

    def hook(module: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor | None:
        if shift is not None:
            return out + shift.to(out.dtype)
        out.retain_grad()
        kept.append(out)
        return None

    handle = embedding.register_forward_hook(hook)
    try:
        yield kept
    finally:
        handle.remove()


def per_text_shift(grad: torch.Tensor, length: float) -> torch.Tensor:
    """`grad` (B, L, word_dim), the gradient of a batch's word vectors, scaled to L2 norm `length` text by text:
    FGM's move with `fgm_norm` "text" (padded positions have no gradient, so they do not move)."""
    return length * grad / (grad.flatten(1).norm(dim=1).view(-1, 1, 1) + 1e-12)


def make_train_step(model: nn.Module, optimizer: torch.optim.Optimizer, aug_cfg: AugmentConfig | TextAugmentConfig, *,
                    precision: str, device: torch.device | str, label_smoothing: float, num_classes: int,
                    generator: torch.Generator, skip_nonfinite: bool = False, world_size: int = 1,
                    lookahead: bool = False) -> TrainStep:
    """The per-batch work of `train()`: `step(inputs, labels, lr, mix=True) -> loss` (inputs of `aug_cfg`'s kind).
    `lookahead`: a `cct.optim.Lookahead` over the optimiser's parameters, in `step.lookahead` for the loop.

    With `world_size` > 1, `model` is what `wrap_model` returned: DistributedDataParallel on GPUs, else
    the plain model, whose gradients the step averages over processes itself.
    """
    sync = world_size > 1 and not isinstance(model, DistributedDataParallel)
    slow = Lookahead([p for g in optimizer.param_groups for p in g["params"]]) if lookahead else None
    return TrainStep(model, optimizer, aug_cfg, precision=precision, device=device, label_smoothing=label_smoothing,
                     num_classes=num_classes, generator=generator, skip_nonfinite=skip_nonfinite, sync_grads=sync,
                     lookahead=slow)


def wrap_model(model: nn.Module, world_size: int = 1) -> nn.Module:
    """The model the training step calls: itself for one process or on CPUs, else DistributedDataParallel.

    On CUDA the weights go channels-last (the convolutional tokenizer's fast layout). Every rank starts
    from rank 0's weights; the model has no running statistics, so no buffers are synchronised in
    forward. On CPUs (gloo) the step averages the gradients in one exchange after the backward pass
    (`distributed.average_gradients`), which measured faster than DDP's overlapped buckets with one
    core per process (cct_2_3x2_32_keras, 2 processes: see benchmarks/README.md). Checkpoints,
    evaluation and the optimiser keep using the unwrapped `model`.
    """
    device = next(model.parameters()).device
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if world_size == 1:
        return model
    assert distributed.is_active(), "world_size > 1 needs a process group (cct.distributed.process_group)"
    if device.type == "cpu":
        distributed.broadcast_module(model)
        return model
    # the only buffer (a sine positional embedding) is the same everywhere: never sync it in forward
    newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    no_sync = {"forward_sync_buffers": False} if newer else {"broadcast_buffers": False}  # the older name
    return DistributedDataParallel(model, device_ids=[device.index], **no_sync)

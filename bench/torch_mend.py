"""The MEND meta-training step in PyTorch, written the reference way (the benchmark baseline).

As `eric-mitchell/mend` does it: a forward hook on each edited `nn.Linear` / GPT-2 `Conv1D` stores
the layer input u, a full backward hook stores the output gradient δ, one `loss.backward()` on the
edit example fills both; the editor (IDMLP, combine=True, shared per weight shape with mode
scale/shift, running-statistics norm, learned per-layer edit_lrs) turns them into
W' = W − α Σ_t δ̃_t ũ_tᵀ, and the edited model runs functionally (`torch.func.functional_call`,
where the reference uses `higher`) so c_edit·NLL(equivalent) + c_loc·KL(locality) is
differentiable w.r.t. the editor; then gradient clipping and Adam.

The editor follows the reference's code path (`algs/mend.py`, `nn.py`, `trainer.py` of
eric-mitchell/mend), not mend-jax's: rows whose u or δ is all zero are dropped with dynamic
shapes; in training, each weight's remaining rows enter its shape group's Welford counters one
token at a time right before that weight is standardised; LRLinear layers with U = 0,
V ~ N(0, 1), ReLU on all but the last layer; the step sizes live in the editor's optimizer (the
separate lr_lr optimizer steps after zero_grad() and never moves them). The one mend-jax
deviation kept here is the sign: we subtract the update (README, deviations). Another
difference, to make the baseline no slower than the reference: only the edited weights require
grad in the base model (the reference leaves every parameter requiring grad, so its capture
backward also fills every weight's .grad).
Only the reference's default editor is implemented (combine, init "id", relu, shared, norm).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

IGNORE = -100


# ----------------------------------------------------------------------------- losses
def _align(logits, labels, shift):
    return (logits[:, :-1], labels[:, 1:]) if shift else (logits, labels)


def masked_nll(logits, labels, shift: bool):
    logits, labels = _align(logits, labels, shift)
    mask = labels != IGNORE
    logp = F.log_softmax(logits.float(), -1)
    lp = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return -(lp * mask).sum() / mask.sum().clamp(min=1)


def sequence_correct(logits, labels, shift: bool):
    logits, labels = _align(logits, labels, shift)
    mask = labels != IGNORE
    hit = (logits.argmax(-1) == labels) | ~mask
    return hit.all(-1) & mask.any(-1)


def locality_kl(base_logits, edited_logits, mask):
    lp_base = F.log_softmax(base_logits.float(), -1)
    lp_edit = F.log_softmax(edited_logits.float(), -1)
    kl = (lp_base.exp() * (lp_base - lp_edit)).sum(-1)
    mask = mask.float()
    return (kl * mask).sum() / mask.sum().clamp(min=1.0)


# ----------------------------------------------------------------------------- the editor
class LRLinear(nn.Module):
    """The reference's low-rank residual layer: x + act(scale_m·(U V x + b) + shift_m), with
    U = 0 and V ~ N(0, 1) at init (so the identity), ReLU as clamp(min=0) (which passes the
    gradient at exactly 0), mode scale/shift as embeddings of the weight's index."""

    def __init__(self, dim: int, rank: int, n_modes: int | None, relu: bool):
        super().__init__()
        self.u = nn.Parameter(torch.zeros(dim, rank))
        self.v = nn.Parameter(torch.randn(rank, dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.relu = relu
        if n_modes is not None:
            self.mode_scale = nn.Embedding(n_modes, dim)
            self.mode_scale.weight.data.fill_(1.0)
            self.mode_shift = nn.Embedding(n_modes, dim)
            self.mode_shift.weight.data.zero_()
        self.n_modes = n_modes

    def forward(self, x, mode: int | None):
        pre = (self.u @ (self.v @ x.T)).T + self.bias
        if self.n_modes is not None:
            m = torch.tensor(mode, device=x.device)
            pre = pre * self.mode_scale(m) + self.mode_shift(m)
        return x + (pre.clamp(min=0) if self.relu else pre)


class IDMLP(nn.Module):
    """n_hidden + 1 LRLinear layers; the ReLU on every layer but the last (the reference's
    `relu=idx < n_hidden`)."""

    def __init__(self, dim: int, rank: int, n_modes: int | None, n_hidden: int):
        super().__init__()
        self.layers = nn.ModuleList(LRLinear(dim, rank, n_modes, relu=i < n_hidden)
                                    for i in range(n_hidden + 1))

    def forward(self, x, mode: int | None):
        for layer in self.layers:
            x = layer(x, mode)
        return x


class GradientTransform(nn.Module):
    """The reference's per-shape transform of (u, δ): rows whose u or δ is all zero are dropped
    (dynamic shapes, as the reference), then, in training, the running statistics absorb the
    remaining rows one token at a time (Welford) before they are standardised; then the IDMLP
    on [u; δ]."""

    def __init__(self, d_in: int, d_out: int, config, n_modes: int | None):
        super().__init__()
        self.config = config
        self.mlp = IDMLP(d_in + d_out, min(config.rank, d_in + d_out), n_modes, config.n_hidden)
        self.norm_init = False
        for side, d in (("u", d_in), ("v", d_out)):
            self.register_buffer(f"{side}_mean", torch.full((d,), float("nan")))
            self.register_buffer(f"{side}_s", torch.full((d,), float("nan")))
            self.register_buffer(f"{side}_std", torch.full((d,), float("nan")))
        self.register_buffer("k", torch.full((1,), float("nan")))

    @torch.no_grad()
    def _absorb(self, u, v):
        for i in range(u.shape[0]):
            if not self.norm_init:
                self.u_mean, self.v_mean = u[i].clone(), v[i].clone()
                self.u_s.zero_()
                self.v_s.zero_()
                self.k[:] = 1
                self.norm_init = True
            else:
                self.k += 1
                for side, x in (("u", u[i]), ("v", v[i])):
                    mean, s = getattr(self, f"{side}_mean"), getattr(self, f"{side}_s")
                    new_mean = mean + (x - mean) / self.k
                    setattr(self, f"{side}_s", s + (x - mean) * (x - new_mean))
                    setattr(self, f"{side}_mean", new_mean)
        if self.k < 2:
            raise RuntimeError(f"can't normalise with only {int(self.k)} samples so far")
        self.u_std = (self.u_s / (self.k - 1)) ** 0.5
        self.v_std = (self.v_s / (self.k - 1)) ** 0.5

    def forward(self, u, v, mode: int | None):
        u, v = u.float(), v.float()
        keep = (u != 0).any(-1) & (v != 0).any(-1)
        u, v = u[keep], v[keep]
        if self.training:
            self._absorb(u, v)
        eps = self.config.norm_eps
        u_in = (u - self.u_mean) / (self.u_std + eps)
        v_in = (v - self.v_mean) / (self.v_std + eps)
        out = self.mlp(torch.cat([u_in, v_in], -1), mode)
        return out[:, : u.shape[-1]], out[:, u.shape[-1]:]


def _key(name: str) -> str:
    return name.replace(".", "#")  # module keys cannot hold dots (the reference's choice too)


class Editor(nn.Module):
    """One GradientTransform per weight shape (mode = the weight's index in its shape group),
    per-layer step sizes."""

    def __init__(self, shapes: Mapping[str, tuple[int, int]], mend_config):
        super().__init__()
        c = mend_config
        if not (c.combine and c.shared and c.norm and c.init == "id" and c.act == "relu"
                and not c.final_act):
            raise ValueError("torch_mend implements only the reference's default editor")
        self.groups, self.modes, counts = {}, {}, {}
        for name, (d_in, d_out) in shapes.items():
            g = f"{d_in}x{d_out}"
            self.groups[name], self.modes[name] = g, counts.get(g, 0)
            counts[g] = counts.get(g, 0) + 1
        first = {}
        for name, shape in shapes.items():
            first.setdefault(self.groups[name], shape)
        self.nets = nn.ModuleDict({g: GradientTransform(d_in, d_out, c, counts[g])
                                   for g, (d_in, d_out) in first.items()})
        self.edit_lrs = nn.Parameter(torch.tensor([float(c.edit_lr)] * len(shapes)))
        self.index = {n: i for i, n in enumerate(shapes)}

    def pseudo_gradient(self, name: str, u, d):
        """α Σ_t δ̃_t ũ_tᵀ in [d_in, d_out] layout (u: tokens×d_in, d: tokens×d_out)."""
        u, d = self.nets[self.groups[name]](u, d, self.modes[name])
        return self.edit_lrs[self.index[name]] * torch.einsum("bi,bj->ij", u, d)


# ----------------------------------------------------------------------------- the trainer
def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict:
    keys = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")
    return {k: batch[k] for k in keys if k in batch}


def to_torch(batch, device=None):
    """numpy (nested) batch -> torch tensors (int64, as transformers expects) on `device`."""
    if isinstance(batch, Mapping):
        return {k: to_torch(v, device) for k, v in batch.items()}
    return torch.as_tensor(batch).long().to(device)


class TorchMEND:
    """MEND meta-training on a `transformers` model (GPT-2 Conv1D or nn.Linear weights).

    The editor is built on the model's device (move the model first, e.g. to CUDA); batches
    must be on that device too (`to_torch(batch, device)`)."""

    def __init__(self, model: nn.Module, inner_params: Sequence[str], mend_config, train_config):
        self.model = model.eval()  # no dropout; the base model is never trained here
        self.seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
        self.inner = list(inner_params)
        self.train_config = train_config
        named = dict(model.named_parameters())
        for name, p in named.items():
            p.requires_grad_(name in self.inner)
        self.modules = {n: model.get_submodule(n.rsplit(".", 1)[0]) for n in self.inner}
        # GPT-2's Conv1D stores [d_in, d_out] (our kernel layout); nn.Linear stores [d_out, d_in]
        self.transposed = {n: isinstance(m, nn.Linear) for n, m in self.modules.items()}
        shapes = {n: (tuple(named[n].shape[::-1]) if self.transposed[n] else tuple(named[n].shape))
                  for n in self.inner}
        self.editor = Editor(shapes, mend_config).to(named[self.inner[0]].device)
        c = train_config
        # As the reference's trainer: the editor optimizer holds the step sizes too, and a
        # second optimizer over the step sizes (lr_lr) steps after the first one's zero_grad(),
        # so it never moves them.
        self.optimizer = torch.optim.Adam(self.editor.parameters(), lr=c.lr)
        self.lr_optimizer = torch.optim.Adam([self.editor.edit_lrs],
                                             lr=c.lr if c.lr_lr is None else c.lr_lr)

    def capture(self, batch):
        """One forward/backward on the edit batch with hooks: (loss, {name: (u, δ)})."""
        inputs, grads, handles = {}, {}, []
        for name, module in self.modules.items():
            def fwd(mod, args, output, name=name):
                inputs[name] = args[0].detach()

            def bwd(mod, grad_input, grad_output, name=name):
                grads[name] = grad_output[0].detach()

            handles += [module.register_forward_hook(fwd),
                        module.register_full_backward_hook(bwd)]
        try:
            with torch.enable_grad():
                logits = self.model(**model_inputs(batch)).logits
                loss = masked_nll(logits, batch["labels"], not self.seq2seq)
                loss.backward()
        finally:
            for h in handles:
                h.remove()
        for name in self.inner:
            dict(self.model.named_parameters())[name].grad = None
        return loss.detach(), {n: (inputs[n], grads[n]) for n in self.inner}

    def edit(self, batch, train: bool = False):
        """({name: W'} differentiable w.r.t. the editor, pre-edit loss)."""
        pre_loss, captured = self.capture(batch)
        self.editor.train(train)
        params = dict(self.model.named_parameters())
        new = {}
        for name, (u, d) in captured.items():  # in inner_params order, as the reference
            u, d = u.reshape(-1, u.shape[-1]), d.reshape(-1, d.shape[-1])
            update = self.editor.pseudo_gradient(name, u, d)
            w = params[name].detach()
            new[name] = w - (update.T if self.transposed[name] else update).to(w.dtype)
        return new, pre_loss

    def loss(self, batch, train: bool = True):
        c = self.train_config
        shift = not self.seq2seq
        new, pre_loss = self.edit(batch["edit_inner"], train=train)
        outer, loc = batch["edit_outer"], batch["loc"]
        post_outer = functional_call(self.model, new, args=(), kwargs=model_inputs(outer)).logits
        edit_loss = masked_nll(post_outer, outer["labels"], shift)
        with torch.no_grad():
            base_loc = self.model(**model_inputs(loc)).logits
        post_loc = functional_call(self.model, new, args=(), kwargs=model_inputs(loc)).logits
        mask = loc["decoder_attention_mask"] if self.seq2seq else loc["attention_mask"]
        loc_kl = locality_kl(base_loc, post_loc, mask)
        total = c.c_edit * edit_loss + c.c_loc * loc_kl
        metrics = {
            "edit_loss": edit_loss.detach(), "pre_edit_loss": pre_loss,
            "locality_kl": loc_kl.detach(),
            "edit_acc": sequence_correct(post_outer.detach(), outer["labels"], shift)
            .float().mean(),
        }
        return total, metrics

    def step(self, batch) -> dict:
        """One meta-training step (no accumulation: every call is an Adam step)."""
        total, metrics = self.loss(batch, train=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(self.editor.parameters(), self.train_config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.lr_optimizer.step()
        self.lr_optimizer.zero_grad()
        return dict(metrics, loss=total.detach())


# ----------------------------------------------------------------------------- mend-jax interop
def load_jax_editor(trainer: TorchMEND, editor_state: dict) -> None:
    """Copy a mend-jax editor state ({"params": {"nets", "edit_lrs"}, "stats"}) into `trainer`."""
    import numpy as np

    ed = trainer.editor
    t = lambda x: torch.from_numpy(np.array(x, np.float32))
    with torch.no_grad():
        for g, net in ed.nets.items():
            src_layers = editor_state["params"]["nets"][g]["uv"]["layers"]
            for layer, src in zip(net.mlp.layers, src_layers):
                layer.u.copy_(t(src["U"]))
                layer.v.copy_(t(src["V"]))
                layer.bias.copy_(t(src["b"]))
                layer.mode_scale.weight.copy_(t(src["mode_scale"]))
                layer.mode_shift.weight.copy_(t(src["mode_shift"]))
            s = editor_state["stats"][g]
            net.norm_init = float(s["count"]) > 0
            if net.norm_init:
                net.k[:] = float(s["count"])
                for side, key in (("u", "u"), ("v", "d")):
                    setattr(net, f"{side}_mean", t(s[f"{key}_mean"]))
                    setattr(net, f"{side}_s", t(s[f"{key}_m2"]))
                    if float(s["count"]) > 1:
                        setattr(net, f"{side}_std", (t(s[f"{key}_m2"]) / (net.k - 1)) ** 0.5)
        for name in trainer.inner:
            ed.edit_lrs[ed.index[name]] = float(editor_state["params"]["edit_lrs"][name])

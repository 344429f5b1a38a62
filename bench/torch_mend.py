"""The MEND meta-training step in PyTorch, written the reference way (the benchmark baseline).

As `eric-mitchell/mend` does it: a forward hook on each edited `nn.Linear` / GPT-2 `Conv1D` stores
the layer input u, a full backward hook stores the output gradient δ, one `loss.backward()` on the
edit example fills both; the editor (IDMLP, combine=True, shared per weight shape with mode
scale/shift, running-statistics norm, learned per-layer edit_lrs) turns them into
W' = W − α Σ_t δ̃_t ũ_tᵀ, and the edited model runs functionally (`torch.func.functional_call`,
where the reference uses `higher`) so c_edit·NLL(equivalent) + c_loc·KL(locality) is
differentiable w.r.t. the editor; then gradient clipping and Adam.

The math is mend_jax's (`mend_jax/editors/mend.py`, `mend_jax/training.py`): we subtract the
update, statistics absorb all edited layers' tokens before any transform, padding is masked.
One deliberate difference from the reference, to make the baseline no slower than it: only the
edited weights require grad in the base model (the reference leaves every parameter requiring
grad, so its capture backward also fills every weight's .grad).
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
class LowRankLayer(nn.Module):
    """y = x + relu(scale_m * (U V x + b) + shift_m); U = 0 at init, so the identity."""

    def __init__(self, dim: int, rank: int, n_modes: int):
        super().__init__()
        self.V = nn.Parameter(nn.init.xavier_uniform_(torch.empty(rank, dim)))
        self.U = nn.Parameter(torch.zeros(dim, rank))
        self.b = nn.Parameter(torch.zeros(dim))
        self.mode_scale = nn.Parameter(torch.ones(n_modes, dim))
        self.mode_shift = nn.Parameter(torch.zeros(n_modes, dim))

    def forward(self, x, mode: int):
        pre = (x @ self.V.T) @ self.U.T + self.b
        pre = pre * self.mode_scale[mode] + self.mode_shift[mode]
        return x + pre.clamp(min=0)  # clamp passes the gradient at 0, as the reference's relu


class IDMLP(nn.Module):
    def __init__(self, dim: int, rank: int, n_modes: int, n_hidden: int):
        super().__init__()
        self.layers = nn.ModuleList(LowRankLayer(dim, rank, n_modes) for _ in range(n_hidden + 1))

    def forward(self, x, mode: int):
        for layer in self.layers:
            x = layer(x, mode)
        return x


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys cannot hold dots


class Editor(nn.Module):
    """Editor networks (one per weight shape), per-layer step sizes and running statistics."""

    def __init__(self, shapes: Mapping[str, tuple[int, int]], mend_config):
        super().__init__()
        c = mend_config
        if not (c.combine and c.shared and c.norm and c.init == "id" and c.act == "relu"
                and c.final_act):
            raise ValueError("torch_mend implements only the reference's default editor")
        self.config = c
        self.groups, self.modes, counts = {}, {}, {}
        for name, (d_in, d_out) in shapes.items():
            g = f"{d_in}x{d_out}"
            self.groups[name], self.modes[name] = g, counts.get(g, 0)
            counts[g] = counts.get(g, 0) + 1
        first = {}
        for name, shape in shapes.items():
            first.setdefault(self.groups[name], shape)
        self.nets = nn.ModuleDict({
            g: IDMLP(d_in + d_out, min(c.rank, d_in + d_out), counts[g], c.n_hidden)
            for g, (d_in, d_out) in first.items()})
        self.edit_lrs = nn.ParameterDict(
            {_key(n): nn.Parameter(torch.tensor(float(c.edit_lr))) for n in shapes})
        for g, (d_in, d_out) in first.items():
            self.register_buffer(f"{g}_count", torch.zeros(()))
            for side, d in (("u", d_in), ("d", d_out)):
                self.register_buffer(f"{g}_{side}_mean", torch.zeros(d))
                self.register_buffer(f"{g}_{side}_m2", torch.zeros(d))

    @torch.no_grad()
    def update_stats(self, name: str, u, d, mask):
        """Chan et al.'s parallel Welford merge of this batch's real tokens."""
        g = self.groups[name]
        count = getattr(self, f"{g}_count")
        n_b = mask.sum()
        total = (count + n_b).clamp(min=1.0)
        for side, x in (("u", u), ("d", d)):
            mean, m2 = getattr(self, f"{g}_{side}_mean"), getattr(self, f"{g}_{side}_m2")
            mean_b = (x * mask[:, None]).sum(0) / n_b.clamp(min=1.0)
            m2_b = ((x - mean_b) ** 2 * mask[:, None]).sum(0)
            delta = mean_b - mean
            m2 += m2_b + delta ** 2 * count * n_b / total
            mean += delta * n_b / total
        count += n_b

    def _standardise(self, x, g, side):
        count = getattr(self, f"{g}_count")
        mean, m2 = getattr(self, f"{g}_{side}_mean"), getattr(self, f"{g}_{side}_m2")
        # torch.where, not `if count > 1`: a Python branch on a CUDA tensor would wait for the GPU
        std = torch.where(count > 1, torch.sqrt(m2 / (count - 1).clamp(min=1.0)),
                          torch.ones_like(m2))
        return (x - mean) / (std + self.config.norm_eps)

    def pseudo_gradient(self, name: str, u, d, mask):
        """α Σ_t δ̃_t ũ_tᵀ in [d_in, d_out] layout (u: tokens×d_in, d: tokens×d_out)."""
        g = self.groups[name]
        u = self._standardise(u, g, "u")
        d = self._standardise(d, g, "d")
        out = self.nets[g](torch.cat([u, d], -1), self.modes[name])
        u, d = out[:, : u.shape[-1]] * mask[:, None], out[:, u.shape[-1]:] * mask[:, None]
        return self.edit_lrs[_key(name)] * (u.T @ d)


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
        self.optimizer = torch.optim.Adam([
            {"params": list(self.editor.nets.parameters()), "lr": c.lr},
            {"params": list(self.editor.edit_lrs.parameters()), "lr": c.lr_lr},
        ])

    def _token_mask(self, name, batch):
        if self.seq2seq and not name.startswith("encoder."):
            return batch["decoder_attention_mask"]
        return batch["attention_mask"]

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
        flat = {}
        for name, (u, d) in captured.items():
            mask = self._token_mask(name, batch).reshape(-1).float()
            flat[name] = (u.reshape(-1, u.shape[-1]).float(), d.reshape(-1, d.shape[-1]).float(),
                          mask)
        if train:  # statistics absorb every edited layer's tokens before any transform
            for name, (u, d, mask) in flat.items():
                self.editor.update_stats(name, u, d, mask)
        params = dict(self.model.named_parameters())
        new = {}
        for name, (u, d, mask) in flat.items():
            update = self.editor.pseudo_gradient(name, u, d, mask)
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
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(self.editor.parameters(), self.train_config.grad_clip)
        self.optimizer.step()
        return dict(metrics, loss=total.detach())


# ----------------------------------------------------------------------------- mend-jax interop
def load_jax_editor(trainer: TorchMEND, editor_state: dict) -> None:
    """Copy a mend-jax editor state ({"params": {"nets", "edit_lrs"}, "stats"}) into `trainer`."""
    import numpy as np

    ed = trainer.editor
    with torch.no_grad():
        for g, net in ed.nets.items():
            for layer, src in zip(net.layers, editor_state["params"]["nets"][g]["uv"]["layers"]):
                for k in ("U", "V", "b", "mode_scale", "mode_shift"):
                    getattr(layer, k).copy_(torch.from_numpy(np.asarray(src[k])))
        for name in trainer.inner:
            ed.edit_lrs[_key(name)].copy_(
                torch.tensor(float(editor_state["params"]["edit_lrs"][name])))
        for g, s in editor_state["stats"].items():
            getattr(ed, f"{g}_count").copy_(torch.tensor(float(s["count"])))
            for key in ("u_mean", "u_m2", "d_mean", "d_m2"):
                getattr(ed, f"{g}_{key}").copy_(torch.from_numpy(np.asarray(s[key])))

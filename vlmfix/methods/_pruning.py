"""The token-pruning engine shared by FastV, PyramidDrop, visual-token exit, random pruning,
VisionZip-style selection and redundancy merging.

A pruning method is a list of *stages*. A stage at decoder layer ``K`` keeps a subset of
the rows entering layer ``K`` (image tokens only; text and generated tokens are always
kept); every layer ``>= K`` (until the next stage) then computes, and caches, only those
rows. A stage at layer 0 acts before the first decoder layer, i.e. on the LM's input
embeddings ("pre-LM"): every layer is cheaper.

How (scoped hooks only; nothing in transformers is replaced):

* a forward pre-hook on decoder layer ``K`` gathers the kept rows of ``hidden_states``,
  ``position_ids`` and ``position_embeddings`` (RoPE cos/sin of the *original* positions,
  so kept tokens keep their positions); pre-hooks on the later layers hand them the same
  gathered ``position_ids`` / ``position_embeddings`` (the decoder loop passes the
  full-length ones to every layer). The KV cache of those layers receives only the kept
  keys, so decode steps attend fewer keys too;
* the controller's per-layer token map (:meth:`~vlmfix.attention.Controller.layout_for`)
  of layers ``>= K`` describes exactly the kept keys with their positions and labels, so
  masks stay right and attention methods' plans see only kept keys;
* a forward hook on the last decoder layer scatters the kept rows back into a tensor of
  the input's length, so the model's outputs keep their shape. A dropped row holds its
  hidden state from the layer where it was dropped: its logits are not meaningful (the
  last row, which gives the next token, is text and always kept).

Samples of a (left-padded) batch are ranked and pruned independently; when they keep
different numbers of tokens, the shorter ones get extra ``PAD`` slots on the left (filler
rows, invisible as keys, whose outputs are unused). Decode steps do nothing but extend the
per-layer token maps (no host sync, no allocation per layer).

Without a KV cache every step re-runs the whole sequence; the selection made at the first
forward of a sequence is reused (with the generated tokens appended), so decoding with
the cache off gives the same tokens as with it on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import torch

from vlmfix.layout import Label, Layout, Part
from vlmfix.methods._attn_utils import SequenceTracker
from vlmfix.methods.base import Method

__all__ = ["Stage", "PruningRuntime", "scaled_layer", "check_pruning_fields", "NEWLINE_MODES", "BRANCH_MODES"]

logger = logging.getLogger(__name__)

NEWLINE_MODES = ("rank", "keep")
# Attention methods whose per-key edits are indexed by the full prompt (refused with pruning).
KEY_INDEXED_METHODS = ("paint", "rbd")
BRANCH_MODES = ("own", "main")


def scaled_layer(layer: int, num_layers: int, reference_depth: int = 32) -> int:
    """A layer index given for a ``reference_depth``-layer LM, scaled to ``num_layers``."""
    return int(round(layer * num_layers / reference_depth))


def check_pruning_fields(config) -> None:
    """Validate the fields every pruning config shares (``newlines``, ``branch_ranking``,
    ``repack_positions``)."""
    config._check(config.newlines in NEWLINE_MODES, "newlines", f"one of {NEWLINE_MODES}")
    config._check(config.branch_ranking in BRANCH_MODES, "branch_ranking", f"one of {BRANCH_MODES}")
    config._check(isinstance(config.repack_positions, bool), "repack_positions", "True or False")


@dataclass(frozen=True)
class Stage:
    """One pruning stage.

    Attributes:
        layer: decoder layer whose input is pruned (0 = the LM input).
        keep: share of each sample's *original* image tokens kept from this layer on.
        rank_layer: layer whose last-prompt-row attention ranks the tokens (None: the
            method's own :meth:`PruningRuntime.scores`).
    """

    layer: int
    keep: float
    rank_layer: int | None = None


class PruningRuntime(Method):
    """Runtime of a token-pruning method (see the module docstring).

    Subclasses set :attr:`stages` in :meth:`on_attach` (call ``super().on_attach`` after)
    and override :meth:`scores` (per-token keep scores, higher is kept) and, for merging,
    :meth:`merge`.
    """

    def __init__(self, config):
        super().__init__(config)
        self.stages: list[Stage] = []
        self.tracker = SequenceTracker()
        self._att: dict[int, torch.Tensor] = {}  # stage index -> [B, Tk] head-mean attention
        self._sel: list[dict[str, Any]] = []  # per stage of the current sequence
        self._fwd: dict[str, Any] = {}  # per forward: gathered rows, RoPE, restore info
        self._telemetry: dict[str, Any] = {"sequences": 0, "image_tokens": 0, "kept": {}, "flops": 0.0, "saved": 0.0}
        self._shift: dict[int, torch.Tensor] = {}  # stage -> [B] (repack_positions)
        self._sel_meta: dict[str, Any] = {}

    @property
    def edits_attention(self) -> bool:
        return False  # it measures attention (contribute adds no edit) and drops tokens

    # ------------------------------------------------------------------ setup
    def on_attach(self, handle) -> None:
        super().on_attach(handle)
        ctrl = handle.controller
        n = ctrl.num_layers
        for s in self.stages:
            if not 0 <= s.layer < n:
                from vlmfix.errors import ConfigError

                raise ConfigError(
                    f"{self.name}: pruning layer {s.layer} is outside this model's {n} decoder layers; "
                    f"pass a layer in [0, {n})"
                )
        self.stages = sorted(self.stages, key=lambda s: s.layer)
        clash = [m.name for m in handle.methods if m.name in KEY_INDEXED_METHODS]
        if clash:
            from vlmfix.errors import ConfigError

            # PAINT and RBD key their per-key edits by the full prompt's key index once per
            # sequence; they do not follow the per-layer maps of pruned layers yet.
            raise ConfigError(
                f"{self.name} cannot be combined with {', '.join(clash)} yet (their per-key edits do not follow "
                "pruned layers); use pai, var, vhr or a contrastive method with pruning"
            )
        layers = handle.adapter.decoder_layers(handle.model)
        first = self.stages[0].layer
        for idx in range(first, n):
            handle.add_hook(layers[idx].register_forward_pre_hook(self._pre_layer(idx), with_kwargs=True))
        handle.add_hook(layers[n - 1].register_forward_hook(self._post_last, with_kwargs=True))
        text = handle.adapter.text_config(handle.model)
        self._dims = _layer_dims(text)

    def _acts(self) -> bool:
        ctrl = self.handle.controller
        return ctrl.active is None or self in ctrl.active

    def on_forward(self, handle, kwargs: dict[str, Any]) -> None:
        self.tracker.update(handle, kwargs)
        self._fwd = {}
        if self.tracker.new_sequence and self._acts():
            self._att = {}
            self._sel = []
            self._shift = {}

    # ------------------------------------------------------------------ ranking
    def wants_row_stats(self, call) -> bool:
        return (
            call.is_prefill
            and self.tracker.new_sequence
            and self._acts()
            and any(s.rank_layer == call.layer_idx for s in self.stages)
        )

    def contribute(self, call, plan) -> None:
        # Measurement only (no edit): the head-averaged attention of the last prompt row on
        # every key of this layer, on the unedited scores.
        if call.row_stats is None or not self._acts():
            return
        for i, s in enumerate(self.stages):
            if s.rank_layer == call.layer_idx:
                self._att[i] = call.row_stats.probs.mean(1)

    def scores(self, stage: int, hidden: torch.Tensor, layout: Layout) -> torch.Tensor:
        """Keep scores ``[B, T]`` (fp32, higher is kept) of the rows entering the stage.

        The default reads the attention measured at the stage's ``rank_layer``."""
        att = self._att.get(stage)
        if att is not None:
            att = att.to(layout.labels.device)  # measured on the rank layer's device
        if att is None or att.shape != layout.labels.shape:
            from vlmfix.errors import StateError

            raise StateError(
                f"{self.name}: no attention ranking was measured at layer {self.stages[stage].rank_layer} "
                "for this forward (a prefill that continues a cached sequence is not supported by token pruning)"
            )
        return att.float()

    def merge(self, stage: int, hidden: torch.Tensor, layout: Layout, keep: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[B, T, E]`` to gather the kept rows from (merging methods write
        each kept row's merged value here). Default: unchanged."""
        return hidden

    def select(self, stage: int, hidden: torch.Tensor, layout: Layout) -> torch.Tensor:
        """Bool ``[B, T]``: rows kept by ``stage`` (its budget over the ranked image tokens)."""
        scores = self.scores(stage, hidden, layout)
        ranked = self._ranked(layout)
        scores = self._branch_scores(scores, ranked)
        budget = self._budget(self.stages[stage].keep, layout)
        return top_keep(scores, ranked, budget) | ~ranked

    def _ranked(self, layout: Layout) -> torch.Tensor:
        ranked = layout.image_mask
        if self.config.newlines == "keep":
            ranked = ranked & (layout.parts != Part.NEWLINE)
        return ranked

    def _budget(self, keep: float, layout: Layout) -> list[int]:
        """Per sample: how many ranked tokens stay (a share of its original count)."""
        return [int(round(keep * n)) for n in self._sel_meta["ranked_original"]]

    def _branch_scores(self, scores: torch.Tensor, ranked: torch.Tensor) -> torch.Tensor:
        """With ``branch_ranking="main"``, a contrast row takes its main row's scores, image
        token by image token (when both hold the same number of them)."""
        rows = self.handle.controller.rows
        if self.config.branch_ranking != "main" or rows is None or not rows.branches:
            return scores
        if scores.shape[0] != rows.num_rows:
            return scores
        scores = scores.clone()
        counts = ranked.sum(-1).tolist()
        B = rows.num_samples
        for r in range(B, rows.num_rows):
            b = r % B
            if counts[r] == counts[b] and counts[b] > 0:
                scores[r, ranked[r]] = scores[b, ranked[b]]
        return scores

    # ------------------------------------------------------------------ hooks
    def _pre_layer(self, idx: int):
        def hook(module, args, kwargs):
            ctrl = self.handle.controller
            if not self._acts() or ctrl.layout is None:
                return None
            if not ctrl.is_prefill:
                if not self.config.repack_positions:
                    return None
                return self._repack_decode(idx, args, kwargs)
            stage = next((i for i, s in enumerate(self.stages) if s.layer == idx), None)
            if stage is not None:
                self._apply_stage(stage, idx, args, kwargs)
            cur = self._fwd.get("cur")
            if cur is None:
                return None
            hidden = self._fwd.pop("hidden", None)
            if hidden is not None:
                if args:
                    args = (hidden, *args[1:])
                else:
                    kwargs["hidden_states"] = hidden
            kwargs["position_embeddings"] = cur["rope"]
            if "position_ids" in kwargs:
                kwargs["position_ids"] = cur["pos_ids"]
            return args, kwargs

        return hook

    def _apply_stage(self, stage: int, idx: int, args, kwargs) -> None:
        ctrl = self.handle.controller
        if ctrl.custom_mask:
            from vlmfix.errors import StateError

            raise StateError(
                f"{self.name}: token pruning cannot honour a custom 4D attention_mask; pass a 2D padding mask"
            )
        hidden = args[0] if args else kwargs["hidden_states"]
        T = hidden.shape[1]
        # With a device_map the layers may sit on several devices: everything this stage
        # indexes is brought to the incoming hidden state's device (no-ops on one device).
        dev = hidden.device
        layout = ctrl.layout_on(ctrl.layout_for(idx - 1) if idx > 0 else ctrl.layout, dev)
        main_layout = ctrl.layout_on(ctrl.layout, dev)
        if layout.length != T:
            from vlmfix.errors import LayoutMismatchError

            raise LayoutMismatchError(
                f"{self.name}: layer {idx} receives {T} rows but its token map holds {layout.length}"
            )
        prev = self._fwd.get("cur")
        if prev is None:
            self._fwd["full"] = hidden
        else:
            # rows dropped at this stage keep the value they had on entering it
            full = self._fwd["full"].to(dev)
            prev = {**prev, "idx": prev["idx"].to(dev), "filler": prev["filler"].to(dev)}
            rows = _rows(prev["idx"], full)
            self._fwd["full"] = full.scatter(
                1, rows, torch.where(prev["filler"][..., None], full.gather(1, rows), hidden)
            )
        full = self._fwd["full"]
        if self.tracker.new_sequence:
            if stage == 0:
                self._sel_meta = {"ranked_original": self._ranked(layout).sum(-1).tolist()}
            keep = self.select(stage, hidden, layout) & (layout.labels != Label.PAD)
            source = self.merge(stage, hidden, layout, keep)
            local, filler = _gather_index(keep)
            full_idx = local if prev is None else prev["idx"].gather(1, local)
            sel = {"idx": full_idx, "filler": filler, "prompt": main_layout.length}
            if source is not hidden:
                sel["merged"] = source.gather(1, _rows(local, source))
            self._sel.append(sel)
            self._record(stage, layout, keep)
        else:
            # a no-cache step continuing the sequence: the same selection, generated rows kept
            sel = self._sel[stage]
            full_idx, filler = _extend_index(sel["idx"], sel["filler"], main_layout.length, sel["prompt"])
        gathered = full.gather(1, _rows(full_idx, full))
        if "merged" in sel:
            gathered[:, : sel["merged"].shape[1]] = sel["merged"]
        pos_ids = main_layout.positions.gather(1, full_idx)
        rope = self._rope(stage, kwargs, full_idx, gathered, pos_ids, filler)
        ctrl.set_layer_layout(idx, _pruned_layout(main_layout, full_idx, filler))
        self._fwd["cur"] = {"idx": full_idx, "filler": filler, "rope": rope, "pos_ids": pos_ids}
        self._fwd["hidden"] = gathered

    def _rope(self, stage: int, kwargs, full_idx, hidden, pos_ids, filler):
        """RoPE cos/sin of the kept rows: their original positions (default), or positions
        re-packed to ``0 .. n-1`` over the real kept tokens (``repack_positions``)."""
        cos, sin = kwargs["position_embeddings"]
        if self.config.repack_positions:
            repacked = ((~filler).long().cumsum(-1) - 1).clamp_min(0)
            # generated tokens continue from the last prompt token: original position - shift
            self._shift[stage] = pos_ids[:, -1] - repacked[:, -1]
            rotary = self.handle.adapter.get(self.handle.model, "language_model").rotary_emb
            return rotary(hidden, position_ids=repacked)
        B = full_idx.shape[0]
        idx = full_idx.to(cos.device)[..., None].expand(-1, -1, cos.shape[-1])
        return cos.expand(B, -1, -1).gather(1, idx), sin.expand(B, -1, -1).gather(1, idx)

    def _repack_decode(self, idx: int, args, kwargs):
        """Decode step with re-packed positions: layers of a stage see the new token at its
        original position minus the tokens that stage's pruning removed before it."""
        stage = None
        for i, s in enumerate(self.stages):
            if s.layer <= idx:
                stage = i
        if stage is None or stage not in self._shift:
            return None
        ropes = self._fwd.setdefault("decode_rope", {})
        if stage not in ropes:
            hidden = args[0] if args else kwargs["hidden_states"]
            pos = self.handle.controller.query_positions(hidden.shape[1])
            pos = pos - self._shift[stage].to(pos.device)[:, None]
            rotary = self.handle.adapter.get(self.handle.model, "language_model").rotary_emb
            ropes[stage] = rotary(hidden, position_ids=pos)
        kwargs["position_embeddings"] = ropes[stage]
        return args, kwargs

    def _post_last(self, module, args, kwargs, output):
        cur = self._fwd.get("cur")
        if cur is None or not self.handle.controller.is_prefill:
            return None
        out = output[0] if isinstance(output, tuple) else output
        full = self._fwd["full"].to(out.device)  # the first stage's device, with a device_map
        rows = _rows(cur["idx"].to(out.device), full)
        src = torch.where(cur["filler"].to(out.device)[..., None], full.gather(1, rows), out.to(full.dtype))
        restored = full.scatter(1, rows, src).to(out.dtype)
        self._fwd = {}
        return (restored, *output[1:]) if isinstance(output, tuple) else restored

    # ------------------------------------------------------------------ telemetry
    def _record(self, stage: int, layout: Layout, keep: torch.Tensor) -> None:
        """Host-side counters, once per sequence at the prefill (a few syncs per stage)."""
        rows = self.handle.controller.rows
        main = rows.num_samples if rows is not None else keep.shape[0]
        kept_img = int((keep & layout.image_mask)[:main].sum())
        t = self._telemetry
        n = self.handle.controller.num_layers
        if stage == 0:
            t["sequences"] += 1
            t["image_tokens"] += int(layout.image_mask[:main].sum())
            t["_lengths"] = (layout.labels != Label.PAD)[:main].sum(-1).tolist()
            t["flops"] += n * sum(_layer_flops(self._dims, m) for m in t["_lengths"])
        end = self.stages[stage + 1].layer if stage + 1 < len(self.stages) else n
        for layer in range(self.stages[stage].layer, end):
            t["kept"][layer] = t["kept"].get(layer, 0) + kept_img
        after = keep[:main].sum(-1).tolist()
        span = end - self.stages[stage].layer
        t["saved"] += span * sum(
            _layer_flops(self._dims, m) - _layer_flops(self._dims, k) for m, k in zip(t["_lengths"], after)
        )

    def stats(self) -> dict[str, Any]:
        t = self._telemetry
        total = t["flops"]
        return {
            "stages": [{"layer": s.layer, "keep": s.keep, "rank_layer": s.rank_layer} for s in self.stages],
            "sequences": t["sequences"],
            "image_tokens": t["image_tokens"],
            "image_tokens_kept_per_layer": {str(k): v for k, v in sorted(t["kept"].items())},
            "prefill_flops": total,
            "prefill_flops_saved": t["saved"],
            "prefill_flops_saved_fraction": t["saved"] / total if total else 0.0,
        }


# --------------------------------------------------------------------------- helpers
def top_keep(scores: torch.Tensor, ranked: torch.Tensor, budget: list[int]) -> torch.Tensor:
    """Bool ``[B, T]``: per row, the ``budget[b]`` highest-scoring ``ranked`` tokens (ties
    broken by position, earlier first)."""
    masked = torch.where(ranked, scores.float(), torch.full_like(scores, float("-inf"), dtype=torch.float32))
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
    )
    k = torch.as_tensor(budget, device=scores.device)[:, None]
    return (rank < k) & ranked


def _rows(idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return idx[..., None].expand(-1, -1, like.shape[-1])


def _gather_index(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the kept indices in order, left-filled to the longest row with dropped
    indices (``filler`` True there). Returns ``(idx [B, T'], filler [B, T'])``."""
    counts = keep.sum(-1)
    n = int(counts.max())  # prefill only: one host sync per stage
    B, T = keep.shape
    ar = torch.arange(T, device=keep.device).expand(B, T)
    # kept rows sort after dropped ones, each group in index order
    key = torch.where(keep, ar + T, ar)
    order = key.sort(dim=-1).indices[:, T - n :]
    filler = torch.arange(n, device=keep.device)[None, :] < (n - counts)[:, None]
    return order, filler


def _extend_index(idx: torch.Tensor, filler: torch.Tensor, total: int, prompt: int):
    """A prompt selection extended by the generated rows ``prompt .. total - 1``."""
    if total == prompt:
        return idx, filler
    B = idx.shape[0]
    gen = torch.arange(prompt, total, device=idx.device).expand(B, -1)
    return torch.cat([idx, gen], 1), torch.cat([filler, torch.zeros_like(gen, dtype=torch.bool)], 1)


def _pruned_layout(full: Layout, idx: torch.Tensor, filler: torch.Tensor) -> Layout:
    """The token map of the kept rows ``idx`` of ``full`` (fillers labelled PAD), with room
    for as many generated positions as ``full`` has."""
    labels = full.labels.gather(1, idx).masked_fill(filler, Label.PAD)
    parts = full.parts.gather(1, idx).masked_fill(filler, 0)
    positions = full.positions.gather(1, idx)
    n = idx.shape[1]
    image = (labels == Label.IMAGE) | (labels == Label.IMAGE_SINK)
    ar = torch.arange(n, device=idx.device)
    has = image.any(-1)
    start = torch.where(has, torch.where(image, ar, n).amin(-1), -1)
    end = torch.where(has, torch.where(image, ar + 1, 0).amax(-1), -1)
    spare = full.capacity - full.length
    layout = Layout.from_tensors(
        labels,
        parts,
        positions,
        start.to(full.image_start.device),
        end.to(full.image_end.device),
        n - (full.length - full.prompt_length),
        has_image=bool(has.any()) if full.has_image else False,  # prefill only
        padded=full.padded or bool(filler.any()),
        capacity=n + max(spare, 1),
    )
    return replace(layout, unresolved=())


def _layer_dims(text_config) -> dict[str, int]:
    E = int(text_config.hidden_size)
    H = int(text_config.num_attention_heads)
    D = int(getattr(text_config, "head_dim", None) or E // H)
    Hkv = int(getattr(text_config, "num_key_value_heads", None) or H)
    inter = int(text_config.intermediate_size)
    return {"E": E, "H": H, "D": D, "Hkv": Hkv, "I": inter}


def _layer_flops(d: dict[str, int], n: int) -> float:
    """FLOPs of one decoder layer over ``n`` tokens at the prefill:
    ``n * 2 * (E*H*D + 2*E*Hkv*D + H*D*E + 3*E*I)`` (projections and the gated MLP) plus
    ``4 * n^2 * H * D`` (``QK^T`` and ``PV`` over the full square, as dense kernels compute)."""
    E, H, D, Hkv, inter = d["E"], d["H"], d["D"], d["Hkv"], d["I"]
    linear = 2 * (E * H * D + 2 * E * Hkv * D + H * D * E + 3 * E * inter)
    return float(n * linear + 4 * n * n * H * D)

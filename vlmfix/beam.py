"""Batched beam search for :func:`vlmfix.generate`: beams ride as rows.

Every sample keeps ``num_beams`` running hypotheses. They are rows of the batch like
contrast-branch rows are: the main rows are ``[s0 beam0 .. s0 beam{n-1}, s1 beam0 ..]``
and every branch repeats that order, so a branch row always follows its beam and
contrastive methods combine per beam. After each step the rows (and the KV cache, and any
per-row state of the attached methods) are reordered so that row ``j`` of a sample holds
its ``j``-th best running hypothesis.

The rule is the one of transformers' ``generate(num_beams=n)`` (the vectorised beam
search of transformers 4.50+ and 5.x), so that with no method attached both give the same
tokens; it is written here from that behaviour, not copied:

* scores are accumulated log-probabilities ``sum_t log softmax(l_t)[y_t]``; at the first
  step only beam 0 is live (the others start at ``-1e9``), so the beams of a sample do not
  all pick the same token;
* per step the ``K = max(2, 1 + #eos) * n`` best continuations over all beams are kept;
  those ending in EOS (and, at the last allowed step, all of them) are *finished*
  candidates, the best ``n`` others continue;
* a finished candidate among the top ``n`` enters the sample's list of ``n`` finished
  hypotheses with score ``logp / len ** length_penalty`` (``len`` = generated tokens,
  EOS included) if it beats the list's worst;
* ``early_stopping``: ``True`` stops a sample once it has ``n`` finished hypotheses;
  ``False`` stops it once the best running score divided by the current length to the
  power ``length_penalty`` cannot beat the worst finished one; ``"never"`` uses the
  maximum length in that bound when ``length_penalty > 0`` (the canonical rule);
* the answer is the best finished hypothesis; its score is reported.

Everything per step is tensor code: no host syncs (the loop learns that every sample
stopped from :class:`vlmfix.generation._AllDone`, as greedy decoding does). Extra steps
after a sample stopped do not change its finished list.
"""

from __future__ import annotations

import torch

__all__ = ["BeamSearch"]

# transformers' sentinel for "not a candidate": finite, so sums stay ordered and NaN-free.
NEG = -1.0e9


def _take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[b, index[b, k], ...]`` for ``t`` ``[B, n, ...]`` and ``index`` ``[B, K]``."""
    shape = index.shape + (1,) * (t.dim() - 2)
    return torch.take_along_dim(t, index.view(shape), dim=1)


class BeamSearch:
    """Beam-search state of one batch (``B`` samples, ``n`` beams, up to ``T`` tokens).

    Args:
        batch_size: ``B``.
        num_beams: ``n`` (>= 1).
        max_new_tokens: ``T``.
        eos: long tensor of EOS ids (may be empty).
        pad_id: filler of unused token slots.
        length_penalty: exponent of the length normaliser of finished scores.
        early_stopping: ``True``, ``False`` or ``"never"`` (see the module docstring).
        keep_path: also record which beam row produced each token (to return the
            per-step logits of the answer).
    """

    def __init__(
        self,
        batch_size: int,
        num_beams: int,
        max_new_tokens: int,
        eos: torch.Tensor,
        pad_id: int,
        length_penalty: float,
        early_stopping: bool | str,
        device,
        keep_path: bool = False,
    ):
        B, n, T = batch_size, num_beams, max_new_tokens
        self.B, self.n, self.T = B, n, T
        self.eos = eos
        self.length_penalty = float(length_penalty)
        self.early_stopping = early_stopping
        self.k = max(2, 1 + int(eos.numel())) * n
        self.top_n = torch.arange(self.k, device=device) < n  # [K]: the n best candidates
        self.running = torch.zeros(B, n, device=device)
        self.running[:, 1:] = NEG
        self.run_tokens = torch.full((B, n, T), pad_id, dtype=torch.long, device=device)
        self.fin_tokens = self.run_tokens.clone()
        self.fin_scores = torch.full((B, n), NEG, device=device)
        self.fin_flag = torch.zeros(B, n, dtype=torch.bool, device=device)
        self.open = torch.ones(B, dtype=torch.bool, device=device)  # may still improve
        self.stopped = torch.zeros((), dtype=torch.bool, device=device)
        self.keep_path = keep_path
        if keep_path:
            self.run_path = torch.zeros((B, n, T), dtype=torch.long, device=device)
            self.fin_path = self.run_path.clone()
        self.offsets = torch.arange(B, device=device)[:, None] * n  # [B, 1]

    def step(
        self, t: int, logits: torch.Tensor, penalty: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance by one token.

        Args:
            t: step index (0-based; ``t == T - 1`` is the last allowed token).
            logits: fp32 ``[B * n, V]`` next-token logits of the running beams (rows in
                beam order), after every method.
            penalty: optional fp32 ``[B * n]`` subtracted from the accumulated score of
                every continuation of each beam (see :meth:`vlmfix.methods.Method.beam_penalty`).

        Returns:
            ``(tokens, source)``, both long ``[B * n]``: the token appended to each new
            beam row, and the old main row (``b * n + beam``) it continues.
        """
        B, n = self.B, self.n
        V = logits.shape[-1]
        running = self.running if penalty is None else self.running - penalty.float().view(B, n)
        logp = torch.log_softmax(logits.float(), dim=-1).view(B, n, V) + running[:, :, None]
        cand_scores, flat = torch.topk(logp.view(B, n * V), self.k, dim=-1)  # [B, K], sorted
        src, tok = flat // V, flat % V
        cand_tokens = _take(self.run_tokens, src)
        cand_tokens[:, :, t] = tok
        if self.keep_path:
            cand_path = _take(self.run_path, src)
            cand_path[:, :, t] = src
        ends = torch.isin(tok, self.eos) if self.eos.numel() else torch.zeros_like(tok, dtype=torch.bool)
        if t == self.T - 1:
            ends = torch.ones_like(ends)

        # running beams of the next step: the best n candidates that did not end
        live = cand_scores + ends.float() * NEG
        keep = torch.topk(live, n, dim=-1).indices  # [B, n]
        self.running = _take(live, keep)
        self.run_tokens = _take(cand_tokens, keep)
        source = _take(src, keep)
        if self.keep_path:
            self.run_path = _take(cand_path, keep)

        # finished hypotheses: merge the ended top-n candidates into each sample's list
        norm = cand_scores / float(t + 1) ** self.length_penalty
        if self.early_stopping is True:
            norm = norm + (self.fin_flag.all(-1, keepdim=True)).float() * NEG
        norm = norm + (~self.open)[:, None].float() * NEG
        entered = ends & self.top_n[None, :]
        norm = norm + (~entered).float() * NEG
        scores = torch.cat([self.fin_scores, norm], dim=1)
        best = torch.topk(scores, n, dim=-1).indices
        self.fin_scores = _take(scores, best)
        self.fin_tokens = _take(torch.cat([self.fin_tokens, cand_tokens], dim=1), best)
        self.fin_flag = _take(torch.cat([self.fin_flag, entered], dim=1), best)
        if self.keep_path:
            self.fin_path = _take(torch.cat([self.fin_path, cand_path], dim=1), best)

        # can a sample still improve its finished list?
        span = self.T if (self.early_stopping == "never" and self.length_penalty > 0) else t + 1
        best_running = self.running[:, 0] / float(span) ** self.length_penalty
        worst = torch.where(self.fin_flag, self.fin_scores.min(-1, keepdim=True).values, NEG)
        self.open = self.open & (best_running[:, None] > worst).any(-1)
        full = self.fin_flag.all() if self.early_stopping is True else torch.zeros_like(self.stopped)
        self.stopped = ~self.open.any() | full | ends.all()

        tokens = self.run_tokens[:, :, t].reshape(-1)
        return tokens, (source + self.offsets).reshape(-1)

    def best(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The answer per sample: ``(tokens[B, T], score[B])`` of its best finished
        hypothesis (unused slots hold ``pad_id``)."""
        return self.fin_tokens[:, 0], self.fin_scores[:, 0]

    def best_path(self) -> torch.Tensor:
        """Long ``[B, T]``: the beam (``0..n-1``) whose logits chose each answer token."""
        return self.fin_path[:, 0]

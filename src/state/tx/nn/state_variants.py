"""Two older variants of the State Transition network: same parts, different use of the backbone.

Both subclass :class:`StateTransitionNet` (so module names, and checkpoint keys, are the state
model's: ``pert_encoder``, ``basal_encoder``, ``transformer_backbone``, ``project_out``) and only
replace ``forward``. Batch / confidence tokens are not used by either.

* :class:`PseudobulkNet`: the set is mean-pooled into ONE token, the backbone sees that token alone
  and its output is broadcast back to every cell (a set-level shift, then per-cell projection).
* :class:`PerCellTokenNet` (old_neuralot): every cell becomes its own three-token sequence
  [perturbation, basal, zeros]; the backbone output at the last token is the cell's state. Cells
  never attend to each other.
"""

from __future__ import annotations

import torch

from state.tx.nn.state_transition import StateTransitionNet, TransitionOutput


class _VariantNet(StateTransitionNet):
    def _project(self, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        y = self.project_out(r + c) if self.predict_residual else self.project_out(r)  # [B, S, D_out]
        return self.relu(y) if self.relu is not None else y


class PseudobulkNet(_VariantNet):
    def forward(self, pert: torch.Tensor, basal: torch.Tensor, batch_index: torch.Tensor | None = None
                ) -> TransitionOutput:
        c = self.basal_encoder(basal)  # [B, S, H]
        x = self.pert_encoder(pert) + c  # [B, S, H]
        pooled = x.mean(dim=1, keepdim=True)  # [B, 1, H]
        r = self.transformer_backbone(inputs_embeds=pooled).last_hidden_state  # [B, 1, H]
        return TransitionOutput(preds=self._project(r.expand_as(c), c))


class PerCellTokenNet(_VariantNet):
    set_level_perturbation = False  # stacks per-cell perturbation tokens: needs pert [B, S, P]

    def forward(self, pert: torch.Tensor, basal: torch.Tensor, batch_index: torch.Tensor | None = None
                ) -> TransitionOutput:
        n_sets, n_cells = pert.shape[:2]
        p = self.pert_encoder(pert)  # [B, S, H]
        c = self.basal_encoder(basal)  # [B, S, H]
        tokens = torch.stack([p, c, torch.zeros_like(c)], dim=2)  # [B, S, 3, H]
        tokens = tokens.reshape(n_sets * n_cells, 3, -1)  # [B*S, 3, H]
        hidden = self.transformer_backbone(inputs_embeds=tokens).last_hidden_state[:, -1]  # [B*S, H]
        return TransitionOutput(preds=self._project(hidden.reshape(n_sets, n_cells, -1), c))

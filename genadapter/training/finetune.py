"""Instruction tuning of the generator: answer questions about a context read into a state.

Same conventions as pretraining (only `ga.generator` learns, safetensors checkpoints, exact
resume); batches come from `FinetuneDataModule`: episode batches (loss on answer tokens only)
with every `lm_every`-th batch a pretraining batch, so language modelling is not forgotten.
With `rank_weight` > 0 and candidate answers in the batches (data `rank_options`), the loss
adds a ranking term: the gold answer must out-score the other candidates, foremost those the
context mentions for other entities, which is what tells injected facts from format learning.
With `retrieval_weight` > 0, it adds `retrieval_losses` (`retrieval_kind` "softmax" or
"share"): each target's query at the question must find the context tokens that spell the
answer among the keys, trained directly.
Validation reports, per task, the answer NLL with no context (`loss_base`), with the state
(`loss_adapted`) and with the context in the prompt (`loss_prompt`), the gap closed, and with
candidates `choice` (how often the gold answer ranks first under the state), and
`retrieval_hit` / `retrieval_share` (how often a target's best-matching context token is an
answer token / the answer tokens' share of the linear read-out's weights).
With a write gate (`keys.gate`), validation also reports `gate_on` / `gate_off`, the mean gate on
the tokens that spell an asked answer / on the others, and `gate_weight` > 0 trains the gates on
that split directly (`gate_losses`).
With `distill_weight` > 0 (and `data.train_context_prompts`), it adds context distillation
(`objectives.distill_losses`): the KL from the frozen LM with the context in its prompt to the
adapted LM on the answer tokens (`distill_span` "answer") or also on the question's
("question"); validation then reports it per task (`distill_kl`).
`oracle_writes` (a diagnostic, "episode" or "row"): only the context tokens that spell an asked
answer write into the state (`probes.oracle_writes`), which tells the read-out's selection apart from
the LM's decoding of it. The probes and their losses live in `probes.py`.
"""

from __future__ import annotations

import torch

from genadapter.training.module import GeneratorPretraining, batch_key
from genadapter.training.objectives import DISTILL_SPANS, row_losses
from genadapter.training.probes import ORACLE_MODES, RETRIEVAL_KINDS, oracle_writes, probe_losses


class GeneratorFinetuning(GeneratorPretraining):
    def __init__(
        self,
        *args,
        lm_weight: float = 1.0,
        rank_weight: float = 0.0,
        retrieval_weight: float = 0.0,
        retrieval_kind: str = "softmax",
        gate_weight: float = 0.0,
        distill_weight: float = 0.0,
        distill_span: str = "question",
        oracle_writes: str | None = None,
        task_names: list[str] | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)  # its save_hyperparameters() records ours too
        if retrieval_kind not in RETRIEVAL_KINDS:
            raise ValueError(
                f"retrieval_kind must be one of {RETRIEVAL_KINDS}, got {retrieval_kind!r}"
            )
        if oracle_writes not in (None, *ORACLE_MODES):
            raise ValueError(
                f"oracle_writes must be one of {ORACLE_MODES} or None, got {oracle_writes!r}"
            )
        if distill_span not in DISTILL_SPANS:
            raise ValueError(f"distill_span must be one of {DISTILL_SPANS}, got {distill_span!r}")
        if gate_weight > 0 and not self.ga.config.keys.gate:
            raise ValueError(
                "gate_weight > 0 needs a generator with a write gate (keys.gate: true)"
            )

    def _answer_pass(self, batch: dict[str, torch.Tensor], **kwargs) -> dict:
        """The answer losses with the probes these settings ask for (oracle writes applied)."""
        h = self.hparams
        if h.oracle_writes:
            batch = oracle_writes(batch, h.oracle_writes)
        return probe_losses(self.ga, batch, **kwargs)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if "context_ids" not in batch:  # a pretraining batch
            out = self._pretrain_step_losses(batch)
            self.log("train/lm_loss", out["loss"], batch_size=batch["input_ids"].shape[0])
            return self.hparams.lm_weight * out["loss"]
        h, n = self.hparams, len(batch["row_task"])
        out = self._answer_pass(
            batch,
            with_ranking=h.rank_weight > 0,
            retrieval=h.retrieval_kind if h.retrieval_weight > 0 else None,
            gate=h.gate_weight > 0 and "answer_context" in batch,
            distill=h.distill_span if h.distill_weight > 0 else None,
        )
        self.log("train/answer_loss", out["loss"], prog_bar=True, batch_size=n)
        loss = out["loss"]
        if "rank_loss" in out:
            self.log("train/rank_loss", out["rank_loss"], batch_size=n)
            self.log("train/choice", out["rank_correct"].mean(), prog_bar=True, batch_size=n)
            loss = loss + h.rank_weight * out["rank_loss"]
        if "retrieval_loss" in out:
            hits = out["retrieval_hit"]
            self.log("train/retrieval_loss", out["retrieval_loss"], batch_size=len(hits))
            self.log("train/retrieval_hit", hits.mean(), batch_size=len(hits))
            loss = loss + h.retrieval_weight * out["retrieval_loss"]
        if "gate_loss" in out:
            n_ep = len(out["gate_on"])
            self.log("train/gate_loss", out["gate_loss"], batch_size=n_ep)
            for what in ("on", "off"):
                self.log(f"train/gate_{what}", out[f"gate_{what}"].mean(), batch_size=n_ep)
            loss = loss + h.gate_weight * out["gate_loss"]
        if h.distill_weight > 0:
            if "distill_loss" not in out and "prompt_rows" not in batch:
                raise ValueError(
                    "distill_weight > 0 needs the context prompts in the training batches: "
                    "set data.train_context_prompts: true"
                )
            if "distill_loss" in out:  # else no context prompt of this batch fits its window
                self.log("train/distill_loss", out["distill_loss"], batch_size=n)
                loss = loss + h.distill_weight * out["distill_loss"]
        return loss

    def _task(self, index: int) -> str:
        names = self.hparams.task_names or []
        if not names and self.trainer is not None and self.trainer.datamodule is not None:
            names = self.trainer.datamodule.task_names()
        return names[index] if index < len(names) else f"task{index}"

    @torch.no_grad()
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        prompt_rows = batch.get("prompt_rows", torch.zeros(0, dtype=torch.long)).to(self.device)
        if not len(prompt_rows):
            return  # gap_closed compares the three on the same rows: those whose prompt fits
        key = batch_key(batch, batch_idx)
        first = key not in self._references  # the frozen base's losses: computed once per batch
        gated = self.ga.config.keys.gate and "answer_context" in batch
        out = self._answer_pass(
            batch,
            with_base=first,
            retrieval=self.hparams.retrieval_kind,
            gate=gated,
            # the teacher costs a second read of each context: only when distilling
            distill=self.hparams.distill_span if self.hparams.distill_weight > 0 else None,
        )
        if first:
            self._references[key] = {
                "base": out["row_loss_base"][prompt_rows],
                "prompt": out["teacher_row_loss"]  # the teacher is the prompted LM
                if "teacher_row_loss" in out
                else self._prompt_loss(batch),
            }
        n_tok = batch["loss_mask"][:, 1:].sum(1).to(out["row_loss"])
        losses = {"adapted": out["row_loss"][prompt_rows], **self._references[key]}
        tasks, weights = batch["row_task"].to(self.device)[prompt_rows], n_tok[prompt_rows]
        for t in tasks.unique().tolist():
            sel = tasks == t
            w = weights[sel].sum()
            for what, loss in losses.items():
                self._accumulate(
                    f"{self._task(t)}/loss_{what}", (loss[sel] * weights[sel]).sum() / w, w
                )
        row_task = batch["row_task"].to(self.device)
        if "retrieval_hit" in out:  # over the questions whose context states the answer
            self._per_task(
                row_task[out["retrieval_rows"]],
                {f"retrieval_{w}": out[f"retrieval_{w}"] for w in ("hit", "share")},
            )
        if "gate_on" in out:  # over the episodes whose context states an asked answer
            self._per_task(
                row_task[out["gate_rows"]], {f"gate_{w}": out[f"gate_{w}"] for w in ("on", "off")}
            )
        if "distill_loss" in out:  # the KL from the prompted teacher, over the rows that fit
            kl, n = out["distill_row_kl"], out["distill_row_tokens"]
            for t in tasks.unique().tolist():
                sel = tasks == t
                self._accumulate(
                    f"{self._task(t)}/distill_kl", kl[sel].sum() / n[sel].sum(), n[sel].sum()
                )
        if "rank_correct" in out:  # over all questions with candidates, prompt fitting or not
            self._per_task(row_task[out["rank_group"]], {"choice": out["rank_correct"]})

    def _prompt_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The frozen LM's mean answer loss per context-prompt row (`prompt_*`)."""
        s, n = row_losses(
            self.ga.base_model,
            *(
                batch[f"prompt_{k}"].to(self.device)
                for k in ("input_ids", "attention_mask", "loss_mask")
            ),
        )
        return s / n.clamp(min=1)

    def _per_task(self, task: torch.Tensor, figures: dict[str, torch.Tensor]) -> None:
        """Accumulate each figure (one value per item, `task` the items' tasks) as a mean per task."""
        for t in task.unique().tolist():
            sel = task == t
            for name, x in figures.items():
                self._accumulate(
                    f"{self._task(t)}/{name}", x[sel].mean(), x.new_tensor(int(sel.sum()))
                )


def main(argv: list[str] | None = None) -> int:
    """`genadapter finetune --config FILE.yaml`: the pretraining CLI with these classes."""
    from genadapter.training.cli import main as cli_main
    from genadapter.training.instruct_data import FinetuneDataModule

    return cli_main(argv, "genadapter finetune", GeneratorFinetuning, FinetuneDataModule)

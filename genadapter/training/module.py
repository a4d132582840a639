"""LightningModule for self-supervised pretraining: only `ga.generator` learns.

Checkpoints hold the generator (and, through Lightning, the optimiser), never the frozen LM.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from genadapter.assets import DEFAULT_MODEL, load_base_model
from genadapter.config import GeneratorConfig
from genadapter.data.corpus import wiki_documents
from genadapter.model import GenerativeAdapter
from genadapter.training.objectives import pretrain_losses
from genadapter.warm_start import copy_values, fit_queries

OBJECTIVES = ("completion", "reconstruction")
# Losses of the frozen base alone: they never change during training, so every validation
# batch computes them once (the first time it is seen) and later validations reuse them.
REFERENCE_KEYS = ("/loss_base", "/loss_prompt", "/prompt_rows")


def batch_key(batch: dict[str, torch.Tensor], batch_idx: int) -> str:
    """A digest of a batch's tensors (and index): the same batch always gives the same key."""
    digest = hashlib.sha256(str(batch_idx).encode())
    for name in sorted(batch):
        value = batch[name]
        if isinstance(value, torch.Tensor):
            digest.update(name.encode() + value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def gap_closed(base: float, adapted: float, prompt: float) -> float | None:
    """Share of the prompting gain the state recovers; undefined when prompting does not help."""
    return (base - adapted) / (base - prompt) if base - prompt > 1e-6 else None


class GeneratorPretraining(L.LightningModule):
    def __init__(
        self,
        base_model: str = DEFAULT_MODEL,
        generator: GeneratorConfig | None = None,
        init_from: str | None = None,
        init_overrides: dict[str, Any] | None = None,
        completion_weight: float = 0.5,
        targets_per_doc: int = 8,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.99),
        warmup_steps: int = 50,
        decay_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        gradient_checkpointing: bool = False,
        base_dtype: str = "float32",
        max_prompt_len: int | None = None,
        export_dir: str | None = None,
        query_init_docs: int = 0,
        copy_init_beta: float = 0.0,
        copy_init_whiten: float | None = None,
        trainable: list[str] | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        if not 0.0 <= completion_weight <= 1.0:
            raise ValueError(f"completion_weight must be in [0, 1], got {completion_weight}")
        model, tokenizer = load_base_model(base_model, dtype=getattr(torch, base_dtype))
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={
                    "use_reentrant": False,
                    "context_fn": self._checkpoint_contexts,
                }
            )
        if init_from is not None:
            self.ga = GenerativeAdapter.from_pretrained(
                init_from, base_model=model, tokenizer=tokenizer, **(init_overrides or {})
            )
        else:
            cfg = (
                GeneratorConfig.from_dict(generator)
                if isinstance(generator, dict)
                else (generator or GeneratorConfig())
            )
            cfg.base_model = base_model
            torch.manual_seed(seed)  # the generator's initial weights depend only on the seed
            self.ga = GenerativeAdapter.from_base(model, cfg, tokenizer=tokenizer)
        if gradient_checkpointing and self.ga.config.queries.pooled:
            raise ValueError(
                "gradient_checkpointing recomputes layers outside the forward that pooled their "
                "queries' features: train a generator with pooled queries without it"
            )
        if trainable is not None:  # e.g. [G, B]: a warm start's match and values kept fixed
            self._freeze_all_but(trainable)
        # warm starts (genadapter/warm_start.py; a resumed run's checkpoint overrides them)
        if copy_init_beta > 0:  # values read out copy their token
            copy_values(self.ga, copy_init_beta, copy_init_whiten)
        if query_init_docs > 0:  # queries start as keys
            fits = fit_queries(self.ga, wiki_documents("train")[:query_init_docs])
            rank_zero_info(
                f"queries fitted to keys, R² {min(fits.values()):.3f}-{max(fits.values()):.3f}"
            )
        self.tokenizer_name = base_model
        self._checkpoint_layers()
        self._val_sums: dict[str, torch.Tensor] = {}
        self._references: dict[str, dict[str, torch.Tensor]] = {}  # see REFERENCE_KEYS
        self._batch_hashes: list[str] = []  # what this rank trained on, for the audit file

    def _freeze_all_but(self, trainable: list[str]) -> None:
        """Only the generator parameters named in `trainable` (A, K, V, B, G, log_lambda, in
        every target) learn."""
        names = {n.rsplit(".", 1)[-1] for n, _ in self.ga.generator.named_parameters()}
        unknown = sorted(set(trainable) - names)
        if unknown or not trainable:
            raise ValueError(f"trainable must name parameters of {sorted(names)}, got {trainable}")
        for name, p in self.ga.generator.named_parameters():
            p.requires_grad_(name.rsplit(".", 1)[-1] in trainable)

    def train(self, mode: bool = True) -> GeneratorPretraining:
        super().train(mode)  # the frozen LM stays in eval mode (GenerativeAdapter.train)
        self._checkpoint_layers()
        return self

    def _checkpoint_contexts(self) -> tuple[Any, Any]:
        """(forward, recompute) contexts of a checkpointed frozen layer: it is recomputed in the
        backward, after `adapted` has taken the side paths off, so it puts back those it ran with."""
        lora = self.ga.active_lora
        recompute = contextlib.nullcontext() if lora is None else self.ga.side_paths(lora)
        return contextlib.nullcontext(), recompute

    def _checkpoint_layers(self) -> None:
        """HF recomputes a checkpointed decoder layer only while that layer is in training mode,
        and the frozen LM is always in eval mode: set the flag on the layer modules alone (their
        attention, MLP and dropout stay in eval mode)."""
        if self.hparams.gradient_checkpointing:
            ga = self.ga
            for i in range(ga.base_model.config.num_hidden_layers):
                ga._modules_by_name[f"{ga._layers_name}.{i}"].training = True

    # only the generator is state: the frozen LM is rebuilt from its name
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.ga.generator_state_dict().items()}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True, **kw: Any):
        own = self.ga.generator_state_dict()
        if strict and state_dict.keys() != own.keys():
            raise ValueError(
                f"checkpoint generator keys differ: {sorted(state_dict.keys() ^ own.keys())[:5]}"
            )
        with torch.no_grad():
            for k, v in state_dict.items():
                own[k].copy_(v)
        return torch.nn.modules.module._IncompatibleKeys([], [])

    def _rng(self) -> torch.Generator:
        # target sampling depends only on (seed, step, rank): exact on resume
        return torch.Generator().manual_seed(
            self.hparams.seed * 1_000_003 + self.global_step * 97 + self.global_rank
        )

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int):
        """Pretraining batches keep a CPU copy of their mask (`host_mask`): targets and real
        chunks are planned from it, so the step never waits for the device to read the mask."""
        host = None
        if isinstance(batch, dict) and batch.get("attention_mask") is not None:
            host = batch["attention_mask"] if batch["attention_mask"].dim() == 3 else None
        batch = super().transfer_batch_to_device(batch, device, dataloader_idx)
        if host is not None:
            batch["host_mask"] = host
        return batch

    def _pretrain_step_losses(self, batch: dict[str, torch.Tensor]) -> dict:
        """`pretrain_losses` of a document batch, with this run's targets and generator."""
        h = self.hparams
        return pretrain_losses(
            self.ga,
            batch["input_ids"],
            batch["attention_mask"],
            h.targets_per_doc,
            h.completion_weight,
            self._rng(),
            host_mask=batch.get("host_mask"),
        )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self._pretrain_step_losses(batch)
        tokens = batch["attention_mask"].sum()
        if os.environ.get("GENADAPTER_AUDIT_DIR"):  # hashing copies the batch back to the host
            self._batch_hashes.append(
                hashlib.sha256(batch["input_ids"].cpu().numpy().tobytes()).hexdigest()[:16]
            )
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=batch["input_ids"].shape[0])
        for k in OBJECTIVES:
            if f"{k}/loss_adapted" in out:
                self.log(
                    f"train/{k}_loss",
                    out[f"{k}/loss_adapted"],
                    batch_size=batch["input_ids"].shape[0],
                )
        self.log("train/context_tokens", tokens.float(), reduce_fx="sum")
        return out["loss"]

    def on_validation_epoch_start(self) -> None:
        self._val_sums = {}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        h = self.hparams
        key = batch_key(batch, batch_idx)
        first = key not in self._references
        out = pretrain_losses(
            self.ga,
            batch["input_ids"],
            batch["attention_mask"],
            h.targets_per_doc,
            0.5,  # validation always measures both objectives
            torch.Generator().manual_seed(h.seed + batch_idx),
            with_base=first,
            with_prompt=first,
            max_prompt_len=h.max_prompt_len or self._window(),
        )
        if first:
            self._references[key] = {k: v for k, v in out.items() if k.endswith(REFERENCE_KEYS)}
        out.update(self._references[key])
        for key, value in out.items():
            if key == "loss" or key.endswith("/tokens") or key.endswith("/prompt_rows"):
                continue
            self._accumulate(key, value, out.get(key.split("/")[0] + "/tokens", torch.tensor(1.0)))

    def _accumulate(self, key: str, mean: torch.Tensor, weight: torch.Tensor) -> None:
        """Add a weighted mean to the validation sums (reduced over ranks at epoch end)."""
        s = self._val_sums.setdefault(key, torch.zeros(2, dtype=torch.float64, device=self.device))
        s += torch.stack([mean.detach().double() * weight.double(), weight.double()]).to(s.device)

    def _window(self) -> int | None:
        return getattr(self.ga.base_model.config, "max_position_embeddings", None)

    def on_validation_epoch_end(self) -> None:
        metrics = {}
        for key, s in sorted(self._val_sums.items()):
            s = (
                self.trainer.strategy.reduce(s, reduce_op="sum")
                if self.trainer.world_size > 1
                else s
            )
            metrics[f"val/{key}"] = (s[0] / s[1].clamp(min=1)).item()
        for k in sorted({key[4:].rsplit("/", 1)[0] for key in metrics}):  # each objective / task
            base, adapted, prompt = (
                metrics.get(f"val/{k}/loss_{x}") for x in ("base", "adapted", "prompt")
            )
            if (
                None not in (base, adapted, prompt)
                and gap_closed(base, adapted, prompt) is not None
            ):
                metrics[f"val/{k}/gap_closed"] = gap_closed(base, adapted, prompt)
        for key, value in metrics.items():
            self.log(
                key,
                value,
                prog_bar=key.endswith("gap_closed"),
                sync_dist=False,
                rank_zero_only=True,
            )

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        # a sharded generator's norm spans every rank's shard: GeneratorFSDP computes it
        clip = getattr(self.trainer.strategy, "clip_generator_gradients", None)
        if clip is not None and gradient_clip_val and gradient_clip_algorithm in (None, "norm"):
            clip(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        h = self.hparams
        opt = torch.optim.AdamW(
            [p for p in self.ga.generator.parameters() if p.requires_grad],
            lr=h.lr,
            weight_decay=h.weight_decay,
            betas=tuple(h.betas),
        )
        decay = h.decay_steps or (
            self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else None
        )

        def schedule(step: int) -> float:  # linear warm-up, then cosine to min_lr_ratio
            if step < h.warmup_steps:
                return (step + 1) / h.warmup_steps
            if not decay or decay <= h.warmup_steps:
                return 1.0
            progress = min(1.0, (step - h.warmup_steps) / (decay - h.warmup_steps))
            return h.min_lr_ratio + (1 - h.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_fit_end(self) -> None:
        # a sharded generator (GeneratorFSDP) is gathered whole on every rank first
        whole = getattr(self.trainer.strategy, "full_generator", contextlib.nullcontext)
        with whole():
            if self.hparams.export_dir and self.trainer.is_global_zero:
                self.ga.save_pretrained(Path(self.hparams.export_dir))
            audit = os.environ.get("GENADAPTER_AUDIT_DIR")
            if audit:  # per-rank record of weights and data, to check distributed runs
                Path(audit).mkdir(parents=True, exist_ok=True)
                record = {
                    "rank": self.global_rank,
                    "generator": self.ga.generator.fingerprint(),
                    "global_step": self.global_step,
                    "batches": self._batch_hashes,
                }
                (Path(audit) / f"rank{self.global_rank}.json").write_text(json.dumps(record))

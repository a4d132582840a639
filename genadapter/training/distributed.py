"""FSDP for a frozen LM and its generator (`trainer.strategy: fsdp_generator`).

Units: every decoder layer of the frozen LM is its own FSDP unit (its weights sharded, gathered
for its forward and its backward); the generator lives in the root unit, so its weights,
gradients and AdamW states are sharded too. The LM's weights outside the decoder layers
(embeddings, final norm, head, often tied to each other) are left whole on every rank: FSDP cannot
split tied weights across units, and a frozen weight needs no gradient sync. The generator's
methods are called directly, not through a forward, so it must sit in the root unit, which
gathers it for every training or validation step.

Checkpoints are folders: `rank{r}-of-{w}.safetensors` holds rank r's shard of the generator and
of its optimiser state, `meta.safetensors` the rest (loops, schedulers, data position) as JSON;
nothing is pickled. A sharded checkpoint resumes on the same number of ranks.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from genadapter.targets import decoder_layers
from genadapter.training.checkpoint_io import SafetensorsCheckpointIO

META = "meta.safetensors"


def shard_name(rank: int, world_size: int) -> str:
    return f"rank{rank}-of-{world_size}.safetensors"


def layer_list(base_model: nn.Module) -> nn.ModuleList:
    return base_model.get_submodule(decoder_layers(base_model)[0])


def outside_layers(base_model: nn.Module) -> list[nn.Module]:
    """Modules of the LM that hold weights of their own outside the decoder layers."""
    layers = layer_list(base_model)
    inside = {id(m) for layer in layers for m in layer.modules()}
    return [
        m
        for m in base_model.modules()
        if id(m) not in inside and any(True for _ in m.parameters(recurse=False))
    ]


class GeneratorFSDP(FSDPStrategy):
    """Lightning's FSDPStrategy with the units, precision and checkpoints described above."""

    strategy_name = "fsdp_generator"

    def __init__(self, **kwargs: Any):
        # the generator stays float32 (states are float32 sums) and its gradients are reduced in
        # float32; bf16-mixed computes in bf16 through autocast, not by casting the weights
        kwargs.setdefault("mixed_precision", MixedPrecision())
        super().__init__(**kwargs)

    def _setup_model(self, model: nn.Module) -> nn.Module:
        base = self.lightning_module.ga.base_model
        layers = layer_list(base)
        device = self.root_device
        whole = outside_layers(base)
        with torch.no_grad():  # FSDP moves only what it shards (tied weights move once)
            for p in {id(p): p for m in whole for p in m.parameters(recurse=False)}.values():
                p.data = p.data.to(device)
        return FullyShardedDataParallel(
            module=model,
            auto_wrap_policy=ModuleWrapPolicy({type(layer) for layer in layers}),
            ignored_states=whole,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            # FSDP takes the CPU (gloo) only when told so by device, not by index
            device_id=device if device.type == "cpu" else device.index,
            **self.kwargs,
        )

    # --- the whole generator, gathered (export, audit) --------------------------------------------
    @contextlib.contextmanager
    def full_generator(self) -> Iterator[None]:
        """Every rank holds the whole generator inside the block (call it on every rank).

        The gathered weights are copied out and swapped in for the block: FSDP frees its
        gathered buffer in place, which fails once numpy (saving, fingerprints) has viewed it."""
        params = self.lightning_module.ga.generator_state_dict()
        with FullyShardedDataParallel.summon_full_params(
            self.model, recurse=False, writeback=False
        ):
            whole = {k: p.detach().clone() for k, p in params.items()}
        shards = {k: p.data for k, p in params.items()}
        try:
            for k, p in params.items():
                p.data = whole[k]
            yield
        finally:
            for k, p in params.items():
                p.data = shards[k]

    def clip_generator_gradients(self, max_norm: float) -> None:
        """Clip by the norm over every rank's gradient shards (`trainer.gradient_clip_val`)."""
        self.model.clip_grad_norm_(max_norm)

    # --- sharded checkpoints ----------------------------------------------------------------------
    def lightning_module_state_dict(self) -> dict[str, torch.Tensor]:
        # outside a forward, each generator parameter is a view of this rank's slice of the flat
        # parameter (use_orig_params): its shard, possibly empty
        ga = self.lightning_module.ga
        return {k: v.detach().clone() for k, v in ga.generator_state_dict().items()}

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return getattr(optimizer, "_optimizer", optimizer).state_dict()  # over the shards

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None
    ) -> None:
        path = Path(self.broadcast(str(filepath)))
        if self.is_global_zero:
            if path.is_file():
                path.unlink()
            path.mkdir(parents=True, exist_ok=True)
        self.barrier("genadapter-fsdp-save")
        io = SafetensorsCheckpointIO()
        own = {k: checkpoint.pop(k) for k in ("state_dict", "optimizer_states") if k in checkpoint}
        io.save_checkpoint(own, path / shard_name(self.global_rank, self.world_size))
        if self.is_global_zero:
            io.save_checkpoint(checkpoint, path / META)
        self.barrier("genadapter-fsdp-saved")

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict:
        path = Path(self.broadcast(str(checkpoint_path)))
        mine = path / shard_name(self.global_rank, self.world_size)
        if not mine.is_file():
            saved = sorted(p.name for p in path.glob("rank*-of-*.safetensors"))
            raise ValueError(
                f"{path} holds no shard for rank {self.global_rank} of {self.world_size} "
                f"(it has {saved}): resume a sharded checkpoint on as many ranks as saved it"
            )
        io = SafetensorsCheckpointIO()
        own = io.load_checkpoint(mine)
        params = self.lightning_module.ga.generator_state_dict()
        with torch.no_grad():
            for k, v in own["state_dict"].items():
                params[k].copy_(v)  # into this rank's slice of the flat parameter
        if self.lightning_module.trainer.state.fn == TrainerFn.FITTING:
            for optimizer, state in zip(
                self.optimizers, own.get("optimizer_states", []), strict=True
            ):
                optimizer.load_state_dict(state)
        return io.load_checkpoint(path / META)

    def remove_checkpoint(self, filepath: Any) -> None:
        if self.is_global_zero:
            path = Path(filepath)
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


StrategyRegistry.register(
    GeneratorFSDP.strategy_name,
    GeneratorFSDP,
    description="FSDP of a frozen LM (one unit per decoder layer) and its generator (root unit)",
)

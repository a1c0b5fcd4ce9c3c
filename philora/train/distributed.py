"""What philora's loop tells accelerate's sharded engines (DeepSpeed ZeRO, FSDP), and how it reads back from them.

philora draws its own batches and accumulates its own micro-batches, so accelerate never sees a DataLoader and
cannot resolve DeepSpeed's `auto` batch sizes: they are set here from `training_config`, with philora's clipping.
DeepSpeed also owns the optimizer step: accelerate's `backward` marks each micro-batch as an accumulation boundary
when `accelerator.sync_gradients` is true and then steps the engine (clip, update, zero grad). The loop sets that
flag on the last micro-batch of a step only, so there is one update per `gradient_accumulation_steps`
micro-batches, clipped once, as under DDP. The engine would also divide each micro-batch's loss by the
accumulation steps; philora's loss is already a per-token share of the whole step, so `backward_kwargs` turns
that off.
"""

from __future__ import annotations

from typing import Any

import torch

from philora.config import TrainingSection


def deepspeed_settings(tc: TrainingSection, processes: int) -> dict[str, Any]:
    """The DeepSpeed config keys philora's loop decides (the rest comes from the accelerate config)."""
    micro = tc.per_device_train_batch_size
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": tc.gradient_accumulation_steps,
        "train_batch_size": micro * tc.gradient_accumulation_steps * processes,
        "gradient_clipping": tc.max_grad_norm or 0.0,
    }


def configure(state: Any, tc: TrainingSection) -> None:
    """Fill the DeepSpeed or FSDP plugin of an accelerate state before `prepare`."""
    if state.deepspeed_plugin is not None:
        state.deepspeed_plugin.deepspeed_config.update(deepspeed_settings(tc, state.num_processes))
    fsdp = getattr(state, "fsdp_plugin", None)
    if fsdp is not None:
        # LoRA leaves most weights frozen: FSDP1 can only shard a mix of frozen and trained tensors with the
        # original parameters kept (FSDP2 always does). philora checkpoints layers itself when asked to.
        fsdp.use_orig_params = True
        fsdp.activation_checkpointing = False


def sharded(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def backward_kwargs(accelerator: Any) -> dict[str, Any]:
    """Under DeepSpeed: keep the engine from scaling the loss by the accumulation steps again (see above)."""
    from accelerate.utils import DistributedType

    return {"scale_wrt_gas": False} if accelerator.distributed_type == DistributedType.DEEPSPEED else {}


def grad_norm(accelerator: Any, loss_fn: Any, max_norm: float) -> float | None:
    """Clip to `max_norm` and return the norm before clipping; DeepSpeed clipped in its step, so ask its engine."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        norm = accelerator.deepspeed_engine_wrapped.engine.get_global_grad_norm()
        return None if norm is None else float(norm)
    if not max_norm:
        return None
    return float(accelerator.clip_grad_norm_(loss_fn.parameters(), max_norm))


def gathered_adapter(accelerator: Any, loss_fn: Any) -> dict[str, torch.Tensor] | None:
    """Under FSDP or DeepSpeed each process holds a shard of the weights: all of them take part in gathering the
    whole state dict, which the main process saves. None elsewhere: save_pretrained reads the model itself."""
    if not sharded(accelerator):
        return None
    full = accelerator.get_state_dict(loss_fn)  # TokenLoss's: the model under "model.", plus aliases of it
    return {k.removeprefix("model."): v for k, v in full.items() if k.startswith("model.")}

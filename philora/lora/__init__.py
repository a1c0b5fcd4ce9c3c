"""LoRA for any PyTorch model (a drop-in for `import loralib as lora`) and for Hugging Face models via peft.

from philora import lora
layer = lora.Linear(768, 768, r=16, lora_alpha=32)
lora.mark_only_lora_as_trainable(model)
torch.save(lora.lora_state_dict(model), "lora.pt")
model.load_state_dict(torch.load("lora.pt"), strict=False)
"""

from philora.lora.layers import Conv1d, Conv2d, Conv3d, ConvLoRA, Embedding, Linear, LoRALayer, MergedLinear
from philora.lora.utils import lora_state_dict, mark_only_lora_as_trainable

__all__ = [
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "ConvLoRA",
    "Embedding",
    "Linear",
    "LoRALayer",
    "MergedLinear",
    "lora_state_dict",
    "mark_only_lora_as_trainable",
]

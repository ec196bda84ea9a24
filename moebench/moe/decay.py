"""Which parameters get weight decay: decided by role, as the Soft MoE authors do.

The authors' optimizer (google-research/vmoe, ``soft_moe/configs/common.py``,
``get_adam_config``) decays every ``*/kernel`` and nothing else: the kernels of
the patch embedding, attention, MLPs, experts, gates and head. Biases, norms,
position embeddings, the class token and Soft MoE's slot parameters and scale
are never decayed. A rule on ``ndim`` gets this wrong (stacked expert biases
are 2-D, ``phi`` is 3-D), so a module says which of its own parameters are
matmul kernels: ``nn.Linear`` and ``nn.Conv*`` their ``weight``, any other
module through a ``matmul_kernels`` class attribute (``Experts``: w1, w2).
"""

from __future__ import annotations

from torch import nn

_KERNEL_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def matmul_kernel_names(module: nn.Module) -> tuple[str, ...]:
    """Names of ``module``'s own (non-recursive) parameters that are matmul kernels."""
    if isinstance(module, _KERNEL_MODULES):
        return ("weight",)
    return tuple(getattr(module, "matmul_kernels", ()))


def weight_decay_split(model: nn.Module) -> tuple[list[str], list[str]]:
    """``(decay, no_decay)``: parameter names of ``model``, matmul kernels first.

    Every parameter lands in exactly one list, in ``named_parameters`` order.
    """
    kernels = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        kernels.update(prefix + name for name in matmul_kernel_names(module))
    decay, no_decay = [], []
    for name, _ in model.named_parameters():
        (decay if name in kernels else no_decay).append(name)
    return decay, no_decay

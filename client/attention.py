"""Packed rows must reach a model that keeps their segments apart: check it once, before the first step.

A packed batch carries `position_ids` restarting at every segment and no `attention_mask`. A model keeps the
segments apart only if it derives a per-segment (block-diagonal) causal mask from them: transformers 5 does with
sdpa and eager attention, but only when no KV cache is in play, and a model whose config keeps `use_cache=True`
(the default of LlamaConfig, GPT2Config and most others) builds a DynamicCache in training too. Its packed
segments then attend to each other, silently (logits off by 0.2-0.8 on small Llama and GPT-2 models).

`check_packed_attention(model)` sets `use_cache=False` on every config in the model, then runs a probe batch of
packed rows and raises PackedAttentionError if a segment's logits depend on the segment before it or on where it
starts in the row. FeedTrainer and FeedSFTTrainer (the Trainer and TRL turn the cache off) and FeedDataModule
(which checks the model at its first batch) need no call; anything else that trains on packed rows should call it
once, else FeedDataset warns (PackedAttentionWarning) when its first packed batch arrives.

Only torch is needed, and only when a model is checked: this module imports with the client's dependencies.
"""

from __future__ import annotations

import inspect
import logging
import threading
import warnings
from typing import TYPE_CHECKING, Any

from .stream import FeedError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class PackedAttentionError(FeedError):
    """The model lets a packed row's segments attend to each other (or ignores where they start)."""


class PackedAttentionWarning(UserWarning):
    """Packed rows are served to a model nobody checked (see check_packed_attention)."""


SECURED_BY_CHECK = "check_packed_attention"
_checked = threading.Event()  # a model was checked in this process (see packed_attention_checked)
_warned = threading.Event()

# The probe: one segment B after A, after A' (other tokens, same offset) and alone at the row's start.
_A, _B = 7, 9
_ROW = _A + _B


def check_packed_attention(model: Any, *, fix: bool = True, atol: float | None = None) -> float:
    """Make sure `model` keeps packed segments apart; call once before training (on every rank, before wrapping
    it in DDP/FSDP or accelerator.prepare is best). Returns the largest logit difference the probe measured.

    fix: set `config.use_cache = False` on every module whose config has it on (the transformers models), as the
    Trainer does; with fix=False such a config is a PackedAttentionError instead.
    The probe runs the model (eval mode and no_grad for the call, then each module's mode restored; the global
    random state is untouched) on three packed rows of 16 tokens, with `input_ids` and `position_ids` as
    FeedDataset yields them: segment B after segment A, after another A', and alone. B's outputs must not change
    with A's tokens (within `atol`, default: one rounding step of the output's dtype at its scale) nor with its
    offset (8 steps, at least 1e-4, relative). PackedAttentionError says which and by how much.
    """
    caching = _caching(model)
    if caching and not fix:
        raise PackedAttentionError(
            f"{', '.join(caching)} has config.use_cache=True: with it, transformers builds a KV cache in training "
            "too and then derives no per-segment mask from position_ids, so packed samples attend to each other. "
            "Set model.config.use_cache = False (or call check_packed_attention(model) with fix=True)")
    disable_kv_cache(model)
    leak, shift = _probe(_unwrapped(model), atol)
    _checked.set()
    return max(leak, shift)


def disable_kv_cache(model: Any) -> list[str]:
    """Set `config.use_cache = False` on every module of `model` whose config has it on; the modules changed.

    A transformers model and its base model share one config: it is named once. Nothing else about the model
    changes; generate() still caches (it passes use_cache from its generation config).
    """
    caching = _caching(model)
    for config in caching.values():
        config.use_cache = False
    if caching:
        log.info("sigil-feed: set config.use_cache=False on %s, so that packed samples do not attend to each other "
                 "(transformers derives the per-segment mask only without a KV cache)", ", ".join(caching))
    return list(caching)


def _caching(model: Any) -> dict[str, Any]:
    """The configs in `model` with use_cache on, by the class name of the first module holding each."""
    found: dict[str, Any] = {}
    modules = model.modules() if callable(getattr(model, "modules", None)) else [model]
    for module in modules:
        config = getattr(module, "config", None)
        if getattr(config, "use_cache", None) is True and all(c is not config for c in found.values()):
            found.setdefault(type(module).__name__, config)
    return found


def packed_attention_checked() -> bool:
    """Whether a model was checked (check_packed_attention) in this process."""
    return _checked.is_set()


def warn_unchecked(dataset: str, target: str) -> None:
    """Warn once per process that packed rows of `dataset` are served to a model nobody checked."""
    if _checked.is_set() or _warned.is_set():
        return
    _warned.set()
    warnings.warn(
        f"sigil-feed: dataset {dataset!r} at {target} serves packed rows (several samples per row, position_ids "
        "restarting at each) and no model was checked to keep them apart. With transformers 5 and sdpa or eager "
        "attention, a model whose config keeps use_cache=True (the default of most configs) lets packed samples "
        "attend to each other, silently. Call sigil_feed.client.check_packed_attention(model) once before "
        "training (it sets use_cache=False and verifies the model on a packed probe batch), or train with "
        "FeedTrainer, FeedSFTTrainer or FeedDataModule, which do it",
        PackedAttentionWarning, stacklevel=3)


def packed_models(root: Any) -> list[Any]:
    """The outermost modules under `root` (itself included) whose forward takes `input_ids` and `position_ids`
    by name: the models a framework's module wraps (a transformers model, not its base model inside it)."""
    found: list[Any] = []

    def visit(module: Any) -> None:
        if _takes_packed_inputs(module):
            found.append(module)
            return
        for child in module.children():
            visit(child)

    visit(root)
    return found


def _takes_packed_inputs(module: Any) -> bool:
    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return False
    return "input_ids" in parameters and "position_ids" in parameters


def _unwrapped(model: Any) -> Any:
    """The module inside DistributedDataParallel or DataParallel (the probe then needs no collective)."""
    import torch

    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


def _probe(model: Any, atol: float | None) -> tuple[float, float]:
    """Run the probe rows; (how much B's outputs change with A's tokens, and with B's offset)."""
    import torch

    device = _device(model)
    generator = torch.Generator().manual_seed(0)
    high = max(2, min(_vocab_size(model), 32000))
    a, other_a, b, pad = (torch.randint(0, high, (n,), generator=generator) for n in (_A, _A, _B, _ROW - _B))
    input_ids = torch.stack([torch.cat([a, b]), torch.cat([other_a, b]), torch.cat([b, pad])])
    position_ids = torch.stack([torch.cat([torch.arange(_A), torch.arange(_B)])] * 2
                               + [torch.cat([torch.arange(_B), torch.arange(_ROW - _B)])])
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            output = model(input_ids=input_ids.to(device), position_ids=position_ids.to(device))
    except Exception as err:
        raise PackedAttentionError(
            f"could not run {type(model).__name__} on a packed probe batch (input_ids and position_ids of shape "
            f"{tuple(input_ids.shape)}): {type(err).__name__}: {err}. Check the model that takes the batch's "
            "input_ids and position_ids (e.g. the transformers model inside your module)") from err
    finally:
        for module, training in modes:
            module.training = training
    logits = _logits(output)
    after_a, after_other_a, alone = logits[0, _A:], logits[1, _A:], logits[2, :_B]
    scale = max(1.0, float(alone.abs().max()))
    eps = torch.finfo(logits.dtype).eps if logits.dtype.is_floating_point else 0.0
    leak = float((after_a - after_other_a).abs().max())
    shift = max(float((after_a - alone).abs().max()), float((after_other_a - alone).abs().max()))
    leak_limit = atol if atol is not None else eps * scale
    shift_limit = atol if atol is not None else max(1e-4, 8 * eps) * scale
    if leak > leak_limit or shift > shift_limit:
        raise PackedAttentionError(_diagnosis(model, leak, leak_limit, shift, shift_limit))
    return leak, shift


def _diagnosis(model: Any, leak: float, leak_limit: float, shift: float, shift_limit: float) -> str:
    """What the probe found, and the likely causes."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    found = []
    if leak > leak_limit:
        found.append(f"a packed segment's outputs change with the segment before it (by up to {leak:.3g}, allowed "
                     f"{leak_limit:.3g}): packed samples attend to each other")
    if shift > shift_limit:
        found.append(f"a packed segment's outputs differ from the same segment alone (by up to {shift:.3g}, allowed "
                     f"{shift_limit:.3g}): the model does not restart at position_ids 0")
    causes = ("a per-segment mask needs no KV cache in play (use_cache=False, which was set) and an attention "
              "implementation that derives it from position_ids (transformers 5: sdpa, eager, flash_attention_2; "
              f"this model's is {getattr(config, '_attn_implementation', None)!r}), no attention_mask, and no "
              "use_cache=True passed to forward")
    return (f"{name} does not keep packed samples apart: {'; '.join(found)}. For sigil-feed's packed rows {causes}. "
            "A model in low precision may need a larger atol= for the offset comparison; a model that cannot "
            "use position_ids this way needs the dataset served with pack: false, or flash_attn_kwargs=True with a "
            "varlen attention kernel")


def _device(model: Any) -> torch.device:
    """Where the model's parameters are (CPU for a model without any); refuses the meta device."""
    import torch

    parameter = next(iter(model.parameters()), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    if device.type == "meta":
        raise PackedAttentionError(f"{type(model).__name__} is on the meta device (not materialised yet): check it "
                                   "once its weights are loaded")
    return device


def _vocab_size(model: Any) -> int:
    """The number of token ids the model embeds: its input embeddings', its config's, or its first Embedding's."""
    import torch

    embeddings = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    size = getattr(embeddings, "num_embeddings", None) or getattr(getattr(model, "config", None), "vocab_size", None)
    if size is None:
        size = next((m.num_embeddings for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)
    if not isinstance(size, int):
        raise PackedAttentionError(f"cannot tell how many token ids {type(model).__name__} takes (no "
                                   "get_input_embeddings(), config.vocab_size nor Embedding)")
    return size


def _logits(output: Any) -> torch.Tensor:
    """The per-token outputs of a forward call: .logits, .last_hidden_state, the first item, or the tensor."""
    import torch

    for name in ("logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, torch.Tensor):
        return output
    raise PackedAttentionError(f"cannot find per-token outputs in what the model returned ({type(output).__name__})")

"""When CalmModel.generate runs many prompts through one continuous batch (calm.engine.scheduler), and with
which drafter: the facade's rule, in one place."""

from __future__ import annotations

from calm.engine.decode import Network
from calm.engine.generation import GenerationConfig, GenerationResult, PromptBatch, resolve_engine
from calm.engine.scheduler import generate_continuous
from calm.exits.policy import ExitPolicy
from calm.speculative.cycle import LosslessDrafter, lossless_drafter
from calm.speculative.lossless import LOSSLESS, MeasuredModel
from calm.speculative.options import SpeculativeOptions

DEFAULT_MAX_BATCH = 8  # slots of a continuous batch: generate()'s and the commands' default


def runs_continuous(
    net: Network, batch: PromptBatch, config: GenerationConfig, mode: str, spec: SpeculativeOptions
) -> bool:
    """Several prompts of a decoder-only model on the dynamic engine, in calm's mode or lossless without an
    explicit speculative setting: those run through the scheduler. The rest batch as before (one prompt; the
    static engine; encoder-decoders; `mode="speculative"` or a named draft layer, length or lookup)."""
    explicit = (spec.draft_layer, spec.max_draft, spec.candidates) != (None, None, None) or spec.lookup
    return (
        batch.ids.shape[0] > 1
        and not net.adapter.is_encoder_decoder
        and resolve_engine(config, batch.ids.device) == "dynamic"
        and mode in ("calm", LOSSLESS)
        and not explicit
    )


def continuous_generate(
    model: MeasuredModel, batch: PromptBatch, policy: ExitPolicy, config: GenerationConfig, mode: str, max_batch: int
) -> tuple[GenerationResult, str]:
    """The prompts of `batch` (its real tokens only) through a continuous batch; lossless rows never exit, and
    speculative cycles run while the stored measurement says drafting pays. -> the result and what ran."""
    prompts = [ids[mask].tolist() for ids, mask in zip(batch.ids, batch.mask)]
    slots = min(max_batch, len(prompts))
    drafter = lossless_drafter(model, slots) if mode == LOSSLESS else None
    row_policy = ExitPolicy.never() if mode == LOSSLESS else policy
    result = generate_continuous(model.network, prompts, row_policy, config, slots, drafter)
    return result, describe(mode, slots, drafter, row_policy)


def describe(mode: str, slots: int, drafter: LosslessDrafter | None, policy: ExitPolicy) -> str:
    batching = f"continuous batching, {slots} slots"
    if mode != LOSSLESS:
        return f"{policy.describe()}; {batching}"
    if drafter is None:
        return f"full model (lossless; no stored measurement finds speculative decoding faster); {batching}"
    rows = f"while at most {drafter.most_rows} rows are live, else the full model"
    return f"lossless: {drafter.describe()} {rows}; {batching}"

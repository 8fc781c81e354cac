"""When CalmModel.generate and the bulk commands run many prompts through one continuous batch
(calm.engine.scheduler), and with which drafter: the facade's rule, in one place."""

from __future__ import annotations

from calm.engine.bulk import generate_continuous, runs_dynamic
from calm.engine.decode import Network
from calm.engine.generation import GenerationConfig, GenerationResult, PromptBatch
from calm.engine.scheduler import Scheduler
from calm.exits.policy import ExitPolicy
from calm.speculative.cycle import LosslessDrafter, lossless_drafter
from calm.speculative.lossless import LOSSLESS, MeasuredModel
from calm.speculative.options import SpeculativeOptions

DEFAULT_MAX_BATCH = 16  # slots of a continuous batch: the fastest measured (benchmarks/results/bulk_smollm2.md)


def runs_continuous(
    net: Network, slots: int, config: GenerationConfig, mode: str, spec: SpeculativeOptions | None
) -> bool:
    """Several prompts at once (slots: the batch size, at most the prompts) on the dynamic engine, in calm's mode
    or lossless without an explicit speculative setting: those run through the scheduler. The rest batch as
    before (one at a time; the static engine; `mode="speculative"` or a named draft layer, length or lookup)."""
    explicit = spec is not None and (
        (spec.draft_layer, spec.max_draft, spec.candidates) != (None, None, None) or spec.lookup
    )
    return slots > 1 and runs_dynamic(config, net.adapter.device) and mode in ("calm", LOSSLESS) and not explicit


def continuous_scheduler(
    model: MeasuredModel,
    lossless: bool,
    slots: int,
    eos_token_ids: tuple[int, ...],
    kernels: str = "auto",
    twin: bool | None = None,
) -> tuple[Scheduler, LosslessDrafter | None]:
    """A scheduler of `slots` rows over the model; lossless: with the drafter its stored measurement asks for (twin:
    whether the 4-bit twin drafts; None: as stored)."""
    drafter = lossless_drafter(model, slots, twin) if lossless else None
    scheduler = Scheduler(model.network, max_batch=slots, eos_token_ids=eos_token_ids, drafter=drafter, kernels=kernels)
    return scheduler, drafter


def continuous_generate(
    model: MeasuredModel,
    batch: PromptBatch,
    policy: ExitPolicy,
    config: GenerationConfig,
    mode: str,
    max_batch: int,
    drafts: bool = True,
    twin: bool | None = None,
) -> tuple[GenerationResult, str]:
    """The prompts of `batch` (its real tokens only) through a continuous batch; lossless rows never exit, and
    speculative cycles run while the stored measurement says drafting pays (drafts=False: never; twin: whether the
    4-bit twin drafts, None: as stored). -> the result and what ran."""
    prompts = [ids[mask].tolist() for ids, mask in zip(batch.ids, batch.mask)]
    slots = min(max_batch, len(prompts))
    drafter = lossless_drafter(model, slots, twin) if mode == LOSSLESS and drafts else None
    row_policy = ExitPolicy.never() if mode == LOSSLESS else policy
    result = generate_continuous(model.network, prompts, row_policy, config, slots, drafter)
    ran = describe(mode == LOSSLESS, slots, drafter, row_policy)
    s = result.speculative
    if s is not None and s.row_cycles:
        ran += f"; this run: {s.tokens_per_step:.2f} tokens per step, acceptance {s.acceptance_rate:.2f}"
    return result, ran


def describe(lossless: bool, slots: int, drafter: LosslessDrafter | None, policy: ExitPolicy) -> str:
    batching = f"continuous batching, {slots} slot{'s' if slots != 1 else ''}"
    if not lossless:
        return f"{policy.describe()}; {batching}"
    if drafter is None:
        return f"full model (lossless: no stored speculative measurement pays for any row count); {batching}"
    rows = f"while at most {drafter.most_rows} rows are live, else the full model"
    return f"lossless: {drafter.describe()} {rows}; {batching}"


def continuous_description(
    model: MeasuredModel, lossless: bool, slots: int, policy: ExitPolicy, twin: bool | None = None
) -> str:
    """What a continuous batch of `slots` rows runs, for a footer (as continuous_generate's result says)."""
    drafter = lossless_drafter(model, slots, twin) if lossless else None
    return describe(lossless, slots, drafter, ExitPolicy.never() if lossless else policy)

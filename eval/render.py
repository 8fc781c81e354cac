"""Summaries shown token by token with their exit layers, like the CALM paper's figures: each token's
background coloured on a terminal (green = early exit, red = full depth, with a legend of layer
ranges; whitespace tokens stay visible), annotated as `token[layer]` in plain text."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

from rich.console import Console, Group
from rich.text import Text

from calm.engine.decode import ExitPlan
from calm.eval.summarize import DocumentSummary
from calm.exits.confidence import check_overhead, softmax_check_layers
from calm.exits.policy import ExitPolicy
from calm.prompts.templates import decode_text

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from calm.model import CalmModel

RAMP = ((0x1A, 0x98, 0x50), (0xFE, 0xE0, 0x8B), (0xD7, 0x30, 0x27))  # early exit -> mid -> full depth
LEGEND_BUCKETS = 6
# With 8 or 16 colours, a 6-step ramp collapses onto a few of them out of order; three named colours
# read early -> late as they are, and the legend names their layer ranges.
STANDARD_PALETTE = ("green", "yellow", "red")


def layer_buckets(num_layers: int, count: int = LEGEND_BUCKETS) -> list[tuple[int, int]]:
    """Layer ranges (first, last), 1..num_layers, split into at most `count` near-equal buckets."""
    count = max(1, min(count, num_layers))
    edges = [round(i * num_layers / count) for i in range(count + 1)]
    return [(edges[i] + 1, edges[i + 1]) for i in range(count)]


def palette(color_system: str | None) -> tuple[str, ...]:
    """The bucket colours, early to late, for a console's colour system (None: no colour at all)."""
    if color_system is None:
        return ()
    if color_system in ("standard", "windows"):
        return STANDARD_PALETTE
    return tuple(_ramp(i / (LEGEND_BUCKETS - 1)) for i in range(LEGEND_BUCKETS))


def layer_colour(layer: int, num_layers: int, colours: tuple[str, ...] | None = None) -> str:
    """The colour of the bucket holding `layer` (default: the full ramp, '#rrggbb')."""
    colours = colours or palette("truecolor")
    buckets = layer_buckets(num_layers, len(colours))
    index = next((i for i, (_, hi) in enumerate(buckets) if layer <= hi), len(buckets) - 1)
    return colours[round(index * (len(colours) - 1) / (len(buckets) - 1))] if len(buckets) > 1 else colours[-1]


def token_pieces(
    tokenizer: PreTrainedTokenizerBase, token_ids: tuple[int, ...], exit_layers: tuple[int, ...]
) -> list[tuple[str, int]]:
    """(text, exit layer) per generated token; the texts join to the decoded summary (up to trailing
    whitespace). Special tokens (EOS) show as nothing; a token that ends inside a multi-byte character
    joins the next one."""
    pieces: list[tuple[str, int]] = []
    shown = ""
    for i, layer in enumerate(exit_layers):
        text = decode_text(tokenizer, token_ids[: i + 1])
        if text.endswith("\ufffd") and i + 1 < len(exit_layers):
            continue
        piece = text[_common_prefix(shown, text) :]
        piece = piece if pieces else piece.lstrip()
        if piece:
            pieces.append((piece, layer))
        shown = text
    return pieces


def render_exits(
    doc: DocumentSummary,
    tokenizer: PreTrainedTokenizerBase,
    title: str | None = None,
    colours: tuple[str, ...] | None = None,
) -> Group:
    """The summary coloured by exit layer, a legend of layer ranges and the average depth (rich)."""
    colours = colours or palette("truecolor")
    text = Text()
    for piece, layer in token_pieces(tokenizer, doc.token_ids, doc.exit_layers):
        text.append(piece, style=f"#000000 on {layer_colour(layer, doc.num_layers, colours)}")
    legend = Text("exit layer: ", style="dim")
    for lo, hi in layer_buckets(doc.num_layers, len(colours)):
        legend.append("  ", style=f"on {layer_colour(hi, doc.num_layers, colours)}")
        legend.append(f" {lo}–{hi}  " if lo != hi else f" {lo}  ", style="dim")
    parts = [Text(title, style="bold")] if title else []
    return Group(*parts, text, legend, Text(_depth_line(doc), style="dim"))


def plain_exits(doc: DocumentSummary, tokenizer: PreTrainedTokenizerBase, title: str | None = None) -> str:
    """The same in plain text: the summary, each token annotated `token[layer]`, the average depth."""
    annotated = "".join(f"{piece}[{layer}]" for piece, layer in token_pieces(tokenizer, doc.token_ids, doc.exit_layers))
    lines = ([title] if title else []) + [doc.summary, f"exits: {annotated}", _depth_line(doc)]
    return "\n".join(lines)


def _depth_line(doc: DocumentSummary) -> str:
    return f"avg layers: {doc.avg_layers:.2f} of {doc.num_layers} ({len(doc.exit_layers)} tokens)"


def _ramp(t: float) -> str:
    t = min(max(t, 0.0), 1.0) * (len(RAMP) - 1)
    i = min(int(t), len(RAMP) - 2)
    f = t - i
    rgb = (round(a + (b - a) * f) for a, b in zip(RAMP[i], RAMP[i + 1]))
    return "#" + "".join(f"{c:02x}" for c in rgb)


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class SummaryPrinter:
    """Prints summaries to stdout as they arrive: one JSON object per line (as_json), the summary coloured
    by exit layer on a colour terminal or annotated in plain text (show_exits), or just the text. With
    `titled`, each summary is headed by its document id. On a terminal everything goes through `console`
    (rich), so that a progress bar drawn on the same console stays below it."""

    def __init__(
        self,
        tokenizer,
        show_exits: bool = False,
        as_json: bool = False,
        titled: bool = False,
        console: Console | None = None,
    ):
        self.tokenizer, self.show_exits, self.as_json, self.titled = tokenizer, show_exits, as_json, titled
        self.console = console or Console(highlight=False, markup=False, emoji=False, soft_wrap=True)

    def print(self, doc: DocumentSummary) -> None:
        title = f"[{doc.id}]" if self.titled else None
        colours = palette(self.console.color_system) if self.console.is_terminal else ()
        if self.as_json:
            self._emit(json.dumps(doc.to_dict(), ensure_ascii=False))
        elif self.show_exits and colours:
            self.console.print(render_exits(doc, self.tokenizer, title, colours))
        elif self.show_exits:
            self._emit(plain_exits(doc, self.tokenizer, title))
        else:
            self._emit(f"{title} {doc.summary}" if title else doc.summary)

    def _emit(self, text: str) -> None:
        if self.console.is_terminal:
            self.console.print(Text(text), soft_wrap=True)
        else:
            print(text, flush=True)


def schedule_text(policy: ExitPolicy, max_new_tokens: int) -> str:
    """The threshold schedule in words: fixed, or how far λ decays over the new tokens."""
    if policy.decay_tau == 0:
        return "λ fixed (τ=0)"
    last = policy.threshold_at(max_new_tokens - 1, max_new_tokens)
    return f"λ decays to {last:.3g} by token {max_new_tokens} (τ={policy.decay_tau:g})"


def policy_text(policy: ExitPolicy, max_new_tokens: int) -> str:
    """e.g. 'classifier λ=0.97, λ fixed (τ=0)' or 'full model'."""
    if policy.never_exits:
        return "full model"
    if policy.measure == "fixed":
        return f"every token exits at layer {min(policy.exit_layers or (policy.min_exit_layer or 1,))}"
    floor = f" from layer {policy.min_exit_layer}" if policy.min_exit_layer is not None else ""
    return f"{policy.measure} λ={policy.threshold:g}{floor}, {schedule_text(policy, max_new_tokens)}"


def run_footer(
    docs: list[DocumentSummary],
    policy: ExitPolicy | None,
    source: str,
    max_new_tokens: int,
    noun: str = "document",
    reference: tuple[float, str] | None = None,
) -> str:
    """One line about a run: documents, average depth, decode throughput (the tokens after each summary's
    first, where early exit saves layers) and prefill time apart, the policy with its threshold schedule,
    and where the policy came from (an option, or the default). policy None: a lossless run, which
    `source` describes whole (its policy is only the draft controller). reference: the full model's decode
    tokens/s stored with the checkpoint and where it was measured, which the decode rate is set against."""
    tokens = sum(len(d.exit_layers) for d in docs)
    layers = sum(sum(d.exit_layers) for d in docs) / tokens if tokens else float("nan")
    compile_tokens = sum(d.batch_timings.compile_tokens / d.batch_size for d in docs)  # static+compile
    decode_tokens = sum(max(len(d.exit_layers) - 1, 0) for d in docs) - compile_tokens
    decode_s = sum(d.batch_timings.decode_s / d.batch_size for d in docs)  # each batch's time, once
    prefill_s = sum(d.batch_timings.prefill_s / d.batch_size for d in docs)
    compile_s = sum(d.batch_timings.compile_s / d.batch_size for d in docs)
    rate = f", decode {decode_tokens / decode_s:.1f} tokens/s ({decode_s:.2f} s)" if decode_s > 0 else ""
    if rate and reference is not None:
        ratio = decode_tokens / decode_s / reference[0]
        rate += f" ({ratio:.2f}× the full model's {reference[0]:.1f} at batch 1, stored: measured on {reference[1]})"
    rate += f" (compiling apart: {compile_s:.1f} s)" if compile_s > 0 else ""
    return (
        f"{len(docs)} {noun}{'s' if len(docs) != 1 else ''}, avg layers {layers:.2f} of "
        f"{docs[0].num_layers if docs else '?'}{rate}, prefill {prefill_s:.2f} s; "
        + (f"policy: {policy_text(policy, max_new_tokens)}; {source}" if policy is not None else source)
        + _drafts_note(docs)
        + _cut_note(docs, max_new_tokens)
    )


def _drafts_note(docs: list[DocumentSummary]) -> str:
    """'; this run: 1.62 tokens per step, acceptance 0.26, drafting off in 3 of 40 steps' over every batch that
    ran speculative decoding, or nothing."""
    batches = list({id(d.speculative): d.speculative for d in docs if d.speculative is not None}.values())
    steps = sum(s.row_cycles for s in batches)
    if not steps:
        return ""
    drafted, accepted = sum(s.drafted for s in batches), sum(s.accepted for s in batches)
    acceptance = f"acceptance {accepted / drafted:.2f}" if drafted else "nothing drafted"
    off = sum(s.drafting_off for s in batches)
    return f"; this run: {1 + accepted / steps:.2f} tokens per step, {acceptance}" + (
        f", drafting off in {off} of {steps} steps (goodput)" if off else ""
    )


def _cut_note(docs: list[DocumentSummary], max_new_tokens: int) -> str:
    """'; 2 of 3 outputs stopped at --max-new-tokens 64 (finish_reason "length", ...)' or nothing."""
    cut = [d for d in docs if d.finish_reason == "length"]
    if not cut:
        return ""
    whole = sum(bool(SENTENCE_END.search(d.summary)) for d in cut)
    after = f"; {whole} of them after a complete sentence: the model went on past it" if whole else ""
    return (
        f"; {len(cut)} of {len(docs)} output{'s' if len(docs) != 1 else ''} stopped at --max-new-tokens "
        f'{max_new_tokens} (finish_reason "length", likely mid-sentence{after})'
    )


SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s")  # an end mark, closing quotes or brackets, then a space


def measure_cost_note(docs: list[DocumentSummary], policy: ExitPolicy | None, model: CalmModel) -> str:
    """A footer warning, once, where the softmax measure's checks cost more layers of work than its exits saved
    (each check runs the whole LM head); nothing otherwise."""
    if policy is None or policy.measure != "softmax" or policy.never_exits or not docs:
        return ""
    allowed = sorted(ExitPlan.resolve(policy, model.network).allowed)
    cost = softmax_check_layers(model.model, model.adapter.head_module, model.num_layers)
    checks, spent, saved = check_overhead([list(d.exit_layers) for d in docs], allowed, model.num_layers, cost)
    if spent <= saved:
        return ""
    return (
        f"; warning: the softmax measure cost more than it saved: {checks:.1f} checks per token, each the whole "
        f"LM head (≈{cost:.1f} layers of work), against {saved:.1f} layers saved; --measure state is cheap, "
        "--measure classifier needs trained heads"
    )

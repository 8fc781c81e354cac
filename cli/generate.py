"""`calm summarize` and `calm generate`: documents or prompts in, text out, with the exit layer of every
token. Arguments are checked here before the model is loaded; the work is done by calm.prompts.templates and
calm.eval, imported inside the commands (they need torch)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import click

from calm.cli.common import load_model
from calm.cli.knobs import Knobs, sampling_config
from calm.cli.mode_options import engine_option, generation_mode_options
from calm.cli.options import doc_tokens_option, knob_options, model_options, output_options, sampling_options
from calm.prompts.templates import PLACEHOLDER, SUMMARY_TEMPLATE, PromptTemplate

if TYPE_CHECKING:
    from calm.engine.options import EngineOptions
    from calm.engine.sampling import SamplingConfig
    from calm.eval.bulk_output import BulkJob
    from calm.exits.policy import ExitPolicy
    from calm.prompts.documents import Record
    from calm.prompts.templates import Prompt
    from calm.speculative.options import SpeculativeOptions


@dataclass(frozen=True)
class Run:
    """The options summarize and generate share, as given on the command line."""

    model_name: str
    device: str
    dtype: str | None
    weights: str | None
    knobs: Knobs
    sampling: SamplingConfig
    max_new_tokens: int
    batch_size: int
    show_exits: bool
    as_json: bool
    output: str | None
    resume: bool  # --resume: rows an interrupted run left in --output's partial file are kept, not run again
    engine: EngineOptions  # --engine
    speculative: (
        SpeculativeOptions  # --mode, --draft-layer, --max-draft, --lookup and --twin as given (None: not given)
    )
    lossless: bool  # --lossless

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> Run:
        names = ("threshold", "measure", "min_exit_layer", "speed", "tolerance", "decay_tau", "consistency")
        knobs = Knobs(*(options.pop(k) for k in names))
        knobs.check()
        sampling = sampling_config(*(options.pop(k) for k in ("do_sample", "temperature", "top_p", "top_k", "seed")))
        from calm.engine.options import EngineOptions
        from calm.speculative.options import SpeculativeOptions

        engine = EngineOptions.from_spec(options.pop("engine"))
        speculative = SpeculativeOptions(*(options.pop(k) for k in ("mode", "draft_layer", "max_draft", "lookup")))
        speculative = replace(speculative, twin=options.pop("twin"))
        return cls(knobs=knobs, sampling=sampling, engine=engine, speculative=speculative, **options)

    @property
    def mode(self) -> str:
        """calm.speculative.lossless.pick_mode: the mode named (--lossless names lossless), else lossless unless an exit
        option or an engine was given."""
        from calm.errors import InputError
        from calm.speculative.lossless import LOSSLESS, pick_mode

        named = self.speculative.mode
        if self.lossless:
            if named == "calm":
                raise InputError("--lossless runs the full model's output and --mode calm exits early: give one")
            named = named or LOSSLESS
        return pick_mode(named, self.knobs.asks_for_exits or self.engine.chosen)


# summarize's default budget: the smallest that holds the first sentence of 95% of the embedded model's
# summaries of XSum calib documents (61 tokens; 64 holds 38 of 40), benchmarks/results/summary_length_smollm2.md
SUMMARY_TOKENS = 64
SUMMARY_TOKENS_HELP = (
    "Longest output, in tokens. The default holds the first sentence of 95% of the embedded model's "
    "one-sentence summaries of XSum documents (benchmarks/results/summary_length_smollm2.md); the model often "
    "goes on past that sentence, and such outputs stop here (the footer counts them)."
)


def _shared_options(f: Any, max_new_tokens_help: str = "Longest output, in tokens.") -> Any:
    f = output_options(f)
    batch = "Rows decoded together: one continuous batch's slots (the fastest measured); 1: one input at a time."
    f = click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help=batch)(f)
    f = click.option(
        "--max-new-tokens",
        type=click.IntRange(min=1),
        default=SUMMARY_TOKENS,
        show_default=True,
        help=max_new_tokens_help,
    )(f)
    return engine_option(generation_mode_options(model_options(knob_options(sampling_options(f)))))


def _summary_options(f: Any) -> Any:
    return _shared_options(f, SUMMARY_TOKENS_HELP)


def _template(ctx: click.Context, param: click.Parameter, value: str | None) -> PromptTemplate:
    from calm.errors import InputError

    try:
        return PromptTemplate(SUMMARY_TEMPLATE if value is None else value)
    except InputError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command(
    epilog="""\b
Examples:
  calm summarize article.txt                     # exact: the full model's output, lossless speed-up
  calm summarize --text "The council approved a plan ..." --threshold 0.9 --show-exits
  calm summarize xsum.jsonl --limit 20 --json --output summaries.jsonl
  calm summarize xsum.jsonl --prompt $'Summarize in three bullet points:\\n\\n{document}'
  calm summarize article.txt --do-sample --temperature 0.7 --seed 1
  cat article.txt | calm summarize - --speed 0.7
"""
)
@click.argument("file", required=False, metavar="[FILE | -]")
@click.option("--text", default=None, help="Summarise this text instead of a file.")
@click.option("--field-document", default="document", show_default=True, help="JSONL field holding the document text.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N documents.")
@click.option(
    "--prompt",
    "template",
    callback=_template,
    default=None,
    metavar="TEMPLATE",
    help=f"Instruction around each document, with {PLACEHOLDER} where the document goes "
    "(default: a one-sentence summary).",
)
@doc_tokens_option
@click.option(
    "--no-truncate",
    is_flag=True,
    help="Refuse a document that does not fit the context instead of keeping its first tokens "
    "(by default a cut is reported on stderr and in the JSON field 'truncated').",
)
@_summary_options
def summarize(
    file: str | None,
    text: str | None,
    field_document: str,
    limit: int | None,
    template: PromptTemplate,
    max_doc_tokens: int | None,
    no_truncate: bool,
    **options: Any,
) -> None:
    """Summarise documents: exactly the full model's output by default, early exit with a knob.

    FILE is a JSONL file (one {"id": ..., "document": ...} per line) or a plain text file (one
    document); - reads either from stdin. Without --speed, --tolerance or --threshold the run is
    lossless: the full model's output, through speculative decoding where this checkpoint measured it
    faster (see --mode). The knob opts into approximate early exits.
    """
    from calm.errors import InputError
    from calm.eval.inputs import load_documents
    from calm.eval.summarize import document_prompts

    if no_truncate and max_doc_tokens is not None:
        raise InputError("--no-truncate refuses cut documents and --max-doc-tokens asks for cuts: give one of them")
    run = Run.from_options(options)
    records = load_documents(file, text, document_field=field_document, limit=limit)
    model = load_model(run.model_name, run.device, run.dtype, run.weights)
    try:
        prompts = document_prompts(model, records, run.max_new_tokens, template, max_doc_tokens, not no_truncate)
    except InputError as exc:
        raise InputError(
            f"{exc}, or drop --no-truncate to keep its first tokens" if no_truncate else str(exc)
        ) from None
    _generate(model, run, records, prompts, noun="document")


@click.command(
    epilog="""\b
Examples:
  calm generate "Write a haiku about autumn."        # exact, lossless speed-up
  calm generate "Explain early exit in one paragraph." --threshold 0.9 --show-exits
  calm generate "Tell me a story." --do-sample --temperature 0.8 --top-p 0.95 --seed 0
  echo "What is the capital of France?" | calm generate - --json
"""
)
@click.argument("prompts", nargs=-1, required=True, metavar="PROMPT... | -")
@click.option(
    "--chat/--no-chat",
    default=None,
    help="Wrap each prompt in the model's chat template [default: when the tokenizer has one].",
)
@_shared_options
def generate(prompts: tuple[str, ...], chat: bool | None, **options: Any) -> None:
    """Generate text from prompts: exactly the full model's output by default, early exit with a knob.

    Each PROMPT is used as it is (in the chat template of instruct models); - reads one prompt from
    stdin. Several prompts are generated as a batch. A prompt too long for the context is an error.
    """
    from calm.prompts.documents import Record
    from calm.prompts.templates import PromptFormat, fit_prompts

    run = Run.from_options(options)
    records = [Record(id=str(i + 1), document=_prompt_text(p)) for i, p in enumerate(prompts)]
    model = load_model(run.model_name, run.device, run.dtype, run.weights)
    fmt = PromptFormat.for_model(model, run.max_new_tokens, chat=chat)
    named = [(f"prompt {r.id}" if len(records) > 1 else "the prompt", r.document) for r in records]
    fitted = fit_prompts(fmt, named, PromptTemplate(PLACEHOLDER), truncate=False)
    _generate(model, run, records, fitted, noun="prompt", chat=chat)


def _prompt_text(prompt: str) -> str:
    from calm.errors import InputError

    text = sys.stdin.read() if prompt == "-" else prompt
    if not text.strip():
        raise InputError("empty prompt: give some text to generate from" + (" on stdin" if prompt == "-" else ""))
    return text


def _generate(
    model: Any, run: Run, records: Sequence[Record], prompts: Sequence[Prompt], noun: str, chat: bool | None = None
) -> None:
    """Generate, print each output as it is done (and write it to --output), then the footer. Rows an interrupted
    run wrote to --output are not run again; under accelerate launch each process runs its share."""
    from calm.eval.bulk_output import BulkJob
    from calm.eval.progress import output_console

    job = BulkJob(run.output, [r.id for r in records], run.resume)
    todo = job.todo(len(records))
    if job.resumed:
        click.echo(f"resuming: {job.resumed} rows are already in {job.out.partial if job.out else ''}", err=True)
    resolved = _decoding(model, run, len(todo))  # once: resolving a knob may warn
    try:
        mine = [records[i] for i in todo], [prompts[i] for i in todo]
        docs = _run_rows(model, run, *mine, noun, chat, output_console(), job, resolved)
    except BaseException:
        partial = job.abandon()
        if partial is not None:
            click.echo(f"stopped: {partial}; run the same command to resume", err=True)
        raise
    _footer(model, run, docs, noun, len(todo), resolved)
    written = job.finish()
    if written is not None:
        click.echo(f"wrote {written} row{'' if written == 1 else 's'} to {run.output}", err=True)


def _run_rows(
    model: Any,
    run: Run,
    records: list,
    prompts: list,
    noun: str,
    chat: bool | None,
    console: Any,
    job: BulkJob,
    resolved: tuple[Decoding, str | None],
) -> list:
    from calm.eval.progress import progress_bar, rows_done_note
    from calm.eval.render import SummaryPrinter
    from calm.eval.summarize import summarize_documents

    decoding, continuous = resolved
    if decoding.calibrated:  # one line where the run leaves what the calibration certified
        from calm.calibration.knob import warn_outside_calibration

        documents = [p.kept_tokens for p in prompts] if noun == "document" else []
        warn_outside_calibration(model.calibration, run.max_new_tokens, documents)
    printer = SummaryPrinter(
        model.tokenizer, show_exits=run.show_exits, as_json=run.as_json, titled=len(records) > 1, console=console
    )
    docs: list = []
    note = rows_done_note(noun)
    with progress_bar(f"{noun}s", len(records), output=console) as update:
        for batch in summarize_documents(
            model,
            records,
            decoding.policy,
            run.max_new_tokens,
            run.batch_size,
            prompts,
            run.sampling,
            chat=chat,
            engine=run.engine,
            speculative=decoding.speculative,
            text_field="summary" if noun == "document" else "text",
            lossless=continuous is not None and decoding.lossless,
        ):
            for doc in batch:
                printer.print(doc)
                job.write(doc.to_dict())
            docs += batch
            update(len(docs), len(records), note(docs))
    return docs


def _decoding(model: Any, run: Run, records: int) -> tuple[Decoding, str | None]:
    rows = max(1, min(run.batch_size, records))
    decoding = _resolve(model, run, rows)
    return decoding, _continuous(model, run, decoding, records)


def _footer(model: Any, run: Run, docs: list, noun: str, records: int, resolved: tuple[Decoding, str | None]) -> None:
    from calm.eval.render import measure_cost_note, run_footer
    from calm.speculative.lossless import stored_full_rate

    decoding, continuous = resolved
    rows = max(1, min(run.batch_size, records))
    reference = stored_full_rate(model.extra, rows) if decoding.lossless and continuous is None else None
    footer_policy = None if decoding.lossless else decoding.policy
    footer = run_footer(docs, footer_policy, continuous or decoding.source, run.max_new_tokens, noun, reference)
    click.echo(footer + measure_cost_note(docs, footer_policy, model), err=True)


def _continuous(model: Any, run: Run, decoding: Decoding, records: int) -> str | None:
    """What a continuous batch runs for this job (calm.continuous.runs_continuous), or None where batches run
    one after another."""
    from calm.continuous import continuous_description, runs_continuous
    from calm.engine.generation import GenerationConfig
    from calm.speculative.lossless import LOSSLESS

    config = GenerationConfig(run.max_new_tokens, sampling=run.sampling, engine=run.engine.kind)
    explicit = None if decoding.lossless and _stored_setting(run) else decoding.speculative
    mode = LOSSLESS if decoding.lossless and _stored_setting(run) else "speculative" if decoding.lossless else "calm"
    if not runs_continuous(model.network, min(run.batch_size, records), config, mode, explicit):
        return None
    twin = run.speculative.twin
    return continuous_description(model, mode == LOSSLESS, min(run.batch_size, records), decoding.policy, twin)


def _stored_setting(run: Run) -> bool:
    """A lossless run with the checkpoint's stored setting: no mode, draft layer, length or lookup named (--twin and
    --no-twin keep it: they choose its fallback drafts)."""
    m = run.speculative
    return m.mode in (None, "lossless") and (m.draft_layer, m.max_draft) == (None, None) and not m.lookup


@dataclass(frozen=True)
class Decoding:
    """What a run decodes with: whether it is lossless, the policy (lossless: the draft controller), where
    that came from (for the footer), and generate()'s speculative options."""

    lossless: bool
    policy: ExitPolicy
    source: str
    speculative: SpeculativeOptions | None = None
    calibrated: bool = False  # the threshold comes from the calibration table: its conditions apply


def _resolve(model: Any, run: Run, rows: int) -> Decoding:
    """How the run decodes: calm's knob, or the lossless run of calm.speculative.lossless where the mode is
    lossless or speculative (--measure and --threshold then set the draft controller)."""
    from calm.calibration.knob import FULL_MODEL_ENGINE
    from calm.checkpoints.native import format_note, native_lossless
    from calm.errors import InputError
    from calm.speculative.lossless import LOSSLESS, resolve_mode
    from calm.speculative.options import SpeculativeOptions

    knobs, m = run.knobs, run.speculative
    lossless_run = resolve_mode(
        model,
        run.mode,
        run.lossless,
        m.draft_layer,
        m.max_draft,
        knobs.measure,
        knobs.threshold,
        m.lookup,
        rows,
        twin=m.twin,
    )
    weights = model.weights.weights  # a stored measurement taken on float32 weights says so on others
    if lossless_run is None:  # calm's early exit: the knobs, else calm_mode_policy's rule (as generate())
        resolved = knobs.resolve(model, mode_named=m.mode is not None)
        if resolved.description == FULL_MODEL_ENGINE:  # only --engine: that engine, exact
            return Decoding(False, resolved.policy, f"full model (exact) on the {run.engine.spec} engine")
        if not resolved.lossless:
            knob = knobs.speed is not None or knobs.tolerance is not None
            note = format_note(weights, knob=knob, stored_setting=False)
            return Decoding(False, resolved.policy, resolved.description + note, calibrated=resolved.calibrated)
        lossless_run = resolve_mode(model, LOSSLESS, batch_size=rows, twin=m.twin)  # no certified threshold pays
    elif knobs.speed is not None or knobs.tolerance is not None:
        raise InputError(
            "--speed and --tolerance set calm's early-exit threshold; lossless decoding never exits "
            "early (use --threshold for its draft controller)"
        )
    lossless_run = native_lossless(weights, run.mode, lossless_run)
    if lossless_run is None:
        raise AssertionError("mode lossless always resolves to a run")
    speculative = SpeculativeOptions.running(lossless_run.spec)
    stored = lossless_run.spec is not None and "measured" in lossless_run.description
    source = lossless_run.description + format_note(weights, knob=False, stored_setting=stored)
    return Decoding(True, lossless_run.policy, source, speculative)

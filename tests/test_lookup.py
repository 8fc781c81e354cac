"""Drafts from the context (calm.speculative.lookup, speculative decoding at draft layer E = 0): the n-gram lookup,
and the full model's output token for token (greedy) and in distribution (sampling)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from calm import CalmModel
from calm.adapters import adapter_for
from calm.engine.decode import Network
from calm.engine.generation import GenerationConfig, PromptBatch, generate_tokens
from calm.engine.sampling import SamplingConfig
from calm.errors import InputError, PolicyError
from calm.exits.policy import ExitPolicy
from calm.prompts.documents import read_jsonl, summary_prompt, truncate_document
from calm.speculative import drafting as speculative
from calm.speculative.drafting import SpeculativeConfig, default_draft_layer
from calm.speculative.lookup import LOOKUP_MAX_NGRAM, LOOKUP_MIN_NGRAM, BatchLookup, NgramIndex
from calm.speculative.loop import generate_speculative
from calm.speculative.verification import draft_positions
from test_adapters import KINDS, build, gen_config, hf_greedy, prompts, row
from test_speculative import ALWAYS, PROMPT, SAMPLES, chi_square_pvalue, exact_distribution

pytestmark = pytest.mark.usefixtures("one_thread")


def scan_draft(
    context: list[int], max_draft: int, max_ngram: int = LOOKUP_MAX_NGRAM, min_ngram: int = LOOKUP_MIN_NGRAM
) -> list[int]:
    """The rule NgramIndex.draft follows, by scanning the whole context back to front."""
    for n in range(min(max_ngram, len(context) - 1), min_ngram - 1, -1):
        suffix = context[-n:]
        for start in range(len(context) - n - 1, -1, -1):
            if context[start : start + n] == suffix:
                return context[start + n : start + n + max_draft]
    return []


def lookup_draft(
    context: list[int], max_draft: int, max_ngram: int = LOOKUP_MAX_NGRAM, min_ngram: int = LOOKUP_MIN_NGRAM
) -> list[int]:
    return NgramIndex(context, max_ngram, min_ngram).draft(max_draft)


def test_lookup_takes_what_followed_the_latest_longest_match():
    #          0  1  2  3  4  5  6  7  8  9
    context = [7, 1, 2, 3, 9, 1, 2, 4, 5, 1, 2]
    assert lookup_draft(context, 2) == [4, 5]  # "1 2" last occurred at 5..6, followed by 4 5
    assert lookup_draft(context + [3], 3) == [9, 1, 2]  # the 3-gram "1 2 3" at 1..3, followed by 9 1 2
    assert lookup_draft([5, 6, 7, 5, 6], 4) == [7, 5, 6]  # stops at the context's end
    assert lookup_draft([1, 2, 3, 4], 2) == []  # no suffix occurs earlier
    assert lookup_draft([1, 2, 1, 3], 2) == []  # "3" never occurred before
    assert lookup_draft([3, 8, 1, 3], 2) == [8, 1]  # a 1-token match
    assert lookup_draft([3, 8, 1, 3], 2, min_ngram=2) == []  # ... none when n >= 2 is asked
    assert lookup_draft([3, 8, 1, 2, 3, 8], 3) == [1, 2, 3]  # a 2-token match drafts up to max_draft
    assert lookup_draft([4, 4, 4], 2) == [4]  # overlapping: "4 4" at 0..1 is followed by one 4
    assert lookup_draft([], 2) == [] and lookup_draft([1], 2) == []


def test_draft_length_adapts_to_each_rows_last_verification():
    fixed = BatchLookup([[1, 2, 3, 1, 2]], max_draft=3)
    fixed.verified([3], [0])
    assert fixed.lengths == [3]  # not adaptive: always max_draft
    lookup = BatchLookup([[1, 2, 3, 4, 5, 6, 1, 2], [7, 8, 9, 7, 8]], max_draft=3, adaptive=True)
    outputs: list[list[int]] = [[], []]
    assert lookup.drafts(outputs, [5, 5]) == [[3, 4, 5], [9, 7, 8]]
    lookup.verified([3, 3], [1, 3])  # row 0 lost a draft: shorter; row 1 kept all: stays at the cap
    assert lookup.lengths == [2, 3]
    assert lookup.drafts(outputs, [5, 1]) == [[3, 4], [9]]  # the caller's limit still holds
    lookup.verified([2, 0], [0, 0])  # a row that drafted nothing keeps its length
    lookup.verified([1, 0], [0, 0])
    assert lookup.lengths == [1, 3]
    lookup.verified([1, 0], [1, 0])
    assert lookup.lengths == [2, 3]


def test_a_longer_match_wins_over_a_more_recent_shorter_one():
    context = [1, 2, 3, 8, 0, 2, 3, 9, 1, 2, 3]
    assert lookup_draft(context, 1) == [8]  # "1 2 3" at 0..2, though "2 3" last occurred at 5..6


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_from_the_context_is_the_full_models_output(kind, batch):
    model = build(kind)
    net = Network.build(adapter_for(model))
    p = prompts() if batch == 4 else row(prompts(seed=2), 0)
    full = generate_tokens(net, p, ExitPolicy.never(), gen_config(24))
    assert full.token_ids == hf_greedy(model, p, 24)
    for k, adaptive in ((1, False), (2, False), (4, False), (3, True)):
        spec = SpeculativeConfig(0, k, adaptive=adaptive)
        out = generate_speculative(net, p, ExitPolicy.never(), gen_config(24), spec)
        assert out.token_ids == full.token_ids, f"k={k} adaptive={adaptive}"


def _draft_with(monkeypatch, lookup) -> None:
    """Every row's context drafts come from lookup(context tokens, max_draft) instead of the n-gram index."""

    def candidates(index: NgramIndex, max_draft: int, count: int) -> list[list[int]]:
        found = lookup(index.tokens, max_draft)
        return [found] if found else []

    monkeypatch.setattr(NgramIndex, "candidates", candidates)


def _oracle_lookup(p: PromptBatch, reference: tuple[tuple[int, ...], ...], wrong: bool):
    """A lookup that knows each row's full-depth continuation (found by its prompt): it drafts exactly
    those tokens, or each of them plus one (always rejected)."""
    rows = {tuple(ids[m].tolist()): b for b, (ids, m) in enumerate(zip(p.ids, p.mask))}

    def lookup(context: list[int], max_draft: int) -> list[int]:
        for prompt, b in rows.items():
            if tuple(context[: len(prompt)]) == prompt:
                done = len(context) - len(prompt)
                return [t + wrong for t in reference[b][done : done + max_draft]]
        raise AssertionError("a context that starts with no prompt")

    return lookup


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 3])
def test_right_context_drafts_are_kept_whole_and_wrong_ones_all_rejected(kind, k, monkeypatch):
    model = build(kind)
    net = Network.build(adapter_for(model))
    p, max_new = prompts(), 13
    config = GenerationConfig(max_new_tokens=max_new, pad_token_id=0)
    full = generate_tokens(net, p, ExitPolicy.never(), config)
    _draft_with(monkeypatch, _oracle_lookup(p, full.token_ids, wrong=False))
    right = generate_speculative(net, p, ExitPolicy.never(), config, SpeculativeConfig(0, k))
    assert right.token_ids == full.token_ids and right.speculative.acceptance_rate == 1.0
    assert right.speculative.cycles == -(-(max_new - 1) // (k + 1))  # k drafts + the bonus token per cycle
    _draft_with(monkeypatch, _oracle_lookup(p, full.token_ids, wrong=True))
    wrong = generate_speculative(net, p, ExitPolicy.never(), config, SpeculativeConfig(0, k))
    assert wrong.token_ids == full.token_ids and wrong.speculative.accepted == 0 < wrong.speculative.drafted
    assert wrong.speculative.cycles == max_new - 1


@pytest.mark.parametrize("kind", KINDS)
def test_rows_that_draft_nothing_beside_rows_that_draft(kind, monkeypatch):
    """Rows 0 and 2 draft their right continuation, rows 1 and 3 never find one: every row is still the
    full model's, and rows that drafted nothing moved one token per cycle."""
    model = build(kind)
    net = Network.build(adapter_for(model))
    p, config = prompts(), GenerationConfig(max_new_tokens=13, pad_token_id=0)
    full = generate_tokens(net, p, ExitPolicy.never(), config)
    oracle = _oracle_lookup(p, full.token_ids, wrong=False)
    silent = {tuple(p.ids[b][p.mask[b]].tolist()) for b in (1, 3)}

    def some_rows(context: list[int], max_draft: int) -> list[int]:
        return [] if any(tuple(context[: len(q)]) == q for q in silent) else oracle(context, max_draft)

    _draft_with(monkeypatch, some_rows)
    out = generate_speculative(net, p, ExitPolicy.never(), config, SpeculativeConfig(0, 3))
    assert out.token_ids == full.token_ids
    stats = out.speculative
    assert stats.accepted == stats.drafted > 0 and stats.cycles == 12  # the silent rows set the pace


def _partly_right_lookup(p: PromptBatch, reference: tuple[tuple[int, ...], ...]):
    """Drafts that are right for a number of tokens that differs by row and step, then wrong."""
    oracle = _oracle_lookup(p, reference, wrong=False)

    def lookup(context: list[int], max_draft: int) -> list[int]:
        right = oracle(context, max_draft)
        keep = len(context) % (max_draft + 1)
        return right[:keep] + [t + 1 for t in right[keep:]]

    return lookup


def _every_nth_cycle_finds_nothing(monkeypatch, n: int = 3) -> None:
    """So that hybrid runs alternate between the two draft sources."""
    real, calls = speculative.lookup_guesses, [0]

    def guesses(*args):
        calls[0] += 1
        found = real(*args)
        return [[] for _ in found] if calls[0] % n == 0 else found

    monkeypatch.setattr("calm.speculative.loop.lookup_guesses", guesses)


@pytest.mark.parametrize("kind", KINDS)
def test_hybrid_drafts_from_context_or_exit_layer_are_the_full_models_output(kind, monkeypatch):
    model = build(kind)
    net = Network.build(adapter_for(model))
    p, config = prompts(), gen_config(16)
    full = generate_tokens(net, p, ExitPolicy.never(), config)
    _draft_with(monkeypatch, _partly_right_lookup(p, full.token_ids))
    _every_nth_cycle_finds_nothing(monkeypatch)
    for e, k in ((1, 2), (2, 3)):
        out = generate_speculative(net, p, ALWAYS, config, SpeculativeConfig(e, k, lookup=True))
        assert out.token_ids == full.token_ids, f"E={e} k={k}"
        stats = out.speculative
        assert 0 < stats.context_cycles < stats.cycles, stats  # both sources ran
        assert 0 < stats.context_accepted < stats.context_drafted < stats.drafted, stats
    only_context = generate_speculative(net, p, ALWAYS, config, SpeculativeConfig(0, 3))
    assert only_context.token_ids == full.token_ids
    assert only_context.speculative.context_cycles == only_context.speculative.cycles


def test_context_drafts_keep_the_budget():
    model = build("llama")
    net = Network.build(adapter_for(model))
    p = prompts()
    for max_new in (1, 2, 5, 13):
        config = GenerationConfig(max_new_tokens=max_new, pad_token_id=0)
        out = generate_speculative(net, p, ExitPolicy.never(), config, SpeculativeConfig(0, 4))
        assert out.token_ids == generate_tokens(net, p, ExitPolicy.never(), config).token_ids
        assert all(len(r) == max_new for r in out.token_ids)


def _greedy_lookup(model: torch.nn.Module):
    """A context 'lookup' that drafts the full model's own greedy continuation: plausible tokens, kept
    or rejected by the accept/reject rule depending on the sample (memoised per context)."""
    memo: dict[tuple[int, ...], list[int]] = {}

    def lookup(context: list[int], max_draft: int) -> list[int]:
        key = (*context, max_draft)
        if key not in memo:
            with torch.no_grad():
                ids = model.generate(torch.tensor([context]), max_new_tokens=max_draft, do_sample=False)
            memo[key] = ids[0, len(context) :].tolist()
        return memo[key]

    return lookup


def test_sampling_from_context_drafts_follows_the_full_models_distribution(monkeypatch):
    """One-hot proposals (a lookup's draft is certain) through the accept/reject rule: chi-square on
    the joint of the first 4 tokens over 3000 rows against the exact distribution."""
    model, steps = build("llama"), 4
    net = Network.build(adapter_for(model))
    sampling = SamplingConfig(True, temperature=0.7, seed=6)
    truth = exact_distribution(model, sampling, steps)
    _draft_with(monkeypatch, _greedy_lookup(model))
    batch = PromptBatch(PROMPT.expand(SAMPLES, -1), torch.ones(SAMPLES, PROMPT.shape[1], dtype=torch.bool))
    config = GenerationConfig(max_new_tokens=steps, pad_token_id=0, sampling=sampling)
    out = generate_speculative(net, batch, ExitPolicy.never(), config, SpeculativeConfig(0, 3))
    assert out.speculative.drafted > SAMPLES and 0.05 < out.speculative.acceptance_rate < 0.95, out.speculative
    assert chi_square_pvalue(list(out.token_ids), truth, SAMPLES) > 1e-3


def test_hybrid_sampling_follows_the_full_models_distribution(monkeypatch):
    """Cycles alternate between one-hot context drafts and the exit layer's sampled drafts."""
    model, steps = build("llama"), 4
    net = Network.build(adapter_for(model))
    sampling = SamplingConfig(True, temperature=0.7, seed=7)
    truth = exact_distribution(model, sampling, steps)
    _draft_with(monkeypatch, _greedy_lookup(model))
    _every_nth_cycle_finds_nothing(monkeypatch, 2)
    batch = PromptBatch(PROMPT.expand(SAMPLES, -1), torch.ones(SAMPLES, PROMPT.shape[1], dtype=torch.bool))
    config = GenerationConfig(max_new_tokens=steps, pad_token_id=0, sampling=sampling)
    out = generate_speculative(net, batch, ALWAYS, config, SpeculativeConfig(2, 2, lookup=True))
    stats = out.speculative
    assert 0 < stats.context_drafted < stats.drafted and 0.05 < stats.acceptance_rate < 0.95, stats
    assert chi_square_pvalue(list(out.token_ids), truth, SAMPLES) > 1e-3


def test_draft_layer_zero_through_the_api():
    model = CalmModel.from_model(build("llama"))
    ids = prompts().ids[:1]
    full = model.generate(ids, max_new_tokens=16)
    out = model.generate(ids, max_new_tokens=16, mode="speculative", draft_layer=0, max_draft=2)
    assert out.token_ids == full.token_ids and out.speculative.draft_layer == 0
    with pytest.raises(PolicyError, match="0 for drafts looked up in the context"):
        model.generate(ids, max_new_tokens=4, mode="speculative", draft_layer=-1)
    softmax = ExitPolicy(measure="softmax", threshold=0.5)
    with pytest.raises(InputError, match="takes no draft controller"):
        model.generate(ids, max_new_tokens=4, mode="speculative", draft_layer=0, policy=softmax)
    with pytest.raises(InputError, match="need --mode speculative or lossless"):
        model.generate(ids, max_new_tokens=4, mode="calm", lookup=True)
    assert model.generate(ids, max_new_tokens=16, lookup=True).token_ids == full.token_ids  # lossless default
    hybrid = model.generate(ids, max_new_tokens=16, mode="speculative", draft_layer=1, lookup=True)
    assert hybrid.token_ids == full.token_ids
    assert default_draft_layer(1) == 1 and default_draft_layer(30) == 15


SMOKE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "xsum" / "smoke.jsonl"


@pytest.mark.slow
@pytest.mark.skipif(not SMOKE.is_file(), reason="../shared/data is not beside the repo")
def test_real_model_context_drafts_give_the_full_models_output_on_8_documents():
    """SmolLM2 with its shipped heads, 8 smoke documents in one batch: context drafts alone and before
    the exit heads' drafts, against full depth; summaries copy from their documents, so lookups draft."""
    model = CalmModel.from_pretrained("smollm2")
    docs = read_jsonl(SMOKE, limit=8)
    prompts = [summary_prompt(truncate_document(model.tokenizer, d.document, 256)) for d in docs]
    full = model.generate(prompts, max_new_tokens=32)
    for e, lookup in ((0, False), (15, True)):
        out = model.generate(prompts, max_new_tokens=32, mode="speculative", draft_layer=e, max_draft=2, lookup=lookup)
        assert out.token_ids == full.token_ids, f"E={e} lookup={lookup}"
        assert 0 < out.speculative.accepted < out.speculative.drafted


def test_the_index_drafts_what_the_scan_drafts_as_the_context_grows():
    g = torch.Generator().manual_seed(0)
    for vocab in (3, 6, 20):
        tokens = torch.randint(0, vocab, (300,), generator=g).tolist()
        index = NgramIndex(tokens[:5])
        for end in range(5, len(tokens) + 1):
            for k in (1, 2, 4):
                assert index.draft(k) == scan_draft(tokens[:end], k), (vocab, end, k)
            index.extend(tokens[end : end + 1])
        assert NgramIndex(tokens, 4, 1).draft(3) == scan_draft(tokens, 3, 4, 1)


def test_candidates_are_the_latest_continuations_that_start_differently():
    index = NgramIndex([5, 1, 3, 6, 1, 4, 7, 1])  # [7, 1] never occurred before; [1] was followed by 3, then 4
    assert index.candidates(2, 3) == [[4, 7], [3, 6]]
    assert index.candidates(2, 1) == [index.draft(2)] == [[4, 7]]
    index = NgramIndex([5, 1, 3, 6, 1, 3, 8, 1])  # 3 followed [1] twice: its latest occurrence only
    assert index.candidates(2, 2) == [[3, 8]]
    lookup = BatchLookup([[5, 1, 3, 6, 1, 4, 7], [9, 9]], max_draft=2)
    assert lookup.candidates([[1], [2]], [2, 2], 2) == [[[4, 7], [3, 6]], []]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("adaptive", [False, True])
def test_two_candidates_verified_as_a_tree_keep_the_right_one(kind, batch, adaptive, monkeypatch):
    """Each cycle every row drafts a wrong candidate and then the right one: the output is the full
    model's, and all of the right candidate's tokens are kept (a tree in one pass). Where a tree cannot
    be verified (sliding windows), only the first candidate is drafted, and all of it rejected."""
    model = build(kind)
    net = Network.build(adapter_for(model))
    p, config = prompts(batch), GenerationConfig(max_new_tokens=13, pad_token_id=0)
    full = generate_tokens(net, p, ExitPolicy.never(), config)
    right, wrong = (_oracle_lookup(p, full.token_ids, wrong=w) for w in (False, True))

    def both(index: NgramIndex, max_draft: int, count: int) -> list[list[int]]:
        return [wrong(index.tokens, max_draft), right(index.tokens, max_draft)][:count]

    monkeypatch.setattr(NgramIndex, "candidates", both)
    spec = SpeculativeConfig(0, 3, adaptive=adaptive, candidates=2)  # adaptive: a kept path keeps the length
    out = generate_speculative(net, p, ExitPolicy.never(), config, spec)
    assert out.token_ids == full.token_ids
    stats = out.speculative
    tree = speculative.tree_candidates(net, SpeculativeConfig(0, 3, candidates=2), SamplingConfig()) == 2
    assert tree == ("window" not in kind)
    assert stats.accepted == (stats.drafted // 2 if tree else 0) and stats.drafted > 0
    assert stats.cycles == (3 if tree else 12)  # 12 tokens after the first, 4 per cycle with the right candidate


def test_sampling_drafts_one_candidate():
    net = Network.build(adapter_for(build("llama")))
    spec = SpeculativeConfig(0, 3, candidates=3)
    assert speculative.tree_candidates(net, spec, SamplingConfig(do_sample=True)) == 1
    assert speculative.tree_candidates(net, spec, SamplingConfig()) == 3
    with pytest.raises(PolicyError, match="candidates"):
        SpeculativeConfig(0, 3, candidates=0).check(4)


def test_a_tree_keeps_its_masked_slots_inside_the_position_table():
    """GPT-2's learned positions end at prompt + max_new_tokens. A row near its budget verifies two short
    candidates in a cycle widened by another row's two long ones: its padding slots sit at its pending
    token's position, never past the table (they used to sit at position + the row's total drafts)."""
    state = SimpleNamespace(positions=torch.tensor([10, 4]))
    parents = torch.tensor([[0, 1, 0, 3, 4, 5, 6, 7], [0, 1, 2, 3, 0, 5, 6, 7]])  # [pending, a1 a2, b1 b2, pad..]
    counts = torch.tensor([4, 8])
    assert draft_positions(state, counts, parents).tolist() == [
        [10, 11, 12, 11, 12, 10, 10, 10, 10],
        [4, 5, 6, 7, 8, 5, 6, 7, 8],
    ]

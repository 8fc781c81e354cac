"""Continuous batching (calm.engine.scheduler): every request's output equals its solo run, with requests
joining and leaving mid-run, on every decoder family, under mixed exit depths and per-row settings."""

from __future__ import annotations

import pytest
import torch

from calm.adapters import adapter_for
from calm.engine.bulk import generate_continuous
from calm.engine.decode import Network
from calm.engine.generation import GenerationConfig, PromptBatch, generate_tokens
from calm.engine.sampling import SamplingConfig
from calm.engine.scheduler import Request, Scheduler
from calm.errors import InputError, PolicyError
from calm.exits.policy import ExitPolicy
from calm.speculative.cycle import LosslessDrafter
from calm.speculative.drafting import ALWAYS_DRAFT, SpeculativeConfig
from calm.speculative.goodput import ALPHA_PRIOR, LAYER_GAIN_PRIOR
from test_parity import EOS, PAD, VARIANTS, build

pytestmark = pytest.mark.usefixtures("one_thread")

DECODERS = list(VARIANTS)  # every family, the encoder-decoders (T5, mT5) included
LENGTHS = (5, 9, 12, 3, 7, 11)  # prompt lengths: more requests than slots, rows of every length
BUDGETS = (6, 3, 8, 5, 2, 7)  # each request's max_new_tokens: rows leave at different steps


def prompts(vocab: int = 128) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in LENGTHS]


GREEDY = SamplingConfig()


def solo(net: Network, ids: list[int], max_new: int, policy: ExitPolicy, sampling: SamplingConfig = GREEDY):
    batch = PromptBatch(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool))
    config = GenerationConfig(max_new_tokens=max_new, eos_token_ids=(EOS,), pad_token_id=PAD, sampling=sampling)
    out = generate_tokens(net, batch, policy, config)
    return out.token_ids[0], out.exit_layers[0]


def run_all(net: Network, requests: list[Request], max_batch: int) -> dict[int, tuple]:
    scheduler = Scheduler(net, max_batch=max_batch, eos_token_ids=(EOS,))
    return {f.request_id: (f.token_ids, f.exit_layers) for f in scheduler.run(requests)}


@pytest.fixture(scope="module")
def nets() -> dict[str, Network]:
    return {name: Network.build(adapter_for(build(name))) for name in DECODERS}


@pytest.mark.parametrize("name", DECODERS)
def test_rows_joining_and_leaving_equal_their_solo_runs(nets, name):
    net = nets[name]
    requests = [Request(tuple(p), n) for p, n in zip(prompts(), BUDGETS)]
    together = run_all(net, requests, max_batch=2)
    assert len(together) == len(requests)
    for i, r in enumerate(requests):
        assert together[i] == solo(net, list(r.ids), r.max_new_tokens, ExitPolicy.never()), f"request {i}"


@pytest.mark.parametrize("name", ["llama-gqa-untied-bias-rope-scaled", "gemma2-window-softcap-untied", "gpt2-tied"])
def test_rows_with_their_own_thresholds_equal_their_solo_runs(nets, name):
    """Rows at different thresholds (some never exit) share steps; each exits as it would alone."""
    net = nets[name]
    thresholds = (0.9, 2.0, 0.5, 0.97, 0.8, 2.0)
    policies = [ExitPolicy(measure="state", threshold=t) for t in thresholds]
    requests = [Request(tuple(p), 8, policy) for p, policy in zip(prompts(), policies)]
    together = run_all(net, requests, max_batch=3)
    depths = {k for tokens, exits in together.values() for k in exits[1:]}
    assert len(depths) >= 2, depths
    for i, r in enumerate(requests):
        assert together[i] == solo(net, list(r.ids), 8, r.policy), f"request {i}"


def test_rows_with_their_own_sampling_equal_their_solo_runs(nets):
    net = nets["llama-mha-tied"]
    settings = [
        SamplingConfig(),
        SamplingConfig(do_sample=True, temperature=0.7, seed=1),
        SamplingConfig(do_sample=True, top_p=0.9, seed=2),
        SamplingConfig(do_sample=True, temperature=1.3, top_k=20, seed=3),
    ]
    requests = [Request(tuple(p), 8, sampling=s) for p, s in zip(prompts(), settings)]
    together = run_all(net, requests, max_batch=3)
    for i, r in enumerate(requests):
        assert together[i] == solo(net, list(r.ids), 8, ExitPolicy.never(), r.sampling), f"request {i}"


def test_more_slots_than_requests_and_one_slot(nets):
    net = nets["llama-mha-tied"]
    requests = [Request(tuple(p), 4) for p in prompts()[:3]]
    assert run_all(net, requests, max_batch=8) == run_all(net, requests, max_batch=1)


def test_a_cancelled_request_frees_its_slot_and_the_others_are_unchanged(nets):
    net = nets["llama-mha-tied"]
    requests = [Request(tuple(p), 6) for p in prompts()[:4]]
    scheduler = Scheduler(net, max_batch=2, eos_token_ids=(EOS,))
    ids = [scheduler.add(r) for r in requests]
    scheduler.step()
    assert scheduler.cancel(ids[0]) and scheduler.live_rows == 1
    assert not scheduler.cancel(ids[0])
    done = {}
    while scheduler.busy:
        for event in scheduler.step():
            if event.finish_reason is not None:
                done[event.request_id] = scheduler.finished(event.request_id).token_ids
    assert set(done) == set(ids[1:])
    for i in ids[1:]:
        assert done[i] == solo(net, list(requests[i].ids), 6, ExitPolicy.never())[0]


def test_events_stream_each_token_once_and_say_why_a_request_ended(nets):
    net = nets["llama-mha-tied"]
    scheduler = Scheduler(net, max_batch=2, eos_token_ids=(EOS,))
    requests = [Request(tuple(p), n) for p, n in zip(prompts(), BUDGETS)]
    for r in requests:
        scheduler.add(r)
    streamed: dict[int, list[int]] = {}
    reasons = {}
    while scheduler.busy:
        for event in scheduler.step():
            streamed.setdefault(event.request_id, []).extend(event.tokens)
            if event.finish_reason:
                reasons[event.request_id] = event.finish_reason
                assert tuple(streamed[event.request_id]) == scheduler.finished(event.request_id).token_ids
    for i, r in enumerate(requests):
        ended_by_eos = streamed[i][-1] == EOS
        assert reasons[i] == ("stop" if ended_by_eos else "length")
        assert len(streamed[i]) == r.max_new_tokens or ended_by_eos
    stats = scheduler.stats
    assert stats.prefill_tokens == stats.prompt_tokens == sum(LENGTHS)
    # both slots running: one batched call over the shared columns, padding included; one row left: its own slots
    assert stats.attended_keys > stats.real_keys


def test_the_cache_moves_left_and_grows_as_requests_come_and_go(nets, monkeypatch):
    """A tiny initial cache: prompts longer than the columns written, compaction and growth, still exact."""
    monkeypatch.setattr("calm.engine.scheduler.INITIAL_COLUMNS", 4)
    net = nets["llama-mha-tied"]
    requests = [Request(tuple(p), n) for p, n in zip(prompts(), BUDGETS)] * 2
    together = run_all(net, requests, max_batch=2)
    for i, r in enumerate(requests):
        assert together[i][0] == solo(net, list(r.ids), r.max_new_tokens, ExitPolicy.never())[0]


def test_moving_the_cache_copies_the_live_slots_only(nets, monkeypatch):
    """Free slots' rows hold a marker; when the cache grows, the new cache gets none of it (only live rows are
    copied), and the live rows stay exact."""
    monkeypatch.setattr("calm.engine.scheduler.INITIAL_COLUMNS", 4)
    net = nets["llama-mha-tied"]
    scheduler = Scheduler(net, max_batch=4, eos_token_ids=(EOS,))
    requests = [Request(tuple(p), 8) for p in prompts()[1:3]]
    streamed: dict[int, list[int]] = {0: [], 1: []}
    for r in requests:
        scheduler.add(r)
    grew, free = 0, [2, 3]  # the first step admits both requests into slots 0 and 1
    while scheduler.busy:
        cache = scheduler.batch.cache
        with torch.inference_mode():  # the cache is made in inference mode
            cache.k[:, free], cache.v[:, free] = 7.0, 7.0
        for event in scheduler.step():
            streamed[event.request_id] += event.tokens
        if scheduler.batch.cache is not cache:
            grew += 1
            assert not (scheduler.batch.cache.k[:, free] == 7.0).any()
        free = [slot for slot, row in enumerate(scheduler.rows) if row is None]
    assert grew > 0
    for i, r in enumerate(requests):
        assert tuple(streamed[i]) == solo(net, list(r.ids), 8, ExitPolicy.never())[0], f"request {i}"


def test_bad_requests_are_refused(nets):
    net = nets["llama-mha-tied"]
    with pytest.raises(InputError, match="at least one prompt token"):
        Request((), 4)
    with pytest.raises(InputError, match="max_new_tokens"):
        Request((5,), 0)
    with pytest.raises(InputError, match="max_batch"):
        Scheduler(net, max_batch=0)
    scheduler = Scheduler(net, max_batch=2)
    scheduler.add(Request((5, 6), 3, ExitPolicy(measure="state", threshold=0.9)))
    with pytest.raises(PolicyError, match="share the exit measure"):
        scheduler.add(Request((5, 6), 3, ExitPolicy(measure="softmax", threshold=0.9)))


def test_encoder_memory_widens_for_a_longer_document(nets):
    """T5 rows whose encoder inputs grow: the batch's encoder memory widens, padding masked, rows exact."""
    net = nets["t5-deeper-decoder-tied"]
    requests = [Request(tuple(p), 5) for p in sorted(prompts(), key=len)]
    together = run_all(net, requests, max_batch=2)
    for i, r in enumerate(requests):
        assert together[i] == solo(net, list(r.ids), 5, ExitPolicy.never()), f"request {i}"


@pytest.mark.parametrize(
    "name",
    ["llama-gqa-untied-bias-rope-scaled", "gpt_neox-sequential-tied", "gpt2-tied", "t5-shallower-decoder-gated-untied"],
)
@pytest.mark.parametrize(
    "spec", [SpeculativeConfig(0, 3), SpeculativeConfig(1, 2, lookup=True)], ids=["context", "hybrid"]
)
def test_speculative_cycles_while_few_rows_are_live_keep_every_row_exact(nets, name, spec):
    """Drafting runs while at most 2 of 3 slots are live, the full model's step otherwise: every row is
    still its solo full-model run, with rows joining and leaving between the two kinds of step."""
    net = nets[name]
    repetitive = [p + p[:4] + p for p in prompts()]  # something to look up
    requests = [Request(tuple(p), n + 3 * i) for i, (p, n) in enumerate(zip(repetitive, BUDGETS))]  # a long tail
    drafter = LosslessDrafter(net, spec, ALWAYS_DRAFT, slots=3, most_rows=2)
    scheduler = Scheduler(net, max_batch=3, eos_token_ids=(EOS,), drafter=drafter)
    together = {f.request_id: f.token_ids for f in scheduler.run(requests)}
    assert scheduler.stats.speculative_steps > 0 and scheduler.stats.decode_steps > 0
    assert drafter.stats().drafted > 0
    for i, r in enumerate(requests):
        assert together[i] == solo(net, list(r.ids), r.max_new_tokens, ExitPolicy.never())[0], f"request {i}"


@pytest.mark.parametrize("name", ["llama-gqa-untied-bias-rope-scaled", "gpt2-tied"])
@pytest.mark.parametrize(
    "spec",
    [SpeculativeConfig(0, 3, goodput=True), SpeculativeConfig(1, 2, lookup=True, goodput=True)],
    ids=["context", "hybrid"],
)
def test_served_rows_whose_drafts_do_not_pay_run_the_plain_step_and_stay_exact(nets, name, spec, monkeypatch):
    """Lossless mode's goodput gate in a continuous batch: rows start with drafting off (a prior acceptance of 0),
    so cycles are handed back and the scheduler runs the full model's plain step, until a row's lookups name
    the committed tokens; rows joining start from the priors again. Every row is still its solo run."""
    monkeypatch.setattr("calm.speculative.goodput.ALPHA_PRIOR", 0.0)
    net = nets[name]
    repetitive = [p + p[:4] + p for p in prompts()]
    requests = [Request(tuple(p), n + 3) for p, n in zip(repetitive, BUDGETS)]
    drafter = LosslessDrafter(net, spec, ALWAYS_DRAFT, slots=3, most_rows=3)
    scheduler = Scheduler(net, max_batch=3, eos_token_ids=(EOS,), drafter=drafter)
    together = {f.request_id: f.token_ids for f in scheduler.run(requests)}
    assert drafter.gate is not None and drafter.stats().drafting_off > 0
    assert scheduler.stats.decode_steps > 0 and "plain" in {kind for kind, _ in drafter.gate.seconds}
    for i, r in enumerate(requests):
        assert together[i] == solo(net, list(r.ids), r.max_new_tokens, ExitPolicy.never())[0], f"request {i}"


def test_a_request_joining_a_slot_starts_from_the_gates_priors(nets):
    drafter = LosslessDrafter(nets["gpt2-tied"], SpeculativeConfig(0, 3, goodput=True), ALWAYS_DRAFT, 2, 2)
    assert drafter.gate is not None
    drafter.gate.alpha[1], drafter.gate.layer_gain[1] = 0.0, 3.0
    drafter.joined(1, [5, 6, 7])
    assert drafter.gate.alpha == [ALPHA_PRIOR] * 2 and drafter.gate.layer_gain == [LAYER_GAIN_PRIOR] * 2


def test_events_say_how_many_drafts_each_request_had_verified(nets):
    """A speculative step's event carries its request's own drafts: they sum to the drafter's count, and no
    request kept more tokens than its drafts plus the full model's one."""
    net = nets["gpt2-tied"]
    drafter = LosslessDrafter(net, SpeculativeConfig(0, 3), ALWAYS_DRAFT, slots=3, most_rows=3)
    scheduler = Scheduler(net, max_batch=3, eos_token_ids=(EOS,), drafter=drafter)
    for p in prompts()[:3]:
        scheduler.add(Request(tuple(p + p), 10))
    events = [e for _ in range(40) if scheduler.busy for e in scheduler.step()]
    assert sum(e.drafted for e in events) == drafter.stats().drafted > 0
    assert all(len(e.tokens) <= e.drafted + 1 for e in events if e.drafted)


@pytest.mark.parametrize(
    "spec", [None, SpeculativeConfig(0, 3), SpeculativeConfig(1, 2, lookup=True)], ids=["full", "context", "hybrid"]
)
def test_free_slots_compute_nothing_and_never_reach_live_rows(nets, spec):
    """Free slots' cache rows are poisoned with NaN before every step: no step writes them (the layers, their K/V
    and drafts run for live rows only, consecutive or not), and no live row reads them (outputs equal solo runs)."""
    net = nets["llama-gqa-untied-bias-rope-scaled"]
    drafter = None if spec is None else LosslessDrafter(net, spec, ALWAYS_DRAFT, slots=4, most_rows=4)
    scheduler = Scheduler(net, max_batch=4, eos_token_ids=(EOS,), drafter=drafter)
    repetitive = [p + p for p in prompts()[:3]]
    requests = [Request(tuple(repetitive[0]), 9), Request(tuple(repetitive[1]), 1), Request(tuple(repetitive[2]), 9)]
    streamed: dict[int, list[int]] = {i: [] for i in range(len(requests))}
    for r in requests:
        scheduler.add(r)
    cache, free_sets, free = scheduler.batch.cache, [], []  # the first step admits every request
    while scheduler.busy:
        cache.k[:, free], cache.v[:, free] = torch.nan, torch.nan
        for event in scheduler.step():
            streamed[event.request_id] += event.tokens
        assert cache.k[:, free].isnan().all() and cache.v[:, free].isnan().all()
        free_sets.append(free)
        free = [slot for slot, row in enumerate(scheduler.rows) if row is None]
    assert [1, 3] in free_sets  # live rows 0 and 2: not consecutive
    assert spec is None or scheduler.stats.speculative_steps > 0
    for i, r in enumerate(requests):
        assert tuple(streamed[i]) == solo(net, list(r.ids), r.max_new_tokens, ExitPolicy.never())[0], f"request {i}"


def test_sampling_or_exiting_rows_turn_drafting_off(nets):
    net = nets["llama-mha-tied"]
    drafter = LosslessDrafter(net, SpeculativeConfig(0, 3), ALWAYS_DRAFT, slots=2, most_rows=2)
    scheduler = Scheduler(net, max_batch=2, eos_token_ids=(EOS,), drafter=drafter)
    sampled = Request(tuple(prompts()[0]), 5, sampling=SamplingConfig(do_sample=True, seed=0))
    exiting = Request(tuple(prompts()[1]), 5, ExitPolicy(measure="state", threshold=0.9))
    list(scheduler.run([sampled, exiting]))
    assert scheduler.stats.speculative_steps == 0


def test_full_model_steps_after_rejected_drafts_keep_rows_exact(nets):
    """Two rows draft (rejected drafts leave masked holes in the cache), then a third joins and the batch
    runs the full model's step, which must attend around the holes."""
    net = nets["gpt2-tied"]
    drafter = LosslessDrafter(net, SpeculativeConfig(0, 3), ALWAYS_DRAFT, slots=3, most_rows=2)
    scheduler = Scheduler(net, max_batch=3, eos_token_ids=(EOS,), drafter=drafter)
    repetitive = [p + p for p in prompts()[:3]]
    requests = [Request(tuple(p), 12) for p in repetitive]
    scheduler.add(requests[0])
    scheduler.add(requests[1])
    streamed: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for _ in range(3):
        for event in scheduler.step():
            streamed[event.request_id] += event.tokens
    assert scheduler.stats.speculative_steps == 3 and drafter.stats().drafted > drafter.stats().accepted
    assert scheduler.batch.state.holes
    scheduler.add(requests[2])
    while scheduler.busy:
        for event in scheduler.step():
            streamed[event.request_id] += event.tokens
    assert scheduler.stats.decode_steps > 0
    for i, r in enumerate(requests):
        assert tuple(streamed[i]) == solo(net, list(r.ids), 12, ExitPolicy.never())[0], f"request {i}"


def test_sliding_window_models_run_the_full_models_step_in_a_continuous_batch(nets):
    net = nets["mistral-gqa-window-untied"]
    drafter = LosslessDrafter(net, SpeculativeConfig(0, 3), ALWAYS_DRAFT, slots=2, most_rows=2)
    scheduler = Scheduler(net, max_batch=2, eos_token_ids=(EOS,), drafter=drafter)
    requests = [Request(tuple(p + p), 8) for p in prompts()[:3]]
    together = {f.request_id: f.token_ids for f in scheduler.run(requests)}
    assert scheduler.stats.speculative_steps == 0
    for i, r in enumerate(requests):
        assert together[i] == solo(net, list(r.ids), 8, ExitPolicy.never())[0]


def test_continuous_batching_refuses_the_static_engine(nets):
    config = GenerationConfig(max_new_tokens=4, eos_token_ids=(EOS,), engine="static")
    with pytest.raises(InputError, match="dynamic engine"):
        generate_continuous(nets["llama-mha-tied"], [[5, 6], [7, 8, 9]], ExitPolicy.never(), config, 2)


def test_sampled_rows_beside_rows_decided_at_an_exit_check_equal_their_solo_runs(nets):
    """Rows that exit at a softmax check get their tokens from the check's logits; a seeded sampling row in the
    same step draws from its own generator for itself only."""
    net = nets["llama-mha-tied"]
    exiting = ExitPolicy(measure="softmax", threshold=0.1)
    requests = [
        Request(tuple(p), 8, exiting) if i % 2 else Request(tuple(p), 8, sampling=SamplingConfig(True, seed=i))
        for i, p in enumerate(prompts())
    ]
    together = run_all(net, requests, max_batch=3)
    assert any(k < net.num_layers for _, exits in together.values() for k in exits)
    for i, r in enumerate(requests):
        assert together[i] == solo(net, list(r.ids), 8, r.policy, r.sampling), f"request {i}"


def test_generate_runs_several_prompts_as_one_continuous_batch():
    from calm import CalmModel

    model = CalmModel.from_model(build("llama-mha-tied"))
    ps = prompts()[:3]
    many = model.generate(ps, max_new_tokens=5)
    one_by_one = model.generate(ps, max_new_tokens=5, max_batch=1)
    assert "continuous batching, 3 slots" in many.decoding and "continuous batching, 1 slot" in one_by_one.decoding
    alone = tuple(model.generate([p], max_new_tokens=5).token_ids[0] for p in ps)
    assert many.token_ids == one_by_one.token_ids == alone
    with pytest.raises(InputError, match="max_batch"):
        model.generate(ps, max_new_tokens=5, max_batch=0)

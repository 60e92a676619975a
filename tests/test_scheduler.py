"""The serving scheduler (serving/scheduler.py) driven directly over the tiny export's real ONNX Runtime graphs: a
mixed, chunked, batched workload gives every request the eager model's tokens (1 and 2 pipeline stages); blocks are
taken as tokens arrive and all come back; a burst larger than the pool waits and completes; requests that cannot fit
are refused at once; cancelled and failed requests leave without disturbing the others; a stage that lost its cache
(another node down or restarted) fails every running request; sampling is per request."""

import math
import random
import re
import threading
import time

import pytest

from dsa_export.exporter.onnx_export import export_onnx
from dsa_export.runtime import EagerBackend, Session
from dsa_export.serving.ort_graph import OrtGraph
from dsa_export.serving.scheduler import Refused, Scheduler, Sequence
from dsa_export.serving.stages import StageLost

CAPACITY = 256


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    from dsa_export.models import load_checkpoint

    return load_checkpoint(tiny_checkpoint, progress=False)


@pytest.fixture(scope="module")
def graphs(tiny_onnx):
    return [OrtGraph(tiny_onnx / "model.onnx", _io(tiny_onnx))]


@pytest.fixture(scope="module")
def staged_graphs(tmp_path_factory, tiny_checkpoint, model):
    """The tiny model cut into 2 pipeline stages (layers 0:2 and 2:3), each its own graph."""
    layers = model.config.num_hidden_layers
    out = tmp_path_factory.mktemp("staged")
    stages = [export_onnx(tiny_checkpoint, out / str(i), capacity=CAPACITY, layers=cut)
              for i, cut in enumerate([(0, layers - 1), (layers - 1, layers)])]
    return [OrtGraph(stage.model_path, stage.io) for stage in stages]


def _io(path):
    from dsa_export.serving.io_spec import GraphIO

    return GraphIO.load(path / "io.json")


@pytest.fixture(scope="module")
def eager(model):
    cache = {}

    def generate(prompt, n):
        key = (tuple(prompt), n)
        if key not in cache:
            cache[key] = Session(EagerBackend(model, capacity=CAPACITY)).generate([prompt], n)[0]
        return cache[key]

    return generate


class Client:
    """One request's side: the tokens it got, its error, and when it was done; optionally cancelling after
    `cancel_after` tokens, and checking the scheduler's block invariant at every token."""

    def __init__(self, scheduler, prompt, n, cancel_after=None, **sampling):
        self.scheduler, self.tokens, self.error, self.done = scheduler, [], None, threading.Event()
        self.cancel_after = cancel_after
        self.sequence = Sequence(list(prompt), n, self.emit, self.fail, self.cancelled, **sampling)

    def emit(self, token, logprob, index, last):
        assert index == len(self.tokens) and logprob <= 0
        s = self.sequence  # blocks are taken as tokens arrive: at most one partly filled block
        assert len(s.blocks) == math.ceil(s.fed / self.scheduler.block_size)
        self.tokens.append(token)
        if last:
            self.done.set()

    def fail(self, message):
        self.error = message
        self.done.set()

    def cancelled(self):
        return self.cancel_after is not None and len(self.tokens) >= self.cancel_after


def run(scheduler, clients, timeout=120):
    for client in clients:
        scheduler.submit(client.sequence)
    for client in clients:
        assert client.done.wait(timeout), "a request never finished"


def wait_for(condition, seconds=30):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the scheduler never got there"
        time.sleep(0.01)


def prompts(count, seed=0, lengths=(1, 5, 23, 64, 100, 150)):
    rng = random.Random(seed)
    return [[rng.randrange(320) for _ in range(rng.choice(lengths))] for _ in range(count)]


@pytest.mark.parametrize("stages", [1, 2])
def test_a_mixed_chunked_batch_gives_every_request_its_own_tokens(graphs, staged_graphs, eager, stages):
    """16 requests at once, prompts of 1..150 tokens fed in chunks of at most 48 tokens per step beside the decode
    tokens of the others, 4 sequences per step: each gets exactly the eager model's greedy tokens alone; some are
    cancelled mid-stream. Afterwards every block is back."""
    scheduler = Scheduler(graphs if stages == 1 else staged_graphs, pool_blocks=40, max_batch=4, max_tokens=48)
    try:
        work = prompts(16)
        clients = [Client(scheduler, p, 12, cancel_after=4 if i % 5 == 3 else None) for i, p in enumerate(work)]
        run(scheduler, clients)
        for client, prompt in zip(clients, work):
            expected = eager(prompt, 12)
            if client.cancel_after is None:
                assert client.error is None and client.tokens == expected
            else:  # what it got before it cancelled is right; then it left
                assert client.error == "the request was cancelled" and client.tokens == expected[:len(client.tokens)]
                assert 4 <= len(client.tokens) < 12
        stats = scheduler.stats()
        assert (stats["pool_blocks_in_use"], stats["pool_blocks_promised"], stats["running"]) == (0, 0, 0)
        assert stats["requests_done"] == 13 and stats["requests_cancelled"] == 3
        assert stats["steps"] < sum(len(p) for p in work)  # batched: far fewer steps than tokens
    finally:
        scheduler.stop()


def test_a_burst_larger_than_the_pool_waits_and_completes(graphs, eager):
    """A pool of 4 blocks (256 tokens) and 8 requests of 2 blocks each: at most 2 run at once, the rest wait in
    arrival order, and every one completes with its tokens."""
    scheduler = Scheduler(graphs, pool_blocks=4, max_batch=8, max_tokens=256)
    most = []
    try:
        work = prompts(8, seed=1, lengths=(70, 100))
        clients = [Client(scheduler, p, 8) for p in work]
        for client in clients:
            emit = client.emit
            client.sequence.emit = lambda *a, emit=emit: (most.append(scheduler.running.__len__()), emit(*a))
        run(scheduler, clients)
        assert [c.tokens for c in clients] == [eager(p, 8) for p in work]
        assert max(most) == 2 and scheduler.stats()["pool_blocks_in_use"] == 0
    finally:
        scheduler.stop()


def test_what_cannot_fit_is_refused_at_once(graphs):
    scheduler = Scheduler(graphs, pool_blocks=2, max_batch=2, max_tokens=64)

    def sequence(length, n):
        return Sequence([3] * length, n, lambda *a: None, lambda m: None)

    with pytest.raises(Refused, match=f"a prompt of 250 tokens \\+ 8 new tokens does not fit the cache capacity "
                                      f"{CAPACITY}"):
        scheduler.submit(sequence(250, 8))
    with pytest.raises(Refused, match="needs 3 cache blocks; the pool has 2"):
        scheduler.submit(sequence(130, 8))
    scheduler.stop()
    with pytest.raises(Refused, match="shutting down"):
        scheduler.submit(sequence(3, 2))


def test_the_waiting_queue_is_bounded(graphs):
    blocker = threading.Event()

    class Slow:  # the first graph's steps wait until told: requests pile up meanwhile
        io = graphs[0].io

        def new_pools(self, rows):
            return graphs[0].new_pools(rows)

        def run(self, feeds, pools, outputs=None):
            blocker.wait(30)
            return graphs[0].run(feeds, pools, outputs)

    scheduler = Scheduler([Slow()], pool_blocks=1, max_batch=1, max_tokens=64, max_waiting=2)
    try:
        clients = [Client(scheduler, [5, 6], 2) for _ in range(4)]
        scheduler.submit(clients[0].sequence)  # it runs (its block promised: the pool is full) ...
        wait_for(lambda: scheduler.stats()["running"] == 1)
        for client in clients[1:3]:  # ... and these two wait
            scheduler.submit(client.sequence)
        with pytest.raises(Refused, match="the server is busy: 2 requests are waiting already"):
            scheduler.submit(clients[3].sequence)
        blocker.set()
        for client in clients[:3]:
            assert client.done.wait(60) and len(client.tokens) == 2
    finally:
        blocker.set()
        scheduler.stop()


def test_a_failed_step_fails_its_requests_and_the_scheduler_keeps_serving(graphs, eager):
    class Flaky:
        io = graphs[0].io

        def new_pools(self, rows):
            return graphs[0].new_pools(rows)

        def run(self, feeds, pools, outputs=None):
            if 319 in feeds["input_ids"]:
                raise RuntimeError("a device error")
            return graphs[0].run(feeds, pools, outputs)

    scheduler = Scheduler([Flaky()], pool_blocks=8, max_batch=4, max_tokens=64)
    try:
        bad = Client(scheduler, [1, 319, 2], 4)
        run(scheduler, [bad])
        assert bad.error == "the step failed: RuntimeError: a device error" and bad.tokens == []
        good = Client(scheduler, [1, 2, 3], 6)
        run(scheduler, [good])
        assert good.tokens == eager([1, 2, 3], 6)
        assert scheduler.stats()["pool_blocks_in_use"] == 0 and scheduler.stats()["requests_failed"] == 1
    finally:
        scheduler.stop()


def test_a_stage_that_loses_its_cache_fails_every_running_request(staged_graphs, eager):
    """A stage on another node that stops answering or restarted (StageLost) fails every running request, in its
    step or not, in flight or not, with its message; their blocks come back; the requests after it are served."""
    first, second = staged_graphs
    lose = threading.Event()
    message = "node 1 (10.0.0.2:8001, dsa_stage_1) restarted: the cache of the running requests is gone"

    class OtherNode:
        io = second.io

        def new_pools(self, rows):
            return second.new_pools(rows)

        def run(self, feeds, pools, outputs=None):
            if lose.is_set():
                lose.clear()
                raise StageLost(message)
            return second.run(feeds, pools, outputs)

    scheduler = Scheduler([first, OtherNode()], pool_blocks=40, max_batch=4, max_tokens=48)
    try:
        running = [Client(scheduler, prompt, 100) for prompt in prompts(6, seed=3, lengths=(1, 5, 23, 64))]
        for client in running:
            scheduler.submit(client.sequence)
        wait_for(lambda: all(len(client.tokens) >= 2 for client in running))
        lose.set()
        for client in running:
            assert client.done.wait(60)
        assert [client.error for client in running] == [message] * 6
        wait_for(lambda: scheduler.stats()["pool_blocks_in_use"] == 0 and scheduler.stats()["running"] == 0)
        after = [Client(scheduler, prompt, 8) for prompt in prompts(3, seed=4)]
        run(scheduler, after)
        assert [client.tokens for client in after] == [eager(client.sequence.prompt, 8) for client in after]
        assert scheduler.stats()["requests_failed"] == 6
    finally:
        scheduler.stop()


def test_after_a_node_with_two_stages_restarts_the_requests_after_are_served(staged_graphs, eager):
    """Stages 1 and 2 on one node (RemoteStage's own epoch logic, the node simulated in process: stage 1 hands its
    hidden states on unchanged): the node restarts with requests running; the first of its stages to see it fails
    them all; the requests submitted after that wait until no lost step is in flight, so the other stage, which has
    not seen the restart yet, never fails one of them."""
    from dsa_export.serving.io_spec import HIDDEN_IN, HIDDEN_OUT
    from dsa_export.serving.stages import RemoteStage

    first, second = staged_graphs
    node = {"epoch": 1}

    class StageOnNode(RemoteStage):
        def __init__(self, stage, graph=None):  # graph None: a stage of no layers
            self.io, self.node, self.address, self.model = second.io, 1, "10.0.0.2:8001", f"stage {stage}"
            self.epoch = None
            self.graph, self.pools = graph, graph and graph.new_pools(40 * first.io.block_size)

        def _call(self, feeds, wanted):
            if self.graph is None:
                return {HIDDEN_OUT: feeds[HIDDEN_IN]}, node["epoch"]
            return self.graph.run(feeds, self.pools, wanted), node["epoch"]

    scheduler = Scheduler([first, StageOnNode(1), StageOnNode(2, second)], pool_blocks=40, max_batch=4, max_tokens=48)
    try:
        running = [Client(scheduler, prompt, 100) for prompt in prompts(6, seed=5, lengths=(1, 5, 23))]
        for client in running:
            scheduler.submit(client.sequence)
        wait_for(lambda: all(len(client.tokens) >= 2 for client in running))
        node["epoch"] = 2  # restarted: its pools are new
        wait_for(lambda: any(client.error for client in running))  # seen (a request admitted before that fails too)
        after = [Client(scheduler, prompt, 8) for prompt in prompts(4, seed=6)]
        run(scheduler, after)
        for client in running:
            assert client.done.wait(60)
        for client in running:  # failed by whichever of the node's stages saw the new load first
            assert re.fullmatch(r"node 1 \(10\.0\.0\.2:8001, stage [12]\) restarted: the cache of the running "
                                r"requests is gone", client.error), client.error
        assert [client.tokens for client in after] == [eager(client.sequence.prompt, 8) for client in after]
    finally:
        scheduler.stop()


def test_sampling_is_per_request_whatever_the_batch(graphs, eager):
    """A seeded sampled request gets the same tokens alone and in a batch of others; top_k=1 is greedy."""
    scheduler = Scheduler(graphs, pool_blocks=16, max_batch=8, max_tokens=128)
    try:
        settings = dict(temperature=0.9, top_k=20, top_p=0.9, seed=11)
        alone = Client(scheduler, [4, 5, 6], 10, **settings)
        run(scheduler, [alone])
        crowd = [Client(scheduler, p, 10, temperature=1.0, seed=i) for i, p in enumerate(prompts(5, seed=2))]
        again = Client(scheduler, [4, 5, 6], 10, **settings)
        run(scheduler, crowd[:2] + [again] + crowd[2:])
        assert again.tokens == alone.tokens
        assert len({tuple(c.tokens) for c in crowd}) > 1
        other_seed = Client(scheduler, [4, 5, 6], 10, **{**settings, "seed": 12})
        greedy = Client(scheduler, [4, 5, 6], 10, temperature=0.9, top_k=1, seed=3)
        run(scheduler, [other_seed, greedy])
        assert other_seed.tokens != alone.tokens and greedy.tokens == eager([4, 5, 6], 10)
    finally:
        scheduler.stop()


def test_stopping_lets_running_requests_finish(graphs, eager):
    scheduler = Scheduler(graphs, pool_blocks=16, max_batch=4, max_tokens=64)
    clients = [Client(scheduler, p, 40) for p in prompts(3, seed=3, lengths=(5, 30))]
    for client in clients:
        scheduler.submit(client.sequence)
    scheduler.stop(drain_seconds=60)
    assert all(c.done.is_set() and c.error is None and len(c.tokens) == 40 for c in clients)

"""Continuous batching over the paged cache pools: the serving loop of `dsa_generate` (triton_generate.py), with the
standard library and numpy only (shipped: see serving/__init__.py; tests drive it directly too).

What a step is: every running sequence's next token plus chunks of waiting prompts, packed (io_spec.py), up to
`max_tokens` tokens of up to `max_batch` sequences: decode tokens first (a running stream never waits behind a long
prompt), then chunks of the prompts being fed, which share the rest of the budget evenly (chunked prefill: a prompt of
any length up to the capacity is fed a budget at a time, and a short prompt arriving behind a long one is not held up
by it). Only a sequence whose step reaches its last fed token is sampled (the graph's logits_index), and
only its token id and log-probability come back.

Memory: the pools are `pool_blocks` blocks of `block_size` rows, shared by all sequences (models/cache.py). A request
is admitted only when the blocks its whole generation can need (prompt + max new tokens) can be promised to it; the
blocks themselves are taken as its tokens arrive, so the pool's blocks in use track live tokens (at most one partly
filled block per sequence). Reserving rather than preempting: no sequence ever fails or is recomputed for lack of
memory mid-generation, and admission is the only place a request waits; the price is capacity promised to requests
that stop early (a stop id), returned the moment they do. A request that could never fit is refused at once; one that
cannot fit now waits in a bounded queue (in arrival order: a long request is not starved by short ones behind it).

Pipeline stages: the graphs run on one worker thread each (stage i on device i), a step's hidden state going from one
to the next. With N stages, up to N steps (micro-batches of the running sequences, each sequence in at most one) are
in flight, so that every stage works at once. A stage on another node (stages.RemoteStage) is one more graph whose
run() is a gRPC call; when it loses its cache rows (StageLost: the node is down or restarted), every running sequence
fails with its message and gives its blocks back.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from queue import SimpleQueue
from typing import Callable

import numpy as np

if __package__:  # imported from the package
    from .io_spec import (BLOCK_TABLES, HIDDEN_IN, HIDDEN_OUT, INPUT_IDS, LOGITS_INDEX, LOGPROBS, NEXT_TOKENS,
                          POSITIONS, SEQUENCE, SLOTS, TEMPERATURE, TOP_K, TOP_P, UNIFORM)
    from .stages import StageLost
else:  # shipped beside io_spec.py into the model repository
    from io_spec import (BLOCK_TABLES, HIDDEN_IN, HIDDEN_OUT, INPUT_IDS, LOGITS_INDEX, LOGPROBS, NEXT_TOKENS,
                         POSITIONS, SEQUENCE, SLOTS, TEMPERATURE, TOP_K, TOP_P, UNIFORM)
    from stages import StageLost

CANCEL_CHECK_SECONDS = 0.0  # how often `cancelled` is called (before every step: the server's only reads a flag)
WAKE_SECONDS = 0.05  # an idle loop still looks at its waiting requests this often (cancelled ones leave)


class Refused(ValueError):
    """A request the scheduler will not take, with one line saying why (too long, queue full, shutting down)."""


class BlockAllocator:
    """The pools' blocks: free ones, and how many are promised to admitted sequences but not yet taken."""

    def __init__(self, blocks: int):
        self.total = blocks
        self.free = list(range(blocks - 1, -1, -1))  # taken from the end: low blocks first
        self.promised = 0

    @property
    def in_use(self) -> int:
        return self.total - len(self.free)

    def can_promise(self, blocks: int) -> bool:
        return len(self.free) - self.promised >= blocks

    def promise(self, blocks: int) -> None:
        assert self.can_promise(blocks)
        self.promised += blocks

    def take(self, blocks: int) -> list[int]:
        """`blocks` of the promised ones."""
        assert 0 <= blocks <= self.promised
        self.promised -= blocks
        taken, self.free = self.free[len(self.free) - blocks:], self.free[:len(self.free) - blocks]
        return taken[::-1]

    def give_back(self, blocks: list[int], promised: int) -> None:
        self.free.extend(reversed(blocks))
        self.promised -= promised


@dataclass
class Sequence:
    """One request as the scheduler runs it. `emit(token, logprob, index, last)` sends a new token to its client and
    `fail(message)` an error (both from the scheduler's thread); `cancelled()` asks whether the client gave up."""
    prompt: list[int]
    max_new_tokens: int
    emit: Callable[[int, float, int, bool], None]
    fail: Callable[[str], None]
    cancelled: Callable[[], bool] = lambda: False
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: frozenset = frozenset()
    fed: int = 0  # tokens whose cache rows are written
    generated: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    promised: int = 0  # blocks promised and not yet taken
    writing: int = 0  # tokens in the step in flight (0: in none): their rows are being written
    done: bool = False
    lost: str | None = None  # a stage lost its cache rows while this was in flight: it fails when its step is back

    @property
    def in_flight(self) -> bool:
        return self.writing > 0

    def __post_init__(self):
        self.rng = np.random.default_rng(self.seed)  # the request's own: its tokens do not depend on its batch

    @property
    def rows_needed(self) -> int:
        """Cache rows the whole generation can write (the last new token is never fed)."""
        return len(self.prompt) + self.max_new_tokens - 1

    @property
    def pending(self) -> list[int]:
        """Tokens known but not fed yet: the rest of the prompt, or the last new token."""
        return self.prompt[self.fed:] if self.fed < len(self.prompt) else self.generated[self.fed - len(self.prompt):]


@dataclass
class Step:
    """One packed step: (sequence, tokens fed) pairs, whether each is sampled, and the graphs' feeds."""
    parts: list[tuple[Sequence, int, bool]]
    feeds: dict
    started: float = 0.0


class Scheduler:
    """The serving loop over a pipeline of stage graphs (serving/ort_graph.py or trt_graph.py, or stages.RemoteStage
    for a stage on another node: `io`, `new_pools`, `run`). submit() adds a request (from any thread); the loop runs
    in a thread of its own until stop()."""

    def __init__(self, graphs: list, pool_blocks: int, max_batch: int, max_tokens: int, max_waiting: int = 256,
                 log: Callable[[str], None] = print, cancel_check_seconds: float = CANCEL_CHECK_SECONDS):
        self.graphs = graphs
        io = graphs[0].io
        self.block_size, self.blocks_per_sequence, self.capacity = io.block_size, io.blocks, io.capacity
        self.max_batch, self.max_tokens, self.max_waiting = max_batch, max_tokens, max_waiting
        if pool_blocks < 1 or max_batch < 1 or max_tokens < 1:
            raise ValueError(f"a scheduler needs pool blocks, max batch and max tokens >= 1, got {pool_blocks}, "
                             f"{max_batch}, {max_tokens}")
        self.pools = [graph.new_pools(pool_blocks * self.block_size) for graph in graphs]
        self.allocator = BlockAllocator(pool_blocks)
        self.log = log
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.finished: deque[tuple[Step, dict | None, str | None, bool]] = deque()  # _complete's arguments
        self.in_flight = 0
        self.micro_batches = len(graphs)
        self.lock = threading.Condition()
        self.stopping = False
        self.draining = False
        self.last_cancel_check = 0.0
        self.cancel_check_seconds = cancel_check_seconds
        self.counters = {"steps": 0, "step_seconds": 0.0, "tokens_fed": 0, "tokens_generated": 0,
                         "requests_done": 0, "requests_failed": 0, "requests_cancelled": 0}
        self.queues = [SimpleQueue() for _ in graphs]
        self.threads = [threading.Thread(target=self._stage_worker, args=(i,), daemon=True, name=f"dsa-stage-{i}")
                        for i in range(len(graphs))]
        self.threads.append(threading.Thread(target=self._loop, daemon=True, name="dsa-scheduler"))
        for thread in self.threads:
            thread.start()

    # ---- requests ----------------------------------------------------------------------------------------------------
    def check(self, sequence: Sequence) -> None:
        """Refused at once if it could never run: longer than a sequence may be, or than the whole pool."""
        if sequence.rows_needed > self.capacity:
            raise Refused(f"a prompt of {len(sequence.prompt)} tokens + {sequence.max_new_tokens} new tokens does "
                          f"not fit the cache capacity {self.capacity}")
        blocks = math.ceil(sequence.rows_needed / self.block_size)
        if blocks > self.allocator.total:
            raise Refused(f"a prompt of {len(sequence.prompt)} tokens + {sequence.max_new_tokens} new tokens needs "
                          f"{blocks} cache blocks; the pool has {self.allocator.total}")

    def submit(self, sequence: Sequence) -> None:
        self.check(sequence)
        with self.lock:
            if self.stopping or self.draining:
                raise Refused("the server is shutting down")
            if len(self.waiting) >= self.max_waiting:
                raise Refused(f"the server is busy: {len(self.waiting)} requests are waiting already; retry later")
            self.waiting.append(sequence)
            self.lock.notify_all()

    def stats(self) -> dict:
        with self.lock:
            return {"pool_blocks": self.allocator.total, "pool_blocks_in_use": self.allocator.in_use,
                    "pool_blocks_promised": self.allocator.promised,
                    "cache_tokens": sum(s.fed + s.writing for s in self.running), "running": len(self.running),
                    "waiting": len(self.waiting), **self.counters}

    def idle(self) -> bool:
        with self.lock:
            return not self.running and not self.waiting and self.in_flight == 0

    def drain(self) -> None:
        """Take no new request; what is running or waiting goes on."""
        with self.lock:
            self.draining = True

    def stop(self, drain_seconds: float = 0.0) -> None:
        """Stop taking requests; let the admitted and waiting ones finish for up to `drain_seconds`; then fail what
        is left and end the threads."""
        with self.lock:
            self.draining = True
            self.lock.wait_for(lambda: not self.running and not self.waiting and self.in_flight == 0,
                               timeout=drain_seconds)
            self.stopping = True
            self.lock.notify_all()
        self.threads[-1].join()  # the loop ends once the steps in flight are back
        for queue in self.queues:
            queue.put(None)
        for thread in self.threads[:-1]:
            thread.join()

    # ---- the loop ----------------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.lock:
                self.lock.wait_for(lambda: self.finished or (self.stopping and not self.in_flight) or (
                    not self.stopping and self._can_start()), timeout=WAKE_SECONDS)
                while self.finished:
                    self._complete(*self.finished.popleft())
                if self.stopping:
                    for sequence in [s for s in [*self.running, *self.waiting] if not s.in_flight]:
                        self._finish(sequence, "the server stopped before this request finished")
                    if self.in_flight == 0:
                        return
                    continue
                self._drop_cancelled()
                self._admit()
                while self.in_flight < self.micro_batches:
                    step = self._compose()
                    if step is None:
                        break
                    self.in_flight += 1
                    step.started = time.monotonic()
                    self.queues[0].put(step)

    def _can_start(self) -> bool:
        """A step could start now: a stage is free and a running sequence is not in one, or one can be admitted."""
        return self.in_flight < self.micro_batches and (
            any(not s.in_flight for s in self.running) or self._admissible())

    def _admissible(self) -> bool:
        """The first waiting request can join the running batch: a place in it, and its blocks can be promised; and
        no request lost to a stage is still in flight (until the last is back, another stage of the same node may
        still hold the old load's epoch, and would fail the newcomer)."""
        return (bool(self.waiting) and len(self.running) < self.max_batch * self.micro_batches
                and self.allocator.can_promise(math.ceil(self.waiting[0].rows_needed / self.block_size))
                and not any(s.lost for s in self.running))

    def _admit(self) -> None:
        """Waiting requests join the running batch, in arrival order, while their blocks can be promised."""
        while self._admissible():
            sequence = self.waiting.popleft()
            sequence.promised = math.ceil(sequence.rows_needed / self.block_size)
            self.allocator.promise(sequence.promised)
            self.running.append(sequence)

    def _drop_cancelled(self) -> None:
        now = time.monotonic()
        if now - self.last_cancel_check < self.cancel_check_seconds:
            return
        self.last_cancel_check = now
        for sequence in [*self.running, *self.waiting]:
            if not sequence.in_flight and not sequence.done and _asks(sequence.cancelled):
                self.counters["requests_cancelled"] += 1
                self._finish(sequence, "the request was cancelled")  # its last response, which nobody reads

    def _compose(self) -> Step | None:
        """The next step over the sequences not in flight: decode tokens first, then prompt chunks, within the
        token budget; with N stages each step takes about 1/N of the running sequences."""
        ready = [s for s in self.running if not s.in_flight]
        if not ready:
            return None
        most = min(self.max_batch, math.ceil(len(self.running) / self.micro_batches))
        decoding = [s for s in ready if s.fed >= len(s.prompt)][:min(most, self.max_tokens)]
        prefilling = [s for s in ready if s.fed < len(s.prompt)][:most - len(decoding)]
        budget = self.max_tokens - len(decoding)
        chunks = {}
        # the prompts share what the decode tokens leave, evenly (what a short one does not need goes to the
        # others): a new request's prompt is fed at once however long the prompts before it
        for i, sequence in enumerate(sorted(prefilling, key=lambda s: len(s.pending))):
            chunks[id(sequence)] = min(len(sequence.pending), budget // (len(prefilling) - i))
            budget -= chunks[id(sequence)]
        parts = [(s, 1, True) for s in decoding] + [
            (s, chunks[id(s)], s.fed + chunks[id(s)] == len(s.prompt)) for s in prefilling if chunks[id(s)]]
        if not parts:
            return None
        ids, positions, rows, slots = [], [], [], []
        tables = np.zeros((len(parts), self.blocks_per_sequence), dtype=np.int32)
        sampled, settings = [], []
        for row, (sequence, count, sample) in enumerate(parts):
            sequence.writing = count
            needed = math.ceil((sequence.fed + count) / self.block_size) - len(sequence.blocks)
            if needed > 0:
                sequence.blocks += self.allocator.take(needed)
                sequence.promised -= needed
            where = np.arange(sequence.fed, sequence.fed + count)
            blocks = np.asarray(sequence.blocks, dtype=np.int64)
            ids += sequence.pending[:count]
            positions.append(where)
            rows.append(np.full(count, row, dtype=np.int32))
            slots.append(blocks[where // self.block_size] * self.block_size + where % self.block_size)
            tables[row, :len(sequence.blocks)] = sequence.blocks
            if sample:
                sampled.append(len(ids) - 1)
                settings.append((sequence.temperature, sequence.top_k, sequence.top_p, sequence.rng.random()))
        if not sampled:  # only prompt chunks: the graph still samples one row (greedy), and it is ignored
            sampled, settings = [len(ids) - 1], [(0.0, 0, 1.0, 0.0)]
        settings = np.asarray(settings, dtype=np.float64)
        feeds = {INPUT_IDS: np.asarray(ids, dtype=np.int64), POSITIONS: np.concatenate(positions),
                 SEQUENCE: np.concatenate(rows), SLOTS: np.concatenate(slots), BLOCK_TABLES: tables,
                 LOGITS_INDEX: np.asarray(sampled, dtype=np.int64), TEMPERATURE: settings[:, 0].astype(np.float32),
                 TOP_K: settings[:, 1].astype(np.int32), TOP_P: settings[:, 2].astype(np.float32),
                 UNIFORM: settings[:, 3].astype(np.float32)}
        return Step(parts, feeds)

    def _stage_worker(self, stage: int) -> None:
        graph, pools, last = self.graphs[stage], self.pools[stage], stage == len(self.graphs) - 1
        while True:
            item = self.queues[stage].get()
            if item is None:
                return
            step, error = item if isinstance(item, tuple) else (item, None)
            results, lost = None, False
            if error is None and all(s.lost or s.done for s, _, _ in step.parts):
                with self.lock:  # its requests failed already: not sent to a node that may take a deadline to fail
                    self.finished.append((step, None, None, False))
                    self.lock.notify_all()
                continue
            if error is None:
                try:
                    wanted = [NEXT_TOKENS, LOGPROBS] if last else [HIDDEN_OUT]
                    out = graph.run(step.feeds, pools, wanted)
                    if last:
                        results = out
                    else:
                        step.feeds[HIDDEN_IN] = out[HIDDEN_OUT]
                except StageLost as e:  # another node lost our sequences' rows: every running one fails
                    error, lost = str(e), True
                except Exception as e:  # a failed step fails its sequences, not the server
                    error = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            if last or error is not None:
                with self.lock:
                    self.finished.append((step, results, error, lost))
                    self.lock.notify_all()
            else:
                self.queues[stage + 1].put(step)

    def _complete(self, step: Step, results: dict | None, error: str | None, lost: bool = False) -> None:
        """A step came back: every sequence in it advances; sampled ones get their token (and may finish). `lost`:
        a stage lost the cache rows of every running sequence (a node restarted or does not answer), and they fail:
        now, or when their step in flight is back."""
        self.in_flight -= 1
        self.counters["steps"] += 1
        self.counters["step_seconds"] += time.monotonic() - step.started
        if lost:
            for sequence in list(self.running):
                if sequence.in_flight:
                    sequence.lost = error
                elif not sequence.done:
                    self.counters["requests_failed"] += 1
                    self._finish(sequence, error)
        sampled = 0
        for sequence, count, sample in step.parts:
            sequence.writing = 0
            if sequence.done:
                continue
            if error is not None or sequence.lost is not None:
                self.counters["requests_failed"] += 1
                self._finish(sequence, error if lost else f"the step failed: {error}" if error else sequence.lost)
                continue
            sequence.fed += count
            self.counters["tokens_fed"] += count
            if not sample:
                continue
            token, logprob = int(results[NEXT_TOKENS][sampled]), float(results[LOGPROBS][sampled])
            sampled += 1
            sequence.generated.append(token)
            self.counters["tokens_generated"] += 1
            last = len(sequence.generated) == sequence.max_new_tokens or token in sequence.stop_ids
            try:
                sequence.emit(token, logprob, len(sequence.generated) - 1, last)
            except Exception as e:  # the client is gone: its request ends here
                self.log(f"dropping a request whose response cannot be sent ({type(e).__name__}: {e})")
                last = True
            if last:
                self.counters["requests_done"] += 1
                self._finish(sequence, None, sent=True)
        self.lock.notify_all()

    def _finish(self, sequence: Sequence, error: str | None, sent: bool = False) -> None:
        """The sequence leaves: its blocks go back at once; its client hears `error` (None: it was told already,
        or cancelled)."""
        sequence.done = True
        if sequence in self.running:
            self.running.remove(sequence)
            self.allocator.give_back(sequence.blocks, sequence.promised)
            sequence.blocks, sequence.promised = [], 0
            if not self.running:  # no cache row of any request is held anywhere now
                for graph in self.graphs:
                    if hasattr(graph, "forget_epoch"):
                        graph.forget_epoch()
        elif sequence in self.waiting:
            self.waiting.remove(sequence)
        if error is not None and not sent:
            try:
                sequence.fail(error)
            except Exception as e:
                self.log(f"cannot tell a client its request failed ({type(e).__name__}: {e})")
        self.lock.notify_all()


def _asks(question: Callable[[], bool]) -> bool:
    try:
        return bool(question())
    except Exception:  # a client that cannot even be asked is gone
        return True

"""The server process: reads the settings, wires the parts, serves, drains on SIGTERM.

Only this module reads ``Settings``; the parts get narrow arguments.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, disable_created_metrics, start_http_server

from rnnserve.errors import ModelRepositoryError, UsageError
from rnnserve.export import repository
from rnnserve.export.repository import ModelVersion
from rnnserve.protos.headers import grpc_ms
from rnnserve.protos.inference import grpc_service_pb2 as oip_pb
from rnnserve.protos.inference import grpc_service_pb2_grpc as oip_grpc
from rnnserve.protos.rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.protos.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from rnnserve.server.api import InferenceServicer, StreamGate
from rnnserve.server.auth import TokenAuth, load_tokens
from rnnserve.server.batcher import Batcher
from rnnserve.server.core import Core
from rnnserve.server.errors import DeviceUnavailable, StoreUnavailable
from rnnserve.server.interceptor import MetricsInterceptor
from rnnserve.server.metrics import Limits, Metrics, ServingCollector
from rnnserve.server.oip import OipServicer
from rnnserve.server.prepare import prepared_apart, sweep_stale
from rnnserve.server.runtime import (
    ANSWER_OVERHEAD,
    CUDA,
    ModelRegistry,
    ModelRuntime,
    RuntimeOptions,
)
from rnnserve.server.sessions import MemorySessionStore, Session
from rnnserve.server.settings import Settings
from rnnserve.server.shared import SharedStore, open_store

log = logging.getLogger("rnnserve.server")
SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name
OIP_SERVICE = oip_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
LINGER_S = 0.25  # after the last RPC of a drain ends, before connections close
# a session idle one to two of these keeps its last chunk's digest instead of the
# chunk (its last answer's, for a retry): a streaming session never pays the hash, an
# idle one keeps 16 bytes instead of the chunk
ANSWER_IDLE_S = 2.0
# The exit status of a server that stopped itself because a reshard changed its list of
# shards while it ran (``_watch_store``): a supervisor (``--workers``) stops with it too.
EXIT_STORE_CHANGED = 3
# What a held worker reports NOT_SERVING (``RnnServer.held``): the inference services,
# which readiness asks about. Not "", the server's own health, which the startup and
# liveness probes ask about: a held worker is up, and holding "" would stretch the
# startup probe over worker 0's start plus the others' (deploy/k8s sizes it for one).
HELD_SERVICES = (SERVICE, OIP_SERVICE)
# What a supervisor sends a held worker (``serve(held=True)``) once every worker serves,
# and what the worker answers once its health says SERVING.
RELEASE = "serve"
RELEASED = "serving"


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {str(path)!r}: {exc.strerror}") from None


def keepalive_options(s: Settings) -> list[tuple[str, int]]:
    """gRPC core's keepalive channel arguments for the server (doc/keepalive.md)."""
    pings: list[tuple[str, int]] = [  # the server's own pings
        ("grpc.keepalive_time_ms", grpc_ms(s.keepalive_s)),
        ("grpc.keepalive_timeout_ms", grpc_ms(s.keepalive_timeout_s)),
        # what gRPC 1.85 really bounds the answer to a ping by (default a minute): the
        # keepalive timeout alone is not applied to every keepalive ping
        ("grpc.http2.ping_timeout_ms", grpc_ms(s.keepalive_timeout_s)),
    ] if s.keepalive_s else [  # INT_MAX is gRPC's "never" (its default is 2 hours); the
        ("grpc.keepalive_time_ms", 2**31 - 1)]  # other pings' timeouts stay gRPC's
    return [
        *pings,
        # pings on a connection without calls: the server sends them, and takes a
        # client's at the rate below (without it, one ping per 2 hours there)
        ("grpc.keepalive_permit_without_calls", 1),
        # a client's pings while the server sends it nothing: one this soon after the
        # previous one is a strike, the third since the server last sent data or
        # headers ends the connection (GOAWAY ENHANCE_YOUR_CALM "too_many_pings")
        ("grpc.http2.min_ping_interval_without_data_ms",
         round(s.min_client_ping_s * 1000)),
        ("grpc.http2.max_ping_strikes", 2),
    ]


class ReflectionPool:
    """The default descriptor pool for server reflection, plus the one lookup that
    protobuf's upb pool lacks: the file of a method symbol (``pkg.Service.Method``),
    which ``grpcurl describe`` asks for."""

    def __init__(self) -> None:
        self._pool = descriptor_pool.Default()

    def FindFileContainingSymbol(self, symbol: str) -> Any:  # noqa: N802 (pool API)
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            service, _, method = symbol.rpartition(".")
            try:
                found = self._pool.FindServiceByName(service)
            except KeyError:
                raise KeyError(symbol) from None
            if method not in found.methods_by_name:
                raise KeyError(symbol) from None
            return found.file

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


def server_name() -> str:
    """This server's name in the session store (its leases and log lines)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class Worker:
    """This process's place among the ``--workers`` processes of one server
    (server/workers.py starts them): they share the gRPC port, and each serves its
    metrics on loopback for the supervising process to gather."""

    index: int
    count: int
    owner: str  # the server's name, one for all its workers (its leases: owner|index)

    def hint(self, store: str) -> str:
        """What a client should know when this worker does not hold a session."""
        if store != "memory":
            return f" (worker {self.index} of {self.count}) nor to the session store"
        return (f" (worker {self.index} of {self.count}: a session lives in the worker "
                "process that opened it, which a new connection may not reach; keep the "
                "connection, or run the server with --session-store to share sessions)")


class RnnServer:
    def __init__(self, settings: Settings, worker: Worker | None = None,
                 held: bool = False) -> None:
        self.settings = settings
        self.worker = worker
        # A held worker reports NOT_SERVING for HELD_SERVICES until ``release``: with
        # --workers the first one binds the port while the others load, and a probe or
        # client that reached it alone would take the server for ready (and keep its
        # connections there).
        self.held = held
        self.grpc_port = 0
        self.metrics_port = 0

    async def start(self) -> None:
        s = self.settings
        options = RuntimeOptions(device=s.device, device_id=s.device_id,
                                 intra_op_threads=s.intra_op_threads,
                                 inter_op_threads=s.inter_op_threads,
                                 allow_nonfinite=s.nonfinite == "allow",
                                 batch_buckets=s.buckets(),
                                 cuda_batch_buckets=s.buckets(cuda=True),
                                 pool_rows=s.state_pool_rows(),
                                 cuda_graphs=s.cuda_graphs, cuda_sync=s.cuda_sync,
                                 max_answer_bytes=s.max_message_bytes - ANSWER_OVERHEAD)
        try:
            self.registry = ModelRegistry(s.repo, options)
        except DeviceUnavailable as exc:  # --device cuda where it cannot run: the user's
            raise UsageError(str(exc)) from exc  # to fix, told in one line
        if not len(self.registry):
            raise ModelRepositoryError(f"no models in {str(s.repo)!r}; export one with "
                                       "`rnnserve export CHECKPOINT --repo DIR --name NAME`")
        disable_created_metrics()  # no *_created series: Prometheus would store them as gauges
        self.metrics = Metrics(CollectorRegistry())
        for rt in self.registry:
            self.metrics.add_model(rt.name, rt.version)
        self.shared: SharedStore | None = None
        if s.session_store != "memory":
            self.metrics.add_store(len(s.store_urls()))
            # The workers of one server share its name: a session may move between them
            # at once (a new connection reaching another worker), fenced by the stored
            # seq alone, while other servers wait out its lease. Each signs its leases
            # with its index, so that one lets go of only its own (shared.py).
            owner = f"{self.worker.owner}|{self.worker.index}" if self.worker \
                else server_name()
            self.shared = open_store(s.store_urls(), s.store_from_urls(), owner=owner,
                                     ttl_s=s.idle_timeout_s,
                                     lease_s=s.lease_s, timeout_s=s.store_timeout_ms / 1000,
                                     upsert=s.store_failure == "degrade",
                                     on_op=self.metrics.store_hook)
            try:
                await self.shared.ping()
                shards = len(s.store_urls())
                log.info("session store %s (%s, server %s, lease %.1fs)%s", s.session_store,
                         f"{shards} shards" if shards > 1 else "one shard", owner, s.lease_s,
                         f"; resharding online from {s.session_store_from}: sessions not "
                         "moved yet are handed off from there on first use"
                         if s.session_store_from else "")
            except StoreUnavailable as exc:
                log.warning("session store unreachable at start (%s); %s until it answers",
                            exc, "serving from memory" if s.store_failure == "degrade"
                            else "new sessions and steps get UNAVAILABLE")
        self.store = MemorySessionStore(idle_timeout_s=s.idle_timeout_s,
                                        max_sessions=s.max_sessions,
                                        max_state_bytes=s.max_state_bytes,
                                        on_event=self._session_event,
                                        when_full=s.when_full,
                                        unknown_hint=self.worker.hint(s.session_store)
                                        if self.worker else "")
        self.batchers = {rt.key: self._batcher(rt) for rt in self.registry}
        for rt in self.registry:  # on the runner thread(s), before any batch runs
            await self._warm_up(rt, self.batchers[rt.key])
        for b in self.batchers.values():
            b.start()
        self.core = Core(self.registry, self.store, self.batchers,
                         on_chunk=self.metrics.observe_chunk, shared=self.shared,
                         degrade=s.store_failure == "degrade",
                         on_resume=self.metrics.resumed,
                         on_degraded=self.metrics.store_degraded_hook,
                         on_refused=self.metrics.store_refused,
                         admission_delay_s=s.admission_queue_wait_ms / 1000,
                         max_sessions_per_principal=s.max_sessions_per_principal,
                         repo_poll_s=s.repo_poll_s)
        self.metrics.registry.register(ServingCollector(
            lambda: ((rt, self.batchers[rt.key]) for rt in self.registry),
            self.store.usage_by_model,
            Limits(max_batch_size=s.max_batch_size, max_queue=s.max_queue,
                   max_sessions=s.max_sessions, max_state_bytes=s.max_state_bytes),
            lambda: self.registry.withdrawn))

        self.rpcs = MetricsInterceptor(self.metrics)
        interceptors: list[grpc.aio.ServerInterceptor] = [self.rpcs]  # counts denials too
        if s.tokens_file is not None:
            tokens = load_tokens(s.tokens_file)
            interceptors.append(TokenAuth(tokens))
            log.info("bearer-token authentication: %d token(s)", len(tokens))
        self.server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            # Workers share the port on purpose; a lone server must not (gRPC allows it
            # by default, and a forgotten server would silently take half the traffic).
            ("grpc.so_reuseport", int(self.worker is not None)),
            # GOAWAY at that age (gRPC adds +-10% jitter); the grace stays gRPC's default,
            # unbounded: a session's stream is never cut for its connection's age
            *([("grpc.max_connection_age_ms", grpc_ms(s.max_connection_age_s))]
              if s.max_connection_age_s else []),
            *keepalive_options(s)])
        self.streams = StreamGate()
        pb_grpc.add_InferenceServicer_to_server(
            InferenceServicer(self.core, self.streams,
                              (self.worker.index, self.worker.count) if self.worker else (0, 1)),
            self.server)
        oip_grpc.add_GRPCInferenceServiceServicer_to_server(
            OipServicer(self.core, self.streams,
                        ready=lambda: self.core.accepting and not self.held), self.server)
        self.health = health.aio.HealthServicer()
        if self.held:  # before the port opens: a service not set yet is NOT_FOUND
            for name in HELD_SERVICES:
                await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = [SERVICE, OIP_SERVICE, health.SERVICE_NAME]
        if s.reflection:
            names.append(reflection.SERVICE_NAME)
            reflection.enable_server_reflection(names, self.server, pool=ReflectionPool())
        address = f"{s.host}:{s.grpc_port}"
        if s.tls_cert_file is not None:
            assert s.tls_key_file is not None
            ca = _read(s.tls_client_ca_file) if s.tls_client_ca_file is not None else None
            credentials = grpc.ssl_server_credentials(
                [(_read(s.tls_key_file), _read(s.tls_cert_file))], root_certificates=ca,
                require_client_auth=ca is not None)
        else:
            credentials = None
        try:
            if credentials is not None:
                self.grpc_port = self.server.add_secure_port(address, credentials)
            else:
                self.grpc_port = self.server.add_insecure_port(address)
        except RuntimeError:
            raise UsageError(f"cannot listen on {address}: the port is taken (another "
                             "server?) or the address is not this machine's") from None
        if credentials is not None:
            log.info("gRPC over TLS%s", " with client certificates (mutual TLS)" if ca else "")
        await self.server.start()
        # a worker's metrics are for its supervisor only, which serves them all on the
        # configured address and port
        port, host = (0, "127.0.0.1") if self.worker else (s.metrics_port, s.host)
        try:
            self._httpd, _ = start_http_server(port, addr=host,
                                               registry=self.metrics.registry)
        except OSError as exc:
            await self.server.stop(0)
            raise UsageError(f"cannot serve metrics on {host}:{port}: "
                             f"{exc.strerror or exc}") from None
        self.metrics_port = self._httpd.server_port
        self._reaper = asyncio.get_running_loop().create_task(self._reap())
        self._compactor = asyncio.get_running_loop().create_task(self._compact_answers())
        # why the server stopped itself (``_watch_store``), and the event that says so
        self.failure: str | None = None
        self.failed = asyncio.Event()
        self._watcher = asyncio.get_running_loop().create_task(
            self._watch_store(self.shared, s.store_check_s)) \
            if self.shared is not None and s.store_check_s else None
        self._trimmer = asyncio.get_running_loop().create_task(
            self._trim_pools(s.pool_shrink_s)) if s.pool_shrink_s else None
        # the loaded versions' files as they look now, so a change from here on shows
        self._poller = asyncio.get_running_loop().create_task(self._poll_repo(
            s.repo_poll_s, {k: look for k, (_, look) in _versions(s.repo).items()
                            if k in self.registry})) if s.repo_poll_s else None
        for name in ("", *([] if self.held else HELD_SERVICES)):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        for rt in self.registry:
            log.info("serving %s version %d (%s, %s input) on %s", rt.name, rt.version,
                     rt.meta.arch, rt.meta.input.kind, rt.provider)
        # Everything loaded so far lives as long as the server: keep it out of the
        # cyclic garbage collector's full passes, which otherwise stop the event loop
        # for ~100 ms (measured with the speech-small workload) and set the p99.
        gc.collect()
        gc.freeze()

    def _batcher(self, rt: ModelRuntime) -> Batcher:
        s = self.settings
        return Batcher(rt, max_batch_size=s.max_batch_size,
                       max_delay_s=s.max_batch_delay_ms / 1000, max_queue=s.max_queue,
                       runners=s.batch_runners,
                       on_batch=self.metrics.batch_hook(rt.name, rt.version))

    async def _warm_up(self, rt: ModelRuntime, batcher: Batcher, captured: bool = True
                       ) -> None:
        s = self.settings
        if s.warmup == "on" or (s.warmup == "auto" and rt.provider == CUDA):
            seconds = await batcher.warm_up(s.max_batch_size)
            log.info("warmed up %s version %d: batch sizes 1..%d (%s)%s in %.2fs",
                     rt.name, rt.version, s.max_batch_size,
                     f"buckets {','.join(map(str, rt.buckets))}" if rt.buckets
                     else "each size",
                     ", CUDA graphs captured" if s.cuda_graphs and captured else "",
                     seconds)

    async def _poll_repo(self, every_s: float, loaded: dict[Key, Look]) -> None:
        """Every ``every_s``, serve the versions the repository gained, and withdraw
        those it lost (``repo_poll_s``); ``loaded``: the loaded versions' files as they
        looked at start. An unreadable repository is said once, and looked at again."""
        loop = asyncio.get_running_loop()
        watch = _RepoWatch(loaded)
        unreadable: str | None = None
        try:  # what loads of a server killed meanwhile left in TMPDIR
            await loop.run_in_executor(None, sweep_stale)
        except Exception as exc:
            log.warning("could not look for folders left by earlier loads: %s", exc)
        while True:
            await asyncio.sleep(every_s)
            try:
                found = await loop.run_in_executor(None, _versions, self.registry.repo)
            except Exception as exc:  # gone or unreadable (a volume away): look again
                if unreadable != str(exc):
                    log.warning("the model repository cannot be read (%s); looking again "
                                "every %gs, serving what is loaded", exc, every_s)
                unreadable = str(exc)
                continue
            if unreadable is not None:
                log.info("the model repository can be read again")
                unreadable = None
            try:
                self._withdraw(found, watch)
                await self._load_new(found, watch)
            except Exception:  # a bug: keep looking rather than stop unseen
                log.exception("looking for model versions in the repository failed")

    def _withdraw(self, found: dict[Key, tuple[ModelVersion, Look]], watch: _RepoWatch
                  ) -> None:
        """Withdraw the loaded versions missing two looks in a row (``ModelRegistry.
        withdrawn``), not when none is there at all (a volume remounted shows an empty
        folder a moment); serve again one that came back as it was loaded, and say
        once per change that a loaded version's file changed."""
        reg = self.registry
        if not found:
            if not watch.empty:
                log.warning("the model repository holds no model now; nothing is "
                            "withdrawn while it looks empty")
            watch.empty = True
            return
        watch.empty = False
        for rt in reg:
            key = rt.key
            if key not in found:
                if key in watch.missing and key not in reg.withdrawn:
                    reg.withdrawn.add(key)
                    log.warning("model %s version %d was removed from the repository: "
                                "requests that name no version no longer get it (unless "
                                "it is its model's last); sessions on it, and requests "
                                "that name it, are served until the server restarts", *key)
                watch.missing.add(key)
                continue
            watch.missing.discard(key)
            look = found[key][1]
            if look == watch.loaded.get(key, look):
                watch.told.pop(key, None)
                if key in reg.withdrawn:
                    reg.withdrawn.discard(key)
                    log.info("model %s version %d is in the repository again: served to "
                             "requests that name no version again", *key)
            elif watch.told.get(key) != look:
                watch.told[key] = look
                log.warning("model %s version %d changed in the repository since it was "
                            "loaded; the server serves what it loaded until it restarts%s "
                            "(publish a change as a new version)", *key,
                            ", and keeps it withdrawn" if key in reg.withdrawn else "")

    async def _load_new(self, found: dict[Key, tuple[ModelVersion, Look]],
                        watch: _RepoWatch) -> None:
        """Load, warm up and serve each version not loaded yet whose model.onnx looked
        the same two looks in a row (a file being written is not read). One that failed
        is tried again once its file changes, or after ``RETRY_FAILED_S`` (a failure
        that was not the file's: device memory, a permission). Off the event loop: the
        file is parsed in another process (parsing holds the GIL), and onnxruntime
        reads what it wrote in a thread. With CUDA graphs none is captured
        for it: a capture fails when other CUDA work runs meanwhile (runtime.py)."""
        loop = asyncio.get_running_loop()
        reg = self.registry
        for key in [k for k in watch.seen if k not in found]:  # gone: seen anew if back
            watch.seen.pop(key)
            watch.failed.pop(key, None)
        # for requests and resumes naming a version not loaded here yet (Core.runtime):
        # one that failed is refused as not served while its file is as it failed, and
        # is loading again once the file changed
        stuck = {k for k, (look, _) in watch.failed.items()
                 if k in found and found[k][1] == look}
        self.core.loading = {k for k in found if k not in reg and k not in stuck}
        self.core.load_failed = stuck
        for key, (mv, look) in found.items():
            if key in reg:
                continue
            before, watch.seen[key] = watch.seen.get(key), look
            failed = watch.failed.get(key)
            if look != before or (failed is not None and failed[0] == look
                                  and time.monotonic() - failed[1] < RETRY_FAILED_S):
                continue  # not settled yet, or failed as it is, lately
            rt: ModelRuntime | None = None
            batcher: Batcher | None = None
            try:
                async with prepared_apart(mv.path) as prepared:  # not holding the GIL
                    rt = await loop.run_in_executor(
                        None, ModelRuntime, mv.path, mv.name, mv.version, reg.options,
                        prepared)
                assert rt is not None
                if self.settings.cuda_graphs:
                    rt.seal()
                batcher = self._batcher(rt)
                await self._warm_up(rt, batcher, captured=False)
            except BaseException as exc:
                if rt is not None:
                    rt.stop_warming_up()  # the server stopping: not a full warm-up more
                if batcher is not None:
                    await batcher.stop()  # its runner threads
                if not isinstance(exc, Exception):
                    raise
                watch.failed[key] = (look, time.monotonic())
                self.core.loading.discard(key)
                self.core.load_failed = self.core.load_failed | {key}
                self.metrics.model_load_failures.labels(mv.name, str(mv.version)).inc()
                log.error("model %s version %d in %s not loaded (tried again once its "
                          "file changes, or in %.0fs): %s", mv.name, mv.version, mv.path,
                          RETRY_FAILED_S, exc)
                continue
            assert rt is not None and batcher is not None
            self.metrics.add_model(rt.name, rt.version)
            batcher.start()
            self.core.add_model(rt, batcher)
            watch.loaded[key] = look
            watch.seen.pop(key)
            watch.failed.pop(key, None)
            log.info("serving %s version %d (%s, %s input) on %s, loaded while serving "
                     "(its file parsed in a process apart in %.2fs)%s", rt.name, rt.version,
                     rt.meta.arch, rt.meta.input.kind, rt.provider, prepared.seconds,
                     "; its runs are not captured as CUDA graphs"
                     if self.settings.cuda_graphs else "")

    async def release(self) -> None:
        """SERVING, for a held server once its supervisor saw every worker serve. A
        server that drains already stays NOT_SERVING (the servicer ignores the set)."""
        if self.held:
            self.held = False
            for name in HELD_SERVICES:
                await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def _session_event(self, event: str, session: Session) -> None:
        self.metrics.session_event(event, session.model, session.version)
        if self.shared is not None and event in ("expired", "evicted"):
            # no longer here: let another replica take it (the record stays resumable)
            self.core.let_go_later([session.id])

    async def _reap(self) -> None:
        while True:
            wait = self.store.next_expiry_in()
            await asyncio.sleep(self.settings.idle_timeout_s if wait is None else wait + 0.01)
            self.store.expire_idle()

    async def _compact_answers(self) -> None:
        """Every ANSWER_IDLE_S, the chunks kept by the last answers of sessions idle
        that long are let go (their digests kept; sessions.py), a slice at a time. A
        failure is logged and the next period tried: stopped, the list of sessions
        to look at would grow for as long as the server runs."""
        while True:
            await asyncio.sleep(ANSWER_IDLE_S)
            try:
                while self.store.compact_answers():
                    await asyncio.sleep(0)
            except Exception:
                log.exception("letting go of idle sessions' last chunks failed")

    async def _watch_store(self, shared: SharedStore, every_s: float) -> None:
        """Read the shards' marks of their places again every ``every_s``: a reshard
        that changed the list while this server ran (it missed a rollout) leaves it
        looking for sessions where the other servers no longer do, and writing those it
        opens where none will find them. Then it stops itself (``failed``)."""
        while True:
            await asyncio.sleep(every_s)
            try:
                why = await shared.recheck()
            except Exception:  # a bug: keep checking rather than stop unseen
                log.exception("checking the session store's shards failed")
                continue
            if why is not None:
                log.error("%s. This server stops (exit status %d) rather than serve "
                          "sessions from a list of shards the others no longer use", why,
                          EXIT_STORE_CHANGED)
                self.failure = why
                self.failed.set()
                return

    async def _trim_pools(self, every_s: float) -> None:
        """Give back state pool memory a burst of sessions left unused (pool.py)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(every_s)
            for rt in self.registry:
                pool = rt.pool
                target = pool.trim_target()
                if not target:
                    continue
                before = pool.capacity
                try:  # waits for the runs in flight: in a thread
                    done = await loop.run_in_executor(None, pool.shrink, target)
                except Exception:
                    log.exception("%s v%d: the state pool could not shrink", rt.name,
                                  rt.version)
                    continue
                if done:
                    log.info("%s v%d: state pool shrunk from %d to %d rows (%d in use)",
                             rt.name, rt.version, before, pool.capacity, pool.used)

    async def stop(self) -> None:
        """Drain: NOT_SERVING, no new sessions, in-flight chunks answered, then stop."""
        grace = self.settings.shutdown_grace_s
        if self._watcher is not None:
            self._watcher.cancel()  # a check during the drain would change its status
        if self._poller is not None:
            self._poller.cancel()  # no version loaded while draining
        log.info("shutting down: answering in-flight chunks (grace %.1fs)", grace)
        await self.health.enter_graceful_shutdown()
        self.core.accepting = False
        self.streams.drain()
        # Wait for the inference RPCs: streams end with UNAVAILABLE at once, unary calls
        # are answered. Then give the statuses a moment on the wire (a client still
        # writing its next chunk would otherwise see a broken pipe instead of the
        # status), and stop: what is left is health Watch and reflection streams,
        # which never end by themselves and must not hold up the exit.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        for pause in (LINGER_S, 0.0):
            while self.rpcs.in_flight and loop.time() < deadline:
                await asyncio.sleep(0.01)
            await asyncio.sleep(min(pause, max(0.0, deadline - loop.time())))
        await self.server.stop(0)
        self._reaper.cancel()
        self._compactor.cancel()
        if self._trimmer is not None:
            self._trimmer.cancel()
        for b in self.batchers.values():
            await b.stop()
        if self.shared is not None:
            # every answered step is in the store already; hand the sessions over now
            # instead of when their leases run out
            await self.core.let_go(list(self.store.live_ids()))
            await self.shared.close()
        self._httpd.shutdown()
        self._httpd.server_close()
        log.info("stopped")


Key = tuple[str, int]  # a model version: name, version
# its model.onnx's size, modification and change times, inode; all -1 while it has none
Look = tuple[int, int, int, int]
RETRY_FAILED_S = 300.0  # a version that failed to load is tried again this much later


@dataclass
class _RepoWatch:
    """What the model repository looked like to ``RnnServer._poll_repo``."""

    loaded: dict[Key, Look]  # the loaded versions' files, as loaded
    seen: dict[Key, Look] = field(default_factory=dict)  # not loaded, as last looked at
    failed: dict[Key, tuple[Look, float]] = field(default_factory=dict)  # as, when
    told: dict[Key, Look] = field(default_factory=dict)  # a loaded one's change, logged
    missing: set[Key] = field(default_factory=set)  # loaded, missing at the last look
    empty: bool = False  # the last look found no version at all


def _versions(repo: Path) -> dict[Key, tuple[ModelVersion, Look]]:
    """The repository's versions, each with how its model.onnx looks."""
    out = {}
    for mv in repository.list_models(repo):
        try:
            st = mv.path.stat()
            look = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        except OSError:
            look = (-1, -1, -1, -1)
        out[(mv.name, mv.version)] = (mv, look)
    return out


async def serve(settings: Settings, worker: Worker | None = None,
                on_ready: Callable[[dict[str, Any]], None] | None = None,
                control: Connection | None = None, held: bool = False) -> int:
    """Serve until SIGTERM or SIGINT, then drain. ``on_ready`` gets the ready line
    (else it is printed). ``control`` is a worker's pipe from its supervisor: its end
    of file (the supervisor is gone) stops the server too, and ``RELEASE`` on it ends
    ``held`` (HELD_SERVICES NOT_SERVING until then; the supervisor sends it only after the ready
    line, so the server has started when it comes)."""
    # Handlers first: a SIGTERM that arrives as soon as the server says it is ready
    # (or while it loads) must drain it, not kill it.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # a worker starts with them blocked (workers.py): one that came meanwhile comes now
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    server = RnnServer(settings, worker, held=held)
    releases: set[asyncio.Task[None]] = set()
    if control is not None:
        fd = control.fileno()

        def from_supervisor() -> None:
            try:
                message = control.recv()  # one small message, written whole: no wait
            except (EOFError, OSError):
                loop.remove_reader(fd)  # at end of file it would stay readable
                stop.set()
                return
            if message == RELEASE:
                async def release() -> None:
                    await server.release()
                    with contextlib.suppress(OSError):  # the supervisor is gone: EOF next
                        control.send(RELEASED)

                task = loop.create_task(release())
                releases.add(task)
                task.add_done_callback(releases.discard)

        loop.add_reader(fd, from_supervisor)
    await server.start()
    ready = {"event": "ready", "grpc_port": server.grpc_port,
             "metrics_port": server.metrics_port, "host": settings.host}
    if on_ready is not None:
        on_ready(ready)
    else:
        print(json.dumps(ready), flush=True)
    stopping = [loop.create_task(stop.wait()), loop.create_task(server.failed.wait())]
    await asyncio.wait(stopping, return_when=asyncio.FIRST_COMPLETED)
    for task in stopping:
        task.cancel()
    await server.stop()
    return EXIT_STORE_CHANGED if server.failure is not None else 0


def log_to_stderr(tag: str = "") -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s")


def run(settings: Settings) -> int:
    if settings.workers > 1:
        from rnnserve.server.workers import supervise

        return supervise(settings)
    log_to_stderr()
    return asyncio.run(serve(settings))

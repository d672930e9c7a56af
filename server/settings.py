"""Server settings: defaults < a TOML file < ``RNNSERVE_*`` environment < command-line flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from rnnserve.protos.headers import MAX_MS_SECONDS


class Settings(BaseSettings):
    # no inf or nan: a duration of either crashed the start (OverflowError) instead
    # of being refused as a setting
    model_config = SettingsConfigDict(env_prefix="RNNSERVE_", extra="forbid",
                                      use_attribute_docstrings=True, allow_inf_nan=False)

    repo: Path = Path("models")
    """Model repository: REPO/<name>/<version>/model.onnx."""
    repo_poll_s: float = Field(0.0, ge=0)
    """How often to look in the repository for versions added or removed (0: only at
    start; else at least 0.1). A new version is loaded, warmed up and served once its
    model.onnx has stayed unchanged for one period: new sessions that name no version
    get it, sessions open already stay on theirs. One that fails to load is logged and
    tried again once its file changes (or 5 minutes later). A version removed (two looks
    in a row) no longer goes to requests that name none, unless it is its model's last;
    sessions on it and requests naming it are served until a restart. Write a version
    elsewhere and move its directory in (one rename): no half-written file."""
    host: str = "0.0.0.0"
    """Address the gRPC and metrics servers bind; 127.0.0.1 for loopback only."""
    grpc_port: int = Field(8001, ge=0, le=65535)
    """gRPC port (0: any free port, printed at start)."""
    metrics_port: int = Field(8002, ge=0, le=65535)
    """Prometheus /metrics port (0: any free port)."""
    workers: int = Field(1, ge=1)
    """Server processes sharing the gRPC port (the kernel spreads connections over them)
    and the device; one process answers a few thousand chunks a second at most. Limits
    (sessions, queue, state bytes, pool rows) are per worker, and a session lives in the
    worker that opened it: a new connection reaches it only with a shared session_store."""
    worker_hang_s: float = Field(10.0, gt=0)
    """With workers: a serving worker whose event loop sent no heartbeat (one a second)
    for this long is hung; it is killed and started again."""
    worker_start_s: float = Field(300.0, gt=0)
    """With workers: the longest a worker may take from its start to serving (importing,
    loading the models, warming up); one that takes longer is hung: at the start the
    server exits with an error naming it, later it is killed and started again. Under an
    orchestrator keep it below the startup limit (deploy/k8s: the startupProbe's 120 s),
    so that the server's error, not the probe's, says which worker hung."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA when onnxruntime obtains it, else CPU; cuda: fail without it."""
    device_id: int = Field(0, ge=0)
    """CUDA device ordinal."""
    intra_op_threads: int = Field(0, ge=0)
    """onnxruntime threads inside one run (0: onnxruntime's default)."""
    inter_op_threads: int = Field(0, ge=0)
    """onnxruntime threads across independent nodes (0: default)."""
    max_batch_size: int = Field(64, ge=1)
    """Most session steps in one onnxruntime run."""
    batch_buckets: str = ""
    """Batch sizes runs are padded up to, e.g. 8,16,32,64, or pow2 (powers of two up to
    max_batch_size); padding rows read the zero state and write a row no session owns,
    and each bucket runs from fixed buffers (what CUDA graphs replay). none: every batch
    runs at its own size (best on the CPU). Empty (auto): pow2 for a model that runs on
    CUDA, none on the CPU (CUDA warms up every size a run can have at start: without
    buckets that is every size up to max_batch_size)."""
    pool_rows: int = Field(0, ge=0)
    """Rows of each model's state pool on its device (one per live session and step in
    flight); 0: start at 64 and double when full, or with cuda_graphs (fixed addresses,
    no growth) max_sessions plus two batches per runner (and max_sessions more with a
    shared session_store, whose writes hold a step's new row)."""
    pool_shrink_s: float = Field(30.0, ge=0)
    """How often each state pool looks for memory to give back: when the rows in use fit
    in a quarter of its buffers (after a burst of sessions) they shrink to twice those
    rows, not below the first size; 0: never. A fixed pool (cuda_graphs) never shrinks."""
    cuda_graphs: bool = False
    """Capture each bucket's run as a CUDA graph and replay it (device cuda; batch buckets
    default to pow2). The graphs are captured at warm-up, for chunks of one and four
    steps (hops); runs of other chunk lengths use the buckets' fixed buffers uncaptured.
    A model's runs then go through one thread, one at a time."""
    cuda_sync: Literal["auto", "spin", "yield", "blocking"] = "auto"
    """How threads waiting for the GPU wait (device cuda): auto is CUDA's choice, which
    spins a core while a process has fewer GPU contexts than the host has cores;
    blocking sleeps until the GPU is done, leaving the core to the event loops (a
    little later wake-up per run); yield spins but yields the core. On an H100 host
    blocking served worse than auto (docs/benchmarks.md)."""
    warmup: Literal["auto", "on", "off"] = "auto"
    """Run every batch size once at start (auto: on CUDA, where a new shape's first run
    is slow; off on the CPU)."""
    max_batch_delay_ms: float = Field(2.0, ge=0)
    """Longest wait for more steps once one is queued."""
    batch_runners: int = Field(1, ge=1)
    """onnxruntime runs of one model version at once: with 2 or more the next batch is
    gathered and run while one runs (worth it on a GPU; on a CPU they share the cores).
    With cuda_graphs a model's runs are one at a time: more only gather the next batch."""
    max_queue: int = Field(4096, ge=1)
    """Queued steps per model version beyond which requests get RESOURCE_EXHAUSTED."""
    admission_queue_wait_ms: float = Field(0.0, ge=0)
    """Admission control: while a model's steps wait longer than this for their batch,
    new sessions and stateless requests get RESOURCE_EXHAUSTED with a retry hint, and
    the sessions already admitted keep their latency (0: off)."""
    when_full: Literal["evict", "refuse"] = "evict"
    """At max_sessions or max_state_bytes a new session evicts the least recently used
    one, or is refused with RESOURCE_EXHAUSTED (no live stream is cut for it)."""
    max_sessions_per_principal: int = Field(0, ge=0)
    """Live sessions one principal may hold (0: no limit); without tokens every caller
    is the same principal."""
    max_message_bytes: int = Field(4 << 20, ge=1024)
    """Largest gRPC message received or sent; a bigger one gets RESOURCE_EXHAUSTED from
    gRPC before the server reads it."""
    max_connection_age_s: float = Field(0.0, ge=0, le=MAX_MS_SECONDS)
    """Ask clients to reconnect (HTTP/2 GOAWAY) once a connection is this old, so new
    calls spread again over the workers of --workers and the replicas behind an L4
    balancer; calls and streams already open go on until they end (0: never)."""
    keepalive_s: float = Field(60.0, ge=0, le=MAX_MS_SECONDS)
    """Ping a connection (HTTP/2 PING) after this long without activity, with or without
    calls on it, and close it when the ping is not answered within keepalive_timeout_s:
    the streams of a client that vanished (node lost, network partition) end (their
    sessions stay, to resume or expire), and idle connections stay open through NATs
    and L4 balancers that drop idle flows (keep it below their idle timeout, e.g. a
    350 s one); 0: never."""
    keepalive_timeout_s: float = Field(20.0, gt=0, le=MAX_MS_SECONDS)
    """How long the server waits for the answer to its keepalive ping before it closes
    the connection."""
    min_client_ping_s: float = Field(10.0, ge=0, le=MAX_MS_SECONDS)
    """The shortest interval between a client's pings that the server accepts while it
    sends the client nothing (an idle stream, a connection without calls): a client
    pinging more often gets GOAWAY too_many_pings at the third early ping since the
    server last sent it data, and its connection is closed (its streams fail with
    UNAVAILABLE). Clients that ping must ping no more often: AsyncClient(keepalive_s=S)
    with S >= this, other gRPC clients' keepalive time likewise (0: any rate)."""
    nonfinite: Literal["reject", "allow"] = "reject"
    """Float chunks with NaN or infinity: reject (INVALID_ARGUMENT) or allow (the model
    gets them, and its state may carry them on)."""
    idle_timeout_s: float = Field(300.0, gt=0)
    """A session without a request for this long expires."""
    max_sessions: int = Field(10_000, ge=1)
    """Live sessions beyond which the least recently used is evicted."""
    max_state_bytes: int = Field(1 << 30, ge=1)
    """State memory beyond which the least recently used sessions are evicted."""
    shutdown_grace_s: float = Field(10.0, ge=0)
    """On SIGTERM: how long in-flight chunks may take before the server stops."""
    session_store: str = "memory"
    """Where sessions live: memory (this process), or redis://HOST:PORT[/DB] to share them
    between replicas so that a session survives its server (each step is written there
    before it is answered); several Redis URLs separated by commas spread the sessions
    over them (shards: every server must list the same ones in the same order)."""
    session_store_from: str = ""
    """Resharding online: the list of Redis URLs the servers ran with before
    session_store (comma-separated, in their order). A session not yet on its shard of
    the new list is handed off from its shard of this one when first loaded; `rnnserve
    reshard --online` moves the rest. Empty when no resharding is under way."""
    store_failure: Literal["refuse", "degrade"] = "refuse"
    """When the shared store cannot be reached: refuse (new sessions and steps get
    UNAVAILABLE, nothing advances) or degrade (serve from memory, not durable)."""
    lease_s: float = Field(10.0, gt=0)
    """How long a server's claim on a session outlives its last step: after a crash,
    another replica can resume the session this long after the last step."""
    store_timeout_ms: float = Field(500.0, gt=0)
    """Longest wait for the shared store per operation."""
    store_check_s: float = Field(10.0, ge=0)
    """How often the server reads each shard's mark of its place again (0: only at
    start): a server whose list of shards a reshard has changed since it started
    (it lists a retired shard, or one in another place) drains and exits with status
    3, rather than serve sessions where the other servers no longer look."""
    tls_cert_file: Path | None = None
    """PEM certificate (chain) of the server: gRPC over TLS (needs tls_key_file)."""
    tls_key_file: Path | None = None
    """PEM private key of tls_cert_file."""
    tls_client_ca_file: Path | None = None
    """PEM CA certificates: require a client certificate they signed (mutual TLS)."""
    tokens_file: Path | None = None
    """Bearer tokens, one 'TOKEN [PRINCIPAL]' per line: calls without one get
    UNAUTHENTICATED (health checks excepted)."""
    reflection: bool = True
    """Serve gRPC server reflection."""

    @field_validator("session_store", "session_store_from")
    @classmethod
    def _store_url(cls, v: str, info: ValidationInfo) -> str:
        if v == ("memory" if info.field_name == "session_store" else ""):
            return v  # no store; no resharding
        urls = [u.strip() for u in v.split(",")]
        for u in urls:
            if not u.startswith(("redis://", "rediss://", "unix://")):
                what = "'memory' or " if info.field_name == "session_store" else ""
                raise ValueError(f"{info.field_name} must be {what}redis://, rediss:// or "
                                 f"unix:// URLs separated by commas, got {u!r} in {v!r}")
        if len(set(urls)) != len(urls):
            raise ValueError(f"{info.field_name} lists a shard twice: {v!r}")
        return ",".join(urls)

    def store_urls(self) -> list[str]:
        """The shared store's URLs, one per shard (none for memory)."""
        return [] if self.session_store == "memory" else self.session_store.split(",")

    def store_from_urls(self) -> list[str]:
        """The previous list of shards while resharding online (none otherwise)."""
        return self.session_store_from.split(",") if self.session_store_from else []

    @field_validator("repo_poll_s")
    @classmethod
    def _poll(cls, v: float) -> float:
        if 0 < v < 0.1:
            raise ValueError(f"repo_poll_s must be 0 (no polling) or at least 0.1, got {v}")
        return v

    @field_validator("batch_buckets")
    @classmethod
    def _buckets(cls, v: str) -> str:
        if v.strip() in ("", "pow2", "none"):
            return v.strip()
        try:
            sizes = [int(p) for p in v.split(",")]
        except ValueError:
            raise ValueError("batch_buckets must be sizes like 8,16,32, pow2 or none, "
                             f"got {v!r}") from None
        if not sizes or min(sizes) < 1:
            raise ValueError(f"batch buckets must be >= 1, got {v!r}")
        return ",".join(str(n) for n in sorted(set(sizes)))

    def buckets(self, cuda: bool = False) -> tuple[int, ...]:
        """The batch buckets as sizes for a model on the CPU, or with ``cuda`` on CUDA
        (pow2 expanded; auto is pow2 on CUDA, and cuda_graphs implies pow2)."""
        spec = self.batch_buckets or ("pow2" if self.cuda_graphs or cuda else "none")
        if spec == "pow2":
            sizes, n = [], 1
            while n < self.max_batch_size:
                sizes.append(n)
                n *= 2
            return (*sizes, self.max_batch_size)
        return () if spec == "none" else tuple(int(p) for p in spec.split(","))

    def state_pool_rows(self) -> int:
        if self.pool_rows:
            return self.pool_rows
        if self.cuda_graphs:
            rows = self.max_sessions + 2 * self.batch_runners * self.max_batch_size + 2
            if self.session_store != "memory":
                # steps hold their new rows until the store has their write, and batches
                # being written are not bounded by the runners: each session may have one
                rows += self.max_sessions
            return rows
        return 64

    @model_validator(mode="after")
    def _cuda_graphs(self) -> Settings:
        if self.cuda_graphs and self.device != "cuda":
            raise ValueError("cuda_graphs needs device cuda")
        if self.cuda_sync != "auto" and self.device != "cuda":
            raise ValueError("cuda_sync needs device cuda")
        if self.cuda_graphs and self.batch_buckets == "none":
            raise ValueError("cuda_graphs replays a graph per batch bucket: batch_buckets "
                             "none leaves none")
        if self.cuda_graphs and self.warmup == "off":  # graphs are captured at warm-up
            raise ValueError("cuda_graphs captures its graphs at warm-up: it needs warmup "
                             "auto or on")
        return self

    @model_validator(mode="after")
    def _tls_pairs(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and "
                             "tls_key_file")
        return self

    @model_validator(mode="after")
    def _resharding(self) -> Settings:
        if self.session_store_from:
            if self.session_store == "memory":
                raise ValueError("session_store_from (resharding online) needs a "
                                 "session_store of redis URLs")
            if self.session_store_from == self.session_store:
                raise ValueError("session_store_from is the same list as session_store: "
                                 "nothing to reshard (leave it empty)")
        return self

    _config_file: ClassVar[Path | None] = None  # set only while load() builds one

    @classmethod
    def load(cls, config_file: str | Path | None = None, **flags: Any) -> Settings:
        """Settings from flags (None values ignored) over env over ``config_file``."""
        if config_file and not Path(config_file).is_file():
            raise FileNotFoundError(f"config file {str(config_file)!r} not found")
        cls._config_file = Path(config_file) if config_file else None
        try:
            return cls(**{k: v for k, v in flags.items() if v is not None})
        finally:
            cls._config_file = None

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources = [init_settings, env_settings]
        if cls._config_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls._config_file))
        return tuple(sources)

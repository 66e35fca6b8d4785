"""The set-up every experiment shares, as functions an experiment file calls top to bottom.

    check_positive / check_choice / check_path / ConfigError   validation helpers (before anything is written)
    prepare_workdir(workdir, config)         refuse a work directory that is a file; record the resolved
                                             config, or refuse a resume whose config changes the trajectory
                                             or (model_config=) the recorded architecture
    new_model_config                         TransformerConfig from config.model and the data
    make_optimizer(config)                   optax AdamW + schedule from the config's keys
    train_iterator(source, config)           this process's share of the global batch, checkpointable
    eval_batches(source, config)             this process's rows of the validation set, padded
    fit(...)                                 init-or-restore, the train loop, metrics, checkpoints; closes all
    keyed_model_dir(cache_dir, config, ...)  a model shared between runs, keyed by its config and corpus
    timed_once(workdir, fn)                  fn() with its first completed run's wall time kept in W

An experiment reads: validate -> load data and models -> prepare_workdir -> build the step -> fit.  Nothing
is written to the work directory before prepare_workdir, which runs only after validation, so a rejected
config leaves the directory as it was.
"""

import hashlib
import json
import os
from typing import Any, Callable, Optional

import jax
import numpy as np

from kdjax import checkpoint, hostio, loop, pretrained, steps
from kdjax.metrics import MetricsWriter
from kdjax.models.transformer import TransformerConfig

CONFIG_FILE = "config.json"

# Config keys that do not change what a run computes, only how it is logged, saved or laid out (a mesh or
# chunking change reorders float reductions and nothing else).  Anything else differing on resume needs
# --config.allow_resume_changes.
NON_TRAJECTORY_KEYS = (
    "log_every",
    "eval_every",
    "eval_batches",
    "checkpoint_every",
    "debug_sleep_per_step",
    "export_hf_dir",
    "allow_resume_changes",
    "data.cache_dir",
    "distributed.*",
    "mesh.*",
    "sharding_rules",
    "loss_chunk_size",  # the fused chunked head: same values, another summation order
)


MODEL_CONFIG_FILE = pretrained.MODEL_CONFIG_FILE


class ConfigError(ValueError):
    """A configuration the user must change; the message says what and how.  The command-line entry points
    print it as one line (no traceback) and exit 1."""


# --------------------------------------------------------------------------------------------------------
# Validation helpers: collect every problem, then raise once.


class Problems:
    """Collects config problems so that one run reports all of them: `with Problems() as p: p.check(...)`."""

    def __init__(self, what: str = "config"):
        self.what, self.items, self.prefix = what, [], ""

    def add(self, message: str):
        self.items.append(self.prefix + message)

    def prefixed(self, name: str) -> "Problems":
        """A view whose problems land in this collection as "<name>: <message>" (e.g. one stage's config)."""
        view = Problems(self.what)
        view.items, view.prefix = self.items, f"{self.prefix}{name}: "
        return view

    def check(self, ok: bool, message: str):
        if not ok:
            self.add(message)

    def run(self, fn: Callable, *args, **kwargs):
        """Calls fn; a ValueError/TypeError/OSError it raises becomes a problem (e.g. a loss's own hparam
        check, an export directory that is in the way)."""
        try:
            fn(*args, **kwargs)
        except (ValueError, TypeError, OSError) as e:
            self.add(str(e))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None and self.items:
            lines = "\n".join(f"  - {m}" for m in self.items)
            raise ConfigError(f"invalid {self.what} ({len(self.items)} problem(s)):\n{lines}")
        return False


def check_common(p: Problems, config):
    """The checks every training config shares: step counts, batch, learning rate, logging intervals."""
    p.check(config.steps >= 1, f"steps must be >= 1, got {config.steps}")
    p.check(0 <= config.warmup_steps < max(config.steps, 1),
            f"warmup_steps={config.warmup_steps} must be in [0, steps={config.steps})")
    p.check(0 < config.learning_rate < float(np.finfo(np.float32).max),
            f"learning_rate must be a positive finite number, got {config.learning_rate}")
    for key in ("log_every", "eval_every", "checkpoint_every", "batch_size", "accum_steps"):
        p.check(config[key] >= 1, f"{key} must be >= 1, got {config[key]}")
    nproc = jax.process_count()
    if config.batch_size >= 1 and config.accum_steps >= 1:
        p.check(config.batch_size % nproc == 0,
                f"batch_size {config.batch_size} does not split over {nproc} processes")
        p.check((config.batch_size // max(nproc, 1)) % config.accum_steps == 0,
                f"the per-process batch {config.batch_size // nproc} does not split into "
                f"accum_steps={config.accum_steps} microbatches")
    p.check(config.get("eval_batches", 0) >= 0, f"eval_batches must be >= 0, got {config.get('eval_batches')}")
    for key in (config.get("allow_resume_changes", "") or "").split(","):
        p.check(not key.strip() or key.strip() == "all" or _has_key(config, key.strip()),
                f"allow_resume_changes names {key.strip()!r}, which is not a config key")


def check_path(p: Problems, path: str, what: str, *, must_contain: Optional[str] = None):
    """A configured input path must exist (and hold `must_contain`); empty means unset and passes."""
    if not path:
        return
    if not os.path.exists(path):
        p.add(f"{what} {path!r} does not exist")
    elif must_contain and not os.path.exists(os.path.join(path, must_contain)):
        p.add(f"{what} {path!r} has no {must_contain}")


def _has_key(config, dotted: str) -> bool:
    node = config
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node:
            return False
        node = node[part]
    return True


# --------------------------------------------------------------------------------------------------------
# The work directory and its recorded config.


def _flatten(d: dict, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resolved_config(config) -> dict:
    """The config as plain JSON values (tuples become lists), what W/config.json records."""
    return json.loads(json.dumps(config.to_dict()))


def _allowed(key: str, allow: set) -> bool:
    patterns = set(NON_TRAJECTORY_KEYS) | allow
    return "all" in allow or any(
        key == pat or (pat.endswith(".*") and key.startswith(pat[:-1])) or key.startswith(pat + ".")
        for pat in patterns
    )


def trajectory_config(config) -> dict:
    """The resolved config without the keys that do not change what a run computes (NON_TRAJECTORY_KEYS):
    what identifies a run's result, e.g. to cache a teacher by."""
    return {k: v for k, v in sorted(_flatten(resolved_config(config)).items()) if not _allowed(k, set())}


def config_changes(recorded: dict, current: dict, allow=()) -> list[str]:
    """The trajectory-changing differences between two resolved configs, one line each (empty: none)."""
    a, b = _flatten(recorded), _flatten(current)
    allow = {k.strip() for k in allow if k.strip()}
    return [
        f"{key}: {a.get(key, '<absent>')!r} recorded, {b.get(key, '<absent>')!r} now"
        for key in sorted(set(a) | set(b))
        if a.get(key) != b.get(key) and not _allowed(key, allow)
    ]


def prepare_workdir(workdir: str, config, *, model_config: Optional[TransformerConfig] = None) -> bool:
    """Creates the work directory and records the resolved config in W/config.json; returns whether it
    already held a run.

    A rerun whose config differs from the recorded one in anything that changes what the run computes is
    refused before anything is written, with the differences listed; keys that only change logging,
    saving or the mesh (NON_TRAJECTORY_KEYS) may differ.  A deliberate change (e.g. more steps) is allowed
    with `--config.allow_resume_changes=steps,learning_rate` (or `all`), and is then recorded.
    With `model_config`, a model_config.json in W that describes another architecture is refused too
    (`pretrained.check_model_files`), after the config check (whose message names the keys) and before
    any write.  Only process 0 writes.
    """
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"work directory {workdir!r} exists and is a file, not a directory")
    path = os.path.join(workdir, CONFIG_FILE)
    current = resolved_config(config)
    existed = os.path.exists(path)
    if existed:
        recorded = hostio.read_json(path)
        allow = (config.get("allow_resume_changes", "") or "").split(",")
        changes = config_changes(recorded, current, allow)
        if changes:
            keys = ",".join(line.split(":")[0] for line in changes)
            raise ConfigError(
                f"{workdir} holds a run with another config; resuming it with this one would silently "
                "change what it computes:\n" + "\n".join(f"  - {c}" for c in changes)
                + f"\nUse another --workdir, or, if the change is deliberate, add "
                f"--config.allow_resume_changes={keys}"
            )
        if _flatten(recorded) != _flatten(current):
            print(f"note: {workdir}: resuming with allowed config changes; recording the new config")
    elif os.path.isdir(os.path.join(workdir, "checkpoints")) and os.listdir(os.path.join(workdir, "checkpoints")):
        print(f"note: {workdir} has checkpoints but no {CONFIG_FILE} (an older kdjax): recording this config")
    if model_config is not None:
        pretrained.check_model_files(workdir, model_config)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        hostio.write_json_atomically(path, current)
    return existed


def new_model_config(model_config, *, vocab_size: int, max_len: int) -> TransformerConfig:
    """TransformerConfig from a config's `model` section, with the data's vocabulary and sequence length."""
    return TransformerConfig.from_dict({**model_config.to_dict(), "vocab_size": vocab_size, "max_len": max_len})


# --------------------------------------------------------------------------------------------------------
# Optimizer, data, the loop.


def make_optimizer(config, total_steps: Optional[int] = None):
    """AdamW with clipping and warm-up + cosine decay from `config.learning_rate`, `warmup_steps`, `steps`,
    `weight_decay`, `grad_clip`."""
    return steps.make_optimizer(
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        total_steps=total_steps or config.steps,
        weight_decay=config.weight_decay,
        grad_clip=config.grad_clip,
    )


def local_batch_size(config) -> int:
    """This process's rows of the global `config.batch_size` (validated by check_common to divide)."""
    return config.batch_size // jax.process_count()


def train_iterator(source, config, *, seed: Optional[int] = None):
    """Checkpointable iterator over this process's share of shuffled, batched `source` (see
    `kdjax.data.pipeline.train_dataset`): global step k reads the same examples whatever the process count."""
    from kdjax.data import pipeline  # pylint: disable=g-import-not-at-top

    dataset = pipeline.train_dataset(
        source,
        batch_size=local_batch_size(config),
        seed=config.seed if seed is None else seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    return pipeline.train_iterator(dataset)


def eval_batches(source, config):
    """This process's rows of every validation example once, padded and masked (see
    `kdjax.data.pipeline.eval_batches`), at the training's per-process batch size."""
    from kdjax.data import pipeline  # pylint: disable=g-import-not-at-top

    return pipeline.eval_batches(
        source,
        batch_size=local_batch_size(config),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def init_or_restore(spec: steps.StateSpec, checkpointer: checkpoint.Checkpointer, data_iter, *,
                    init_params=None):
    """The newest usable checkpoint's state (and data position), or a fresh state (with `init_params` as
    the starting parameters, e.g. a pretrained student's) when there is none."""
    if checkpointer.all_steps():
        state, data_state = checkpointer.restore(spec.abstract)
        data_iter.set_state(data_state)
        print(f"resumed from step {int(state.step)}")
        return state
    state = spec.init()
    return state if init_params is None else state.replace(params=init_params)


def fit(
    workdir: str,
    config,
    *,
    spec: steps.StateSpec,
    data_iter,
    train_step: Callable,
    batch_shardings: dict,
    run_eval: Callable,
    tokens_per_step: int,
    frozen: Any = None,
    init_params: Any = None,
    desc: str = "train",
):
    """Restores or initialises the state, runs `loop.train_loop` to `config.steps`, and closes the
    checkpointer and the metrics writer whatever happens (so no orbax temporary directory is left behind by
    an error).  Returns (final state, last evaluation's scalars)."""
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=config.checkpoint_every)
    writer = None
    try:
        state = init_or_restore(spec, ckpt, data_iter, init_params=init_params)
        writer = MetricsWriter(workdir, resume_step=int(state.step))
        return loop.train_loop(
            state=state,
            train_step=train_step,
            data_iter=data_iter,
            batch_shardings=batch_shardings,
            checkpointer=ckpt,
            writer=writer,
            run_eval=run_eval,
            total_steps=config.steps,
            log_every=config.log_every,
            eval_every=config.eval_every,
            tokens_per_step=tokens_per_step,
            frozen=frozen,
            desc=desc,
            debug_sleep_per_step=config.get("debug_sleep_per_step", 0.0),
        )
    finally:
        # Stop the input pipeline's threads first (a failing read must not leave them racing the shutdown),
        # then let every checkpoint in flight finish: no orbax temporary directory is left behind.
        close = getattr(data_iter, "close", None)
        if close is not None:
            close()
        ckpt.close()
        if writer is not None:
            writer.close()


def keyed_model_dir(cache_dir: str, model_config, *, corpus_fingerprint: str, default: str) -> str:
    """Where a model trained once and shared between runs lives: `cache_dir`/teacher-<key>, the key a sha256
    of its trajectory config (`trajectory_config`) and the corpus fingerprint, so a changed config or corpus
    never reuses a stale model; `default` (e.g. W/teacher) when `cache_dir` is empty."""
    if not cache_dir:
        return default
    key = json.dumps([trajectory_config(model_config), corpus_fingerprint], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return os.path.join(os.path.expanduser(cache_dir), f"teacher-{digest}")


def timed_once(workdir: str, fn: Callable):
    """(fn(), record): W/wall_time.json keeps the seconds and the machine's load of the first run of fn that
    completed, so a rerun that only resumes or re-tabulates reports the original cost."""
    import time  # pylint: disable=g-import-not-at-top

    path = os.path.join(workdir, "wall_time.json")
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    result = fn()
    if not os.path.exists(path) and jax.process_index() == 0:
        hostio.write_json_atomically(
            path, {"seconds": time.perf_counter() - t0, "load_start": load0, "load_end": os.getloadavg()[0]}
        )
    return result, hostio.read_json(path)


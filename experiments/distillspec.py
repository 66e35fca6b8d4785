"""DistillSpec end to end: a real-size target, a draft aligned to it by distillation, speculative decoding measured.

  python -m experiments.distillspec --config configs/distillspec.py --workdir W
  python -m experiments.distillspec --config configs/distillspec.py --workdir W --eval_only \
      --config.target_workdir=T --config.eval.drafts=raw=D1,distilled=D2     (kdjax work dirs or HF dirs)

Stages, each in its own directory and resumable (a finished one is reused, a killed one resumes from its
last checkpoint; a changed config is refused by the stage's W/<stage>/config.json):
  1a. the base LM (`experiments.lm_pretrain`), in config.base_cache_dir keyed by its config and the corpus:
      the `make demo` teacher's place, so each command reuses the other's; then W/target: the base embedded
      function-preservingly in the real-size architecture config.target_model (`embed_params`: zero extra
      heads, hidden units, residual dimensions and layers, rescaled norms) - the cost of a real target, the
      predictions of the base.  Or a given target (target_workdir / target_hf_path), used as it is;
  1b. W/draft_init: the draft with cross-entropy for draft_init_steps (`experiments.lm_distill`, loss "ce");
  2.  from W/draft_init, draft.steps more steps each: W/raw with cross-entropy (the raw draft) and one
      W/<name> per row of config.runs with a divergence to the target on its data source (`lm_distill`:
      draft = student, target = teacher; Zhou et al., 2023, "DistillSpec"); an embedded target teaches
      through its base (the same function, a fraction of the cost);
  3.  the evaluation (also alone with --eval_only): on held-out prompts, for every gamma and temperature,
      speculative sampling (`kdjax.specdec`) with every draft:
        alpha_hat = accepted / tested draft tokens (tested = accepted + the first rejection of each block);
        the prediction of teacher-forced sum_x min(p, q): over every generated position (alpha_tf, the
          DistillSpec number) and over the positions that were tested (alpha_tested: its exact
          expectation, since a draft token proposed after prefix h is accepted with probability
          beta(h) = sum_x min(p(x|h), q(x|h) / eps)); z = (accepted - sum beta) / sqrt(sum beta (1 - beta));
        tau_hat = tokens the blocks produced / target calls, and tau(alpha_tf) = (1 - a^(g+1)) / (1 - a);
      wall clock at batch 1 (target-only `sampling.sample` vs `specdec.speculative_sample`), the draft /
      target cost ratio c and the verification cost v; the lossy sweep over eps (lenience) with the
      target's NLL of the generated text.  W/results.md, W/results.json, W/tau_vs_gamma.png,
      W/speedup_vs_eps.png.
"""

import dataclasses
import functools
import os
import re
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from configs import distillspec as ds_config
from experiments import lm_distill, lm_pretrain
from kdjax import checkpoint, cli, distill, hostio, losses, pretrained, run, sharding, specdec, timing
from kdjax.data import hf_tokenizer
from kdjax.data import text as text_data
from kdjax.models import sampling
from kdjax.models.transformer import TransformerConfig

RAW = ds_config.RAW


def slug(name):
    """A draft's directory name: "draft-generated tvd++" -> "draft_generated_tvdpp"."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower().replace("+", "p")).strip("_")


# --------------------------------------------------------------------------------------------------------
# Validation and the stage configs.


def run_config(config, *, name, mode, loss, fraction=1.0, sample_temperature=1.0, target, init=""):
    """One draft stage's lm_distill config: config.draft with the row's method, the target as the teacher
    (`target` = (workdir, hf_path)) and, for stage 2, W/draft_init as the starting point."""
    c = config.draft.copy_and_resolve_references()
    c.mode, c.loss, c.on_policy_fraction, c.sample_temperature = mode, loss, float(fraction), float(sample_temperature)
    c.teacher.workdir, c.teacher.hf_path = target
    c.student.init_workdir = init
    if name == "draft_init":
        c.steps, c.warmup_steps = config.draft_init_steps, min(config.draft.warmup_steps, config.draft_init_steps - 1)
        c.eval_every = c.checkpoint_every = max(config.draft_init_steps, 1)
    return c


def draft_stages(config, workdir, target):
    """[(name, stage directory, lm_distill config)]: draft_init, raw, then every row of config.runs."""
    init_dir = os.path.join(workdir, "draft_init")
    out = [("draft_init", init_dir, run_config(config, name="draft_init", mode="offline", loss="ce", target=target)),
           (RAW, os.path.join(workdir, RAW),
            run_config(config, name=RAW, mode="offline", loss="ce", target=target, init=init_dir))]
    for name, mode, loss, fraction, temperature in config.runs:
        out.append((name, os.path.join(workdir, slug(name)),
                    run_config(config, name=name, mode=mode, loss=loss, fraction=fraction,
                               sample_temperature=temperature, target=target, init=init_dir)))
    return out


def parse_drafts(spec: str) -> list[tuple[str, str]]:
    """"name=DIR,name=DIR" -> [(name, DIR)]; ValueError naming a malformed entry."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"eval.drafts entry {item!r} is not name=DIR")
        out.append((name.strip(), os.path.expanduser(path.strip())))
    return out


def _check_eval(p, e):
    ints = lambda xs: all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in xs)
    p.check(bool(e.gammas) and ints(e.gammas), f"eval.gammas must be ints >= 1, got {e.gammas}")
    p.check(bool(e.timing_gammas) and ints(e.timing_gammas) and set(e.timing_gammas) <= set(e.gammas),
            f"eval.timing_gammas={e.timing_gammas} must be a non-empty subset of eval.gammas={e.gammas}")
    p.check(ints([e.lossy_gamma]), f"eval.lossy_gamma must be an int >= 1, got {e.lossy_gamma}")
    p.check(bool(e.temperatures) and all(t >= 0 for t in e.temperatures),
            f"eval.temperatures must be >= 0 (0 = greedy), got {e.temperatures}")
    p.check(e.lossy_temperature > 0, f"eval.lossy_temperature must be > 0 (eps < 1 changes nothing greedy), "
            f"got {e.lossy_temperature}")
    p.check(bool(e.lenience) and all(0 < x <= 1 for x in e.lenience) and 1.0 in e.lenience,
            f"eval.lenience must be in (0, 1] and include 1 (exact SD, the baseline), got {e.lenience}")
    p.check(e.num_prompts >= 2, f"eval.num_prompts must be >= 2 (standard errors), got {e.num_prompts}")
    p.check(1 <= e.timing_prompts <= e.num_prompts,
            f"eval.timing_prompts must be in [1, eval.num_prompts={e.num_prompts}], got {e.timing_prompts}")
    p.check(e.timing_repeats >= 1, f"eval.timing_repeats must be >= 1, got {e.timing_repeats}")
    p.check(e.prompt_len >= 1 and e.new_tokens >= 1,
            f"eval.prompt_len and eval.new_tokens must be >= 1, got {e.prompt_len}, {e.new_tokens}")


def validate(config, *, eval_only=False):
    """Every check that needs no data or model, before anything is read or written."""
    with run.Problems("distillspec config") as p:
        given = bool(config.target_workdir or config.target_hf_path)
        p.check(not (config.target_workdir and config.target_hf_path),
                "give target_workdir or target_hf_path, not both")
        run.check_path(p, config.target_workdir, "target_workdir", must_contain=run.MODEL_CONFIG_FILE)
        run.check_path(p, config.target_hf_path, "target_hf_path", must_contain="config.json")
        _check_eval(p, config.eval)
        if eval_only:
            p.check(given, "--eval_only needs the target: set --config.target_workdir or --config.target_hf_path")
            drafts = []
            p.run(lambda: drafts.extend(parse_drafts(config.eval.drafts)))
            p.check(bool(drafts), "--eval_only needs --config.eval.drafts=name=DIR[,name=DIR...]")
            p.check(len({n for n, _ in drafts}) == len(drafts), f"eval.drafts repeats a name: {config.eval.drafts}")
            for name, path in drafts:
                p.check(os.path.isdir(path) and any(os.path.exists(os.path.join(path, f))
                                                    for f in (run.MODEL_CONFIG_FILE, "config.json")),
                        f"eval.drafts {name}={path!r} is not a kdjax work directory or a Hugging Face directory")
            return
        run.check_path(p, config.base_workdir, "base_workdir", must_contain=run.MODEL_CONFIG_FILE)
        if not given and not config.base_workdir:
            p.run(lm_pretrain.validate, config.base)
        if not given and config.target_model.num_layers:
            if not config.base_workdir:
                p.run(lambda: target_config(run.new_model_config(config.base.model, vocab_size=2, max_len=2),
                                            config.target_model))
            elif os.path.exists(os.path.join(config.base_workdir, run.MODEL_CONFIG_FILE)):
                p.run(lambda: target_config(pretrained.load_model_config(config.base_workdir), config.target_model))
        p.check(config.draft_init_steps >= 1, f"draft_init_steps must be >= 1, got {config.draft_init_steps}")
        names = [r[0] for r in config.runs]
        p.check(bool(names), "config.runs is empty: at least one distilled draft")
        p.check(RAW not in names and "draft_init" not in names and len(set(map(slug, names))) == len(names),
                f"config.runs names must be distinct (after slug) and not {RAW!r} or 'draft_init': {names}")
        for row in config.runs:
            if len(row) != 5:
                p.add(f"config.runs row {row!r} is not (name, mode, loss, on_policy_fraction, sample_temperature)")
                continue
            _check_run(p, config, row)
        d = config.draft
        inner = run.Problems()
        run.check_common(inner, d)
        for message in inner.items:
            p.add(f"draft: {message}")
        p.run(run.new_model_config, d.model, vocab_size=2, max_len=d.data.seq_len)
        p.check(config.eval.prompt_len + config.eval.new_tokens <= d.data.seq_len,
                f"eval.prompt_len + eval.new_tokens = {config.eval.prompt_len + config.eval.new_tokens} exceeds "
                f"draft.data.seq_len={d.data.seq_len} (the drafts' max_len)")
        if not given:
            p.check(config.eval.prompt_len + config.eval.new_tokens <= config.base.data.seq_len,
                    f"eval.prompt_len + eval.new_tokens exceeds base.data.seq_len={config.base.data.seq_len}")
            p.check(d.data.corpus == config.base.data.corpus,
                    f"draft.data.corpus={d.data.corpus!r} differs from base.data.corpus={config.base.data.corpus!r}")


def _check_run(p, config, row):
    """A distilled draft's method: what lm_distill.validate checks of it, run now (the target does not exist
    yet, so lm_distill.validate itself runs again when the stage starts)."""
    name, mode, loss, fraction, temperature = row
    c = config.draft
    p.run(distill.check_loss, mode, loss, on_policy_fraction=fraction)
    p.check(mode != "offline", f"runs {name!r}: mode 'offline' needs a teacher store; use 'online' (fixed data)")
    p.check(loss != "ce", f"runs {name!r}: loss 'ce' is the raw draft; a row distils (fkl, rkl, jsd, tvd, tvdpp...)")
    p.check(0 <= fraction <= 1, f"runs {name!r}: on_policy_fraction must be in [0, 1], got {fraction}")
    p.check(temperature >= 0, f"runs {name!r}: sample_temperature must be >= 0 (0 = greedy), got {temperature}")
    if loss in losses.LOSSES:
        p.run(losses.check_hparams, loss, **distill.divergence_hparams(loss, jsd_beta=c.jsd_beta,
                                                                        skew_alpha=c.skew_alpha))
    p.check(1 <= c.prompt_len < c.data.seq_len, f"draft.prompt_len must be in [1, {c.data.seq_len}), got {c.prompt_len}")


# --------------------------------------------------------------------------------------------------------
# Stages 1 and 2: training (each stage reused when finished, resumed when interrupted).


def base_dir(config, workdir):
    """Where stage 1 trains the base LM: the user cache keyed by its config and the corpus fingerprint (the
    key `experiments.demo.teacher_dir` uses, so the demo's teacher is this base and a changed config trains a
    new one), or W/base when base_cache_dir is empty."""
    default = os.path.join(workdir, "base")
    if not config.base_cache_dir:
        return default
    fingerprint = text_data.load_from_config(config.base.data).corpus_fingerprint
    return run.keyed_model_dir(config.base_cache_dir, config.base, corpus_fingerprint=fingerprint, default=default)


def stage(path, stage_config, fn, *, final_step=None):
    """fn() unless this stage finished with this config; returns (result, record).

    Finished: W/<stage>/done.json exists, or (a run trained by another command, e.g. `make demo`'s teacher)
    its checkpoint of `final_step` does; either way W/<stage>/config.json must record this config (a
    changed config is left to fn, which refuses it).  The record (done.json) keeps the first completed
    run's wall and CPU seconds and the load average around it, so a rerun reports the original cost."""
    done = os.path.join(path, "done.json")
    recorded = os.path.join(path, run.CONFIG_FILE)
    same = os.path.exists(recorded) and not run.config_changes(hostio.read_json(recorded),
                                                               run.resolved_config(stage_config))
    if same and os.path.exists(done):
        print(f"   finished earlier: {path}")
        record = hostio.read_json(done)
        return record["result"], record
    if same and final_step and os.path.isdir(os.path.join(path, "checkpoints", str(final_step))):
        print(f"   finished earlier (by another command): {path}")
        return None, {"seconds": None, "cpu_seconds": None, "load_start": None, "load_end": None, "result": None}
    load0, t0, c0 = os.getloadavg()[0], time.perf_counter(), time.process_time()
    result = fn()
    record = {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
              "load_start": load0, "load_end": os.getloadavg()[0], "result": result}
    if jax.process_index() == 0:
        hostio.write_json_atomically(os.path.join(path, "done.json"), record)
    return result, record


def train_all(config, workdir):
    """Stages 1 and 2.  Returns (the target as (workdir, hf_path), {draft name: its directory}, stage records)."""
    records = {}
    if config.target_workdir or config.target_hf_path:
        target = teacher = (config.target_workdir, config.target_hf_path)
        print(f"== 1a/3 target: given ({target[0] or target[1]})")
    else:
        base = config.base_workdir or base_dir(config, workdir)
        print(f"== 1a/3 base LM ({base})")
        if not config.base_workdir:
            _, records["base"] = stage(base, config.base, lambda: lm_pretrain.train(config.base, base),
                                       final_step=config.base.steps)
        target = teacher = (base, "")
        if config.target_model.num_layers:
            path = os.path.join(workdir, "target")
            print(f"== 1a/3 target: the base embedded in {config.target_model.num_layers} x "
                  f"{config.target_model.embed_dim} -> {path}")
            _, records["target"] = stage(path, embed_stage_config(config, base),
                                         lambda: embed_target(config, base, path))
            target = (path, "")
    drafts = {}
    for i, (name, path, c) in enumerate(draft_stages(config, workdir, teacher)):
        print(f"== {'1b' if i == 0 else '2'}/3 draft {name} ({c.mode}/{c.loss}, {c.steps} steps) -> {path}")
        _, records[name] = stage(path, c, lambda c=c, path=path: lm_distill.train(c, path))
        if name != "draft_init":
            drafts[name] = path
    return target, drafts, records


# --------------------------------------------------------------------------------------------------------
# Stage 1: a real-size target with the base's predictions.


def target_config(base: TransformerConfig, target_model) -> TransformerConfig:
    """The target's config: the base's with target_model's sizes; ValueError naming what cannot hold the base
    (a smaller size, another number of query heads per kv head, LayerNorm).  RMSNorm over the wider residual
    stream averages the base's entries with zeros (mean m -> r m, r = base_dim / target_dim), so its eps is
    scaled by r here and its scales by sqrt(r) in `embed_params`:  x rsqrt(r m + r eps) sqrt(r) s =
    x rsqrt(m + eps) s, the base's value."""
    sizes = {k: target_model[k] for k in ("num_layers", "embed_dim", "num_heads", "num_kv_heads", "mlp_dim")}
    small = [k for k, v in sizes.items() if v < getattr(base, k)]
    if small:
        raise ValueError(f"target_model {sizes} is smaller than the base in {small}: it must be able to hold the base")
    if base.norm != "rmsnorm":
        raise ValueError("embedding a base in a wider model needs RMSNorm (LayerNorm's mean sees the zeros)")
    if sizes["num_heads"] * base.num_kv_heads != sizes["num_kv_heads"] * base.num_heads:
        raise ValueError(f"target_model heads {sizes['num_heads']} / kv heads {sizes['num_kv_heads']} must keep the "
                         f"base's group size {base.num_heads} / {base.num_kv_heads}")
    return dataclasses.replace(base, **sizes, norm_eps=base.norm_eps * base.embed_dim / sizes["embed_dim"])


def embed_params(base_params, target_abstract, *, norm_scale):
    """The target's parameters: each base array in the leading corner of a zero array of the target's shape
    (its first heads, hidden units, residual dimensions, layers), norm scales multiplied by norm_scale.

    Zero rows of wo / w_down and of the embedding make the extra heads, hidden units and layers add nothing
    to the residual stream, whose extra dimensions therefore stay 0; so the target's logits are the base's
    (up to float summation order).  Works for scanned and unscanned layouts alike (both carry layers first).
    """
    base = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(base_params)[0]}

    def fill(path, like):
        key = jax.tree_util.keystr(path)
        out = np.zeros(like.shape, like.dtype)
        if key in base:
            src = np.asarray(base[key])
            if src.ndim != out.ndim or any(a > b for a, b in zip(src.shape, out.shape)):
                raise ValueError(f"{key}: base shape {src.shape} does not fit in the target's {out.shape}")
            out[tuple(slice(0, n) for n in src.shape)] = src * (norm_scale if "norm']['scale']" in key else 1.0)
        return out

    return jax.tree_util.tree_map_with_path(fill, target_abstract)


def embed_stage_config(config, base):
    import ml_collections  # pylint: disable=g-import-not-at-top

    return ml_collections.ConfigDict({"base": os.path.abspath(base), "target_model": config.target_model.to_dict()})


def embed_target(config, base_path, path):
    """W/target: the base embedded in config.target_model, as a kdjax work directory (model_config.json,
    tokenizer.json, checkpoints/1).  Returns the largest |target logit - base logit| on held-out text."""
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    rules = tuple(config.draft.sharding_rules)
    base = pretrained.load_workdir(base_path, mesh=mesh, rules=rules)
    cfg = target_config(base.config, config.target_model)
    graphdef, abstract, _ = pretrained.abstract_model(cfg, mesh, rules)
    params = embed_params(base.params, abstract, norm_scale=float(np.sqrt(base.config.embed_dim / cfg.embed_dim)))
    data = text_data.load_from_config(config.base.data, tokenizer=base.tokenizer, vocab_size=base.tokenizer.vocab_size)
    tokens = held_out_prompts(data.validation.stream, num=4, prompt_len=min(cfg.max_len, 64))
    gap = float(np.max(np.abs(np.asarray(nnx.merge(graphdef, params)(tokens)) - np.asarray(base.model()(tokens)))))
    print(f"   target {cfg.num_params() / 1e6:.1f}M parameters; max |logit - base logit| on held-out text {gap:.2e}")
    if not gap < 1e-3:
        raise FloatingPointError(f"the embedded target's logits differ from the base's by {gap}")
    run.prepare_workdir(path, embed_stage_config(config, base_path))
    pretrained.save_model_files(path, cfg, base.tokenizer)
    ckpt = checkpoint.Checkpointer(os.path.join(path, "checkpoints"), save_every=1)
    try:
        ckpt.save(1, {"params": params}, {}, force=True)
    finally:
        ckpt.close()
    return {"max_logit_gap": gap, "params": int(cfg.num_params())}


# --------------------------------------------------------------------------------------------------------
# Stage 3: loading the pair, held-out prompts.


def load_any(path, *, mesh, rules, what):
    """A kdjax work directory (model_config.json) or a Hugging Face directory (config.json)."""
    if os.path.exists(os.path.join(path, run.MODEL_CONFIG_FILE)):
        return pretrained.load_model(workdir=path, mesh=mesh, rules=rules, what=what)
    return pretrained.load_model(hf_path=path, mesh=mesh, rules=rules, what=what)


def check_pair(target, drafts, *, prompt_len, new_tokens):
    """ConfigError naming the problem before anything is compiled: a draft whose tokenizer differs from the
    target's (by name: `kdjax.hf.compare_tokenizers`), or a length past a model's max_len."""
    for name, d in drafts.items():
        problem = hf_tokenizer.compare_tokenizers(target.tokenizer, d.tokenizer, hf_tokenizer.PROBE_TEXTS,
                                                  names=("target", f"draft {name}"))
        if problem:
            raise run.ConfigError(f"tokenizer mismatch between target {target.source} and draft {name} "
                                  f"{d.source}: {problem}; speculative decoding needs one tokenizer")
    for name, m in [("target", target)] + [(f"draft {n}", d) for n, d in drafts.items()]:
        if prompt_len + new_tokens > m.config.max_len:
            raise run.ConfigError(f"eval.prompt_len + eval.new_tokens = {prompt_len + new_tokens} exceeds the "
                                  f"{name}'s max_len={m.config.max_len} ({m.source})")


def held_out_prompts(stream, *, num, prompt_len):
    """[num, prompt_len] int32 windows of the validation token stream at evenly spaced offsets."""
    if len(stream) < prompt_len + num:
        raise run.ConfigError(f"the validation split has {len(stream)} tokens: too few for {num} prompts of "
                              f"{prompt_len}")
    starts = np.linspace(0, len(stream) - prompt_len - 1, num).astype(np.int64)
    return np.stack([np.asarray(stream[s:s + prompt_len], np.int32) for s in starts])


# --------------------------------------------------------------------------------------------------------
# Stage 3: acceptance, measured and predicted.


class Tally(NamedTuple):
    """`specdec`'s loop state plus, per output position, whether a draft token was tested / accepted there."""

    state: specdec.SpecState
    accepted_bl: jax.Array  # [B, L] int32
    tested_bl: jax.Array  # [B, L] int32


@functools.partial(jax.jit, static_argnames=("target_graphdef", "draft_graphdef", "opts"))
def _spec_tally(target_params, draft_params, prompt_bt, keys_b, *, target_graphdef, draft_graphdef, opts):
    target_model = nnx.merge(target_graphdef, target_params)
    draft_model = nnx.merge(draft_graphdef, draft_params)
    specdec.check_models(target_model, draft_model, prompt_bt, keys_b, opts)
    p, g = prompt_bt.shape[1], opts.gamma
    j_g = jnp.arange(g)

    def write(buf_bl, new_bg, start_b):
        return jax.vmap(lambda r, x, i: jax.lax.dynamic_update_slice(r, x, (i,)))(buf_bl, new_bg, start_b)

    def body(t):
        s = t.state
        live_b = specdec.active(s, p, opts)
        new = specdec.block_step(s, keys_b, target_model, draft_model, p, opts)
        n_b = new.accepted_b - s.accepted_b  # this block's accepted drafts (0 for finished rows)
        # Positions length .. length + gamma - 1 of the block: drafts 0..n-1 accepted; the test ran on those
        # and on the first rejected one (n < gamma).  A later block overwrites what lies past its start.
        accepted = (live_b[:, None] & (j_g < n_b[:, None])).astype(jnp.int32)
        tested = (live_b[:, None] & (j_g < jnp.minimum(n_b + 1, g)[:, None])).astype(jnp.int32)
        return Tally(new, write(t.accepted_bl, accepted, s.length_b), write(t.tested_bl, tested, s.length_b))

    init = specdec.init_state(target_model, draft_model, prompt_bt, opts)
    zeros = jnp.zeros(init.tokens_bl.shape, jnp.int32)
    out = jax.lax.while_loop(lambda t: jnp.any(specdec.active(t.state, p, opts)), body, Tally(init, zeros, zeros))
    total = p + opts.max_new_tokens
    return {**specdec.finalize(out.state, p, opts), "target_calls": out.state.target_calls,
            "accepted_b": out.state.accepted_b, "proposed_b": out.state.proposed_b,
            "accepted_bl": out.accepted_bl[:, :total], "tested_bl": out.tested_bl[:, :total]}


def spec_tally(target, draft, prompt_bt, keys_b, opts: specdec.SpecOptions):
    """`specdec.speculative_sample`'s outputs (the same loop body, `block_step`) plus `accepted_bl` and
    `tested_bl` [B, P + N]: 1 where the output token is an accepted draft / where a draft token was tested
    (accepted, or the first rejection of its block; bonus tokens are not tested)."""
    return _spec_tally(target[1], draft[1], prompt_bt, keys_b, target_graphdef=target[0], draft_graphdef=draft[0],
                       opts=opts)


@functools.partial(jax.jit, static_argnames=("target_graphdef", "draft_graphdef", "temperature", "lenience"))
def _teacher_forced(target_params, draft_params, tokens_bl, *, target_graphdef, draft_graphdef, temperature,
                    lenience):
    inputs, labels = tokens_bl[:, :-1], tokens_bl[:, 1:]
    target_logits = nnx.merge(target_graphdef, target_params)(inputs)
    draft_logits = nnx.merge(draft_graphdef, draft_params)(inputs)
    p = specdec.sampling_probs(target_logits, temperature=temperature)
    q = specdec.sampling_probs(draft_logits, temperature=temperature)
    # specdec.expected_acceptance's term, kept per position for the variance of the acceptance count.
    beta_bt = jnp.sum(jnp.minimum(q, p / lenience), axis=-1)
    logp = jax.nn.log_softmax(target_logits.astype(jnp.float32), axis=-1)
    nll_bt = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    return beta_bt, nll_bt


def teacher_forced(target, draft, tokens_bl, *, temperature, lenience=1.0):
    """Both models on the whole sequence at once: beta [B, L-1] (position t: the acceptance probability of a
    draft token proposed for position t + 1 after tokens[:t+1]) and the target's NLL of tokens[t+1] (T = 1)."""
    return _teacher_forced(target[1], draft[1], tokens_bl, target_graphdef=target[0], draft_graphdef=draft[0],
                           temperature=float(temperature), lenience=float(lenience))


def acceptance_summary(tally, beta_bt, nll_bt, *, prompt_len, gamma):
    """Measured vs predicted acceptance and block efficiency over the generated window (numpy, float64).

    alpha_hat = accepted / tested; alpha_tf = mean beta over every generated position; alpha_tested = mean
    beta over the tested positions, whose difference from alpha_hat is a martingale: its standard error is
    sqrt(sum beta (1 - beta)) / tested, and z is the difference in those units.  tau_hat = (accepted +
    blocks) / blocks with blocks = proposed / gamma per row (tokens the blocks produced, the last block's
    overshoot past N included, per target call); tau_pred = expected_block_efficiency(alpha_tf, gamma)."""
    f64 = lambda x: np.asarray(x, np.float64)
    window = slice(prompt_len, None)  # label positions P .. P+N-1 <-> beta positions P-1 .. P+N-2
    accepted, tested = f64(tally["accepted_bl"])[:, window], f64(tally["tested_bl"])[:, window]
    beta, nll = f64(beta_bt)[:, prompt_len - 1:], f64(nll_bt)[:, prompt_len - 1:]
    n_tested = tested.sum()
    var = (beta * (1 - beta) * tested).sum()
    alpha_hat = accepted.sum() / max(n_tested, 1)
    alpha_tested = (beta * tested).sum() / max(n_tested, 1)
    alpha_tf = beta.mean()
    blocks = f64(tally["proposed_b"]).sum() / gamma
    tau_hat = (f64(tally["accepted_b"]).sum() + blocks) / blocks
    return {
        "alpha_hat": alpha_hat,
        "alpha_tf": alpha_tf,
        "alpha_tested": alpha_tested,
        "se": float(np.sqrt(var) / max(n_tested, 1)),
        "z": float((accepted.sum() - (beta * tested).sum()) / np.sqrt(var)) if var > 0 else 0.0,
        "tested": int(n_tested),
        "accepted_over_proposed": float(f64(tally["accepted_b"]).sum() / f64(tally["proposed_b"]).sum()),
        "tau_hat": float(tau_hat),
        "tau_pred": float(specdec.expected_block_efficiency(alpha_tf, gamma)),
        "nll": float(nll.mean()),
    }


def measure_acceptance(target, draft, prompts, keys, *, gamma, temperature, lenience, new_tokens):
    """One (draft, gamma, temperature, eps) row of the acceptance table, on every held-out prompt at once."""
    opts = specdec.SpecOptions(max_new_tokens=new_tokens, gamma=gamma, temperature=float(temperature),
                               lenience=float(lenience))
    tally = jax.device_get(spec_tally(target, draft, prompts, keys, opts))
    beta, nll = jax.device_get(teacher_forced(target, draft, tally["tokens"], temperature=temperature,
                                              lenience=lenience))
    row = acceptance_summary(tally, beta, nll, prompt_len=prompts.shape[1], gamma=gamma)
    return row, tally["tokens"]


def acceptance_table(config, target, drafts, prompts, keys):
    """Rows for every draft x gamma x temperature (eps = 1), then the lossy sweep (every draft).
    Greedy rows also record whether SD returned exactly the target's greedy `sample`."""
    e = config.eval
    rows = []
    greedy = {}
    for temperature in e.temperatures:
        if temperature == 0:
            ref = sampling.sample(target[0], target[1], prompts, keys, max_new_tokens=e.new_tokens, temperature=0.0)
            greedy = np.asarray(ref["tokens"])
        for name, draft in drafts.items():
            for gamma in e.gammas:
                row, tokens = measure_acceptance(target, draft, prompts, keys, gamma=gamma, temperature=temperature,
                                                 lenience=1.0, new_tokens=e.new_tokens)
                if temperature == 0:
                    row["same_as_target_greedy"] = bool(np.array_equal(tokens, greedy))
                rows.append({"draft": name, "gamma": gamma, "temperature": temperature, "lenience": 1.0, **row})
                print(f"   {name:>32s} T={temperature} gamma={gamma}: alpha_hat {row['alpha_hat']:.3f} "
                      f"(teacher-forced {row['alpha_tf']:.3f}), tau_hat {row['tau_hat']:.2f}")
    for name in drafts:
        for eps in e.lenience:
            if eps == 1.0 and e.lossy_temperature in e.temperatures and e.lossy_gamma in e.gammas:
                continue  # already measured above
            row, _ = measure_acceptance(target, drafts[name], prompts, keys, gamma=e.lossy_gamma,
                                        temperature=e.lossy_temperature, lenience=eps, new_tokens=e.new_tokens)
            rows.append({"draft": name, "gamma": e.lossy_gamma, "temperature": e.lossy_temperature,
                         "lenience": eps, **row})
    return rows


# --------------------------------------------------------------------------------------------------------
# Stage 3: wall clock at batch 1.


@functools.lru_cache(maxsize=None)
def _jit_sample(graphdef, new_tokens, temperature):
    # One jitted function per model and setting, so that every timing round reuses its compiled program.
    return jax.jit(functools.partial(sampling.sample, graphdef, max_new_tokens=new_tokens, temperature=temperature))


def _sample_fn(pair, prompts, keys, *, new_tokens, temperature):
    """Target-only (or draft-only) `sampling.sample`, each prompt at batch 1, one after the other."""
    fn = _jit_sample(pair[0], new_tokens, float(temperature))
    return lambda: [fn(pair[1], prompts[i:i + 1], keys[i:i + 1]) for i in range(len(prompts))]


def _spec_fn(target, draft, prompts, keys, *, new_tokens, gamma, temperature, lenience=1.0):
    """`specdec.speculative_sample`, each prompt at batch 1, one after the other."""
    call = functools.partial(specdec.speculative_sample, target, draft, max_new_tokens=new_tokens, gamma=gamma,
                             temperature=temperature, lenience=lenience)
    return lambda: [call(prompts[i:i + 1], keys[i:i + 1]) for i in range(len(prompts))]


def _speed_row(name, t, out, *, tokens, base, gamma, temperature, lenience, costs):
    """One SD contender of a round-robin: tokens/s, speed-up over target-only, tau and alpha at batch 1."""
    calls = sum(int(o["target_calls"]) for o in out)
    acc = sum(int(o["accepted_b"][0]) for o in out) / max(sum(int(o["proposed_b"][0]) for o in out), 1)
    tau = tokens / calls
    v, c, d2 = costs["v"][gamma], costs["c"], costs["d2"]
    return {"draft": name, "gamma": gamma, "temperature": temperature, "lenience": lenience,
            "tokens_per_s": tokens / t, "target_tokens_per_s": tokens / base, "speedup": base / t,
            "tau_batch1": tau, "accepted_over_proposed": acc, "target_calls": calls,
            # A block in target-token units: gamma - 1 one-token draft forwards, the draft's two-token
            # catch-up, one (gamma + 1)-token verification.
            "cost_model": tau / ((gamma - 1) * c + c * d2 + v)}


def speed_round(target, drafts, prompts, keys, settings, *, temperature, new_tokens, repeats, costs):
    """One round-robin at `temperature`: target-only `sample` and SD with every draft at every (gamma, eps)
    of `settings`, all timed alike (`best_times`).  Rows as `_speed_row`; greedy rows also record whether SD
    returned exactly the target's greedy decoding."""
    fns = [_sample_fn(target, prompts, keys, new_tokens=new_tokens, temperature=temperature)]
    labels = []
    for gamma, eps in settings:
        for name, draft in drafts.items():
            fns.append(_spec_fn(target, draft, prompts, keys, new_tokens=new_tokens, gamma=gamma,
                                temperature=temperature, lenience=eps))
            labels.append((name, gamma, eps))
    times, outs = timing.best_times(fns, repeats=repeats)
    tokens = len(prompts) * new_tokens
    rows = []
    for (name, gamma, eps), t, out in zip(labels, times[1:], outs[1:]):
        row = _speed_row(name, t, out, tokens=tokens, base=times[0], gamma=gamma, temperature=temperature,
                         lenience=eps, costs=costs)
        if temperature == 0:
            row["same_as_target_greedy"] = all(np.array_equal(o["tokens"], r["tokens"]) for o, r in zip(out, outs[0]))
        rows.append(row)
        print(f"   T={temperature:g} gamma={gamma} eps={eps:g} {name}: {row['tokens_per_s']:.0f} tok/s vs target "
              f"{row['target_tokens_per_s']:.0f} ({row['speedup']:.2f}x)")
    return rows


def speed_table(config, target, drafts, prompts, keys):
    """Wall clock at batch 1: the cost ratio c, the verification cost v per gamma, then one round-robin per
    temperature (every timing gamma, every draft) and one for the lossy sweep (every eps, every draft)."""
    e = config.eval
    prompts, keys = prompts[:e.timing_prompts], keys[:e.timing_prompts]
    n, reps, tokens = e.new_tokens, e.timing_repeats, e.timing_prompts * e.new_tokens
    first = next(iter(drafts.values()))
    (t_target, t_draft), _ = timing.best_times([_sample_fn(target, prompts, keys, new_tokens=n, temperature=0.0),
                                         _sample_fn(first, prompts, keys, new_tokens=n, temperature=0.0)],
                                        repeats=reps)
    position = e.prompt_len + n // 2
    costs = {"c": t_draft / t_target, "target_ms_per_token": 1e3 * t_target / tokens,
             "draft_ms_per_token": 1e3 * t_draft / tokens,
             "d2": timing.forward_cost(first, tokens=2, position=position, repeats=reps),
             "v": {g: timing.forward_cost(target, tokens=g + 1, position=position, repeats=reps)
                   for g in sorted(set(e.timing_gammas) | {e.lossy_gamma})}}
    print(f"   c = {costs['c']:.3f} (target {costs['target_ms_per_token']:.2f} ms/token, draft "
          f"{costs['draft_ms_per_token']:.3f}); v = " + ", ".join(f"{g}: {v:.2f}" for g, v in costs["v"].items()))
    kw = dict(new_tokens=n, repeats=reps, costs=costs)
    rows = []
    for temperature in e.temperatures:
        rows += speed_round(target, drafts, prompts, keys, [(g, 1.0) for g in e.timing_gammas],
                            temperature=temperature, **kw)
    lossy = [(e.lossy_gamma, eps) for eps in e.lenience
             if eps != 1.0 or e.lossy_gamma not in e.timing_gammas or e.lossy_temperature not in e.temperatures]
    rows += speed_round(target, drafts, prompts, keys, lossy, temperature=e.lossy_temperature, **kw)
    return costs, rows


# --------------------------------------------------------------------------------------------------------
# Stage 3: the evaluation, cached in W/eval by what it measured.


def _describe(m, what):
    return {"source": m.source, "step": int(m.step), "params": int(m.config.num_params()), "what": what}


def cached(path, key, fn):
    """fn()'s JSON result, reused from `path` when it was computed for the same `key`."""
    if os.path.exists(path):
        record = hostio.read_json(path)
        if record.get("key") == key:
            print(f"   reusing {path}")
            return record["value"]
    value = fn()
    if jax.process_index() == 0:
        hostio.write_json_atomically(path, {"key": key, "value": value})
    return value


def evaluate(config, workdir, target_path, draft_paths):
    """Loads the target and the drafts on one device, checks the pair, measures; returns the results dict.

    target_path: (workdir, hf_path); draft_paths: {name: directory} (kdjax or Hugging Face), the first the
    baseline of every ratio (the raw draft)."""
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    rules = tuple(config.draft.sharding_rules)
    target = pretrained.load_model(workdir=target_path[0], hf_path=target_path[1], mesh=mesh, rules=rules,
                                   what="target")
    drafts = {name: load_any(path, mesh=mesh, rules=rules, what=f"draft {name}") for name, path in draft_paths.items()}
    e = config.eval
    check_pair(target, drafts, prompt_len=e.prompt_len, new_tokens=e.new_tokens)
    # The held-out text read with the target's tokenizer (check_pair made sure the drafts share it).
    data = text_data.load_from_config(config.draft.data, tokenizer=target.tokenizer,
                                      vocab_size=target.tokenizer.vocab_size)
    prompts = held_out_prompts(data.validation.stream, num=e.num_prompts, prompt_len=e.prompt_len)
    keys = jax.random.split(jax.random.key(e.seed), e.num_prompts)
    t_pair = (target.graphdef, target.params)
    d_pairs = {name: (d.graphdef, d.params) for name, d in drafts.items()}
    # What each table measured: the models (source and step), the settings it reads, the backend.
    settings = {k: v for k, v in run.resolved_config(e).items() if k != "drafts"}
    key = {"target": _describe(target, "target"), "drafts": {n: _describe(d, n) for n, d in drafts.items()},
           "backend": jax.default_backend(),
           "eval": {k: v for k, v in settings.items() if not k.startswith("timing_")}}
    os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
    t0, c0 = time.perf_counter(), time.process_time()
    print(f"== 3/3 acceptance: {e.num_prompts} held-out prompts x {e.new_tokens} tokens, drafts {list(drafts)}")
    acceptance = cached(os.path.join(workdir, "eval", "acceptance.json"), key,
                        lambda: acceptance_table(config, t_pair, d_pairs, prompts, keys))
    print(f"== 3/3 wall clock: batch 1, {e.timing_prompts} prompt(s) x {e.new_tokens} tokens")
    costs, speed = cached(os.path.join(workdir, "eval", "speed.json"),
                          {**key, "eval": settings, "cpus": os.cpu_count()},
                          lambda: speed_table(config, t_pair, d_pairs, prompts, keys))
    return {"target": key["target"], "drafts": key["drafts"], "acceptance": acceptance, "costs": costs,
            "speed": speed, "eval_seconds": time.perf_counter() - t0, "eval_cpu_seconds": time.process_time() - c0}


def check_targets(results, *, gamma=3):
    """The issue's targets, read off the tables for every distilled draft (never tuned: they only report)."""
    names = list(results["drafts"])
    raw = names[0]
    acc = [r for r in results["acceptance"] if r["lenience"] == 1.0]
    tau = {(r["draft"], r["gamma"], r["temperature"]): r["tau_hat"] for r in acc}
    out = {"tau_ratio": {}, "speedup_greedy": {}, "alpha_gap": None}
    for name in names[1:]:
        for t in sorted({r["temperature"] for r in acc}):
            if (raw, gamma, t) in tau and (name, gamma, t) in tau:
                out["tau_ratio"][f"{name} | T={t:g}"] = tau[(name, gamma, t)] / tau[(raw, gamma, t)]
        greedy = [r for r in results["speed"] if r["draft"] == name and r["temperature"] == 0 and r["lenience"] == 1.0]
        if greedy:
            best = max(greedy, key=lambda r: r["speedup"])
            out["speedup_greedy"][name] = {"gamma": best["gamma"], "speedup": best["speedup"]}
    gaps = [abs(r["alpha_hat"] - r["alpha_tf"]) for r in acc]
    worst = max(acc, key=lambda r: abs(r["alpha_hat"] - r["alpha_tf"]))
    out["alpha_gap"] = {"max": max(gaps), "mean": float(np.mean(gaps)), "worst": {k: worst[k] for k in (
        "draft", "gamma", "temperature", "alpha_hat", "alpha_tf", "alpha_tested", "se")},
        "max_abs_z": max(abs(r["z"]) for r in acc)}
    return out


# --------------------------------------------------------------------------------------------------------
# Outputs.


def _acc_lookup(results):
    return {(r["draft"], r["gamma"], r["temperature"], r["lenience"]): r for r in results["acceptance"]}


def _setup_lines(config, results):
    t, drafts = results["target"], results["drafts"]
    load = "load average {:.2f} / {:.2f} / {:.2f}".format(*os.getloadavg())
    lines = [
        "# DistillSpec with kdjax: draft alignment and speculative decoding",
        "",
        f"Command: `{results['command']}`.  {os.cpu_count()} CPU core(s), JAX backend {results['backend']}; "
        f"{load} when this was written.",
        "",
        f"Target: {t['params'] / 1e6:.1f}M parameters ({t['source']}, step {t['step']}).  Drafts "
        + ", ".join(f"**{n}** {d['params'] / 1e6:.2f}M ({d['source']}, step {d['step']})" for n, d in drafts.items())
        + ".  The first draft is the baseline of every ratio.",
    ]
    if results.get("stages"):
        lines += ["", "| stage | wall s | CPU s | load avg at start / end | method |", "|---|---:|---:|---|---|"]
        for name, r in results["stages"].items():
            if r["seconds"] is None:
                lines.append(f"| {name} | — | — | — | {r.get('method', '')}: finished earlier by another command |")
                continue
            lines.append(f"| {name} | {r['seconds']:.0f} | {r['cpu_seconds']:.0f} | {r['load_start']:.1f} / "
                         f"{r['load_end']:.1f} | {r.get('method', '')} |")
        lines.append(f"| evaluation | {results['eval_seconds']:.0f} | {results['eval_cpu_seconds']:.0f} | | |")
    return lines


def _acceptance_lines(config, results):
    e, raw = config.eval, list(results["drafts"])[0]
    acc = _acc_lookup(results)
    lines = [
        "", "## Acceptance and block efficiency (exact SD, eps = 1)", "",
        f"{e.num_prompts} held-out prompts of {e.prompt_len} tokens, {e.new_tokens} new tokens each, all in one "
        "batch.  alpha_hat = accepted / tested draft tokens (tested: accepted, or the first rejection of a "
        "block).  alpha_tf = mean over every generated position of the teacher-forced sum_x min(p, q) (p, q "
        "the target's and the draft's sampling distributions on the generated text); alpha_tested = the same "
        "mean over the tested positions only, alpha_hat's exact expectation (SE its standard error, z the "
        "difference in SEs).  tau_hat = tokens the blocks produced / target calls; tau(alpha_tf) = "
        "(1 - a^(g+1)) / (1 - a).  accepted / proposed = `specdec`'s counters (= (tau_hat - 1) / gamma).",
        "",
        "| T | gamma | draft | alpha_hat | alpha_tf | alpha_hat - alpha_tf | alpha_tested ± SE (z) | "
        "accepted / proposed | tau_hat | tau(alpha_tf) | tau_hat / raw's | same tokens as target greedy |",
        "|---:|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in results["acceptance"]:
        if r["lenience"] != 1.0:
            continue
        base = acc[(raw, r["gamma"], r["temperature"], 1.0)]["tau_hat"]
        same = {True: "yes", False: "**no**"}.get(r.get("same_as_target_greedy"), "—")
        lines.append(
            f"| {r['temperature']:g} | {r['gamma']} | {r['draft']} | {r['alpha_hat']:.3f} | {r['alpha_tf']:.3f} | "
            f"{r['alpha_hat'] - r['alpha_tf']:+.3f} | {r['alpha_tested']:.3f} ± {r['se']:.3f} ({r['z']:+.1f}) | "
            f"{r['accepted_over_proposed']:.3f} | {r['tau_hat']:.2f} | {r['tau_pred']:.2f} | "
            f"{r['tau_hat'] / base:.3f} | {same} |")
    return lines


def _speed_lines(config, results):
    c, acc = results["costs"], _acc_lookup(results)
    lines = [
        "", "## Wall clock at batch 1", "",
        f"Target-only `sampling.sample`: {c['target_ms_per_token']:.2f} ms/token; draft-only "
        f"{c['draft_ms_per_token']:.3f} ms/token: cost ratio **c = {c['c']:.3f}**.  Verification cost v = one "
        "target forward of gamma + 1 tokens / one of 1 token: "
        + ", ".join(f"gamma {g}: {v:.2f}" for g, v in c["v"].items())
        + f"; the draft's two-token catch-up d2 = {c['d2']:.2f}.  {config.eval.timing_prompts} prompt(s) x "
        f"{config.eval.new_tokens} tokens, best of {config.eval.timing_repeats} round-robin calls.  Predicted: "
        "Leviathan's expected_speedup(alpha_tf, gamma, c) = tau(alpha_tf) / (gamma c + 1), which takes v = d2 = 1; "
        "the cost model tau / ((gamma - 1) c + c d2 + v) with this batch-1 run's tau and the measured costs.",
        "",
        "| T | gamma | draft | SD tok/s | target-only tok/s | **speed-up** | expected_speedup(alpha_tf) | "
        "cost model | tau (batch 1) | same tokens as target greedy |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results["speed"]:
        if r["lenience"] != 1.0:
            continue
        a = acc.get((r["draft"], r["gamma"], r["temperature"], 1.0))
        expected = specdec.expected_speedup(a["alpha_tf"], r["gamma"], c["c"]) if a else float("nan")
        same = {True: "yes", False: "**no**"}.get(r.get("same_as_target_greedy"), "—")
        lines.append(
            f"| {r['temperature']:g} | {r['gamma']} | {r['draft']} | {r['tokens_per_s']:.0f} | "
            f"{r['target_tokens_per_s']:.0f} | **{r['speedup']:.2f}x** | {expected:.2f}x | {r['cost_model']:.2f}x | "
            f"{r['tau_batch1']:.2f} | {same} |")
    return lines


def _lossy_lines(config, results):
    e = config.eval
    speed = {(r["draft"], r["lenience"]): r for r in results["speed"]
             if r["gamma"] == e.lossy_gamma and r["temperature"] == e.lossy_temperature}
    lines = [
        "", f"## Lossy speculative sampling (gamma {e.lossy_gamma}, T = {e.lossy_temperature:g})", "",
        "A draft token is accepted with probability min(1, p / (eps q)); eps = 1 is exact.  NLL = the target's "
        "mean negative log-likelihood (T = 1) of the generated tokens, on the acceptance batch: eps = 1 samples "
        "the target itself, so its NLL is the baseline; a smaller eps trades that for speed.",
        "",
        "| draft | eps | alpha_hat | alpha_tf | tau_hat | target NLL | speed-up (batch 1) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["acceptance"]:
        if r["gamma"] != e.lossy_gamma or r["temperature"] != e.lossy_temperature:
            continue
        s = speed.get((r["draft"], r["lenience"]))
        lines.append(f"| {r['draft']} | {r['lenience']:g} | {r['alpha_hat']:.3f} | {r['alpha_tf']:.3f} | "
                     f"{r['tau_hat']:.2f} | {r['nll']:.3f} | " + (f"{s['speedup']:.2f}x |" if s else "— |"))
    return lines + ["", "![tau vs gamma](tau_vs_gamma.png)", "", "![speed-up vs eps](speedup_vs_eps.png)", ""]


def _target_lines(results):
    t = results["targets"]
    mark = lambda ok: "**met**" if ok else "**missed**"
    lines = ["", "## The issue's targets", ""]
    for k, v in t["tau_ratio"].items():
        lines.append(f"- tau_hat(distilled) / tau_hat(raw) at gamma 3, {k}: {v:.3f} (target >= 1.10: {mark(v >= 1.10)})")
    for name, s in t["speedup_greedy"].items():
        lines.append(f"- SD with {name} vs target-only, T = 0, batch 1: best {s['speedup']:.2f}x at gamma "
                     f"{s['gamma']} (target >= 2x: {mark(s['speedup'] >= 2.0)})")
    g = t["alpha_gap"]
    w = g["worst"]
    lines.append(
        f"- |alpha_hat - alpha_tf|: max {g['max']:.3f}, mean {g['mean']:.3f} (target <= 0.02: {mark(g['max'] <= 0.02)});"
        f" worst {w['draft']} gamma {w['gamma']} T={w['temperature']:g}: alpha_hat {w['alpha_hat']:.3f}, alpha_tf "
        f"{w['alpha_tf']:.3f}, alpha at the tested positions {w['alpha_tested']:.3f} ± {w['se']:.3f}.  Against "
        f"alpha_tested (the exact expectation) the largest |z| is {g['max_abs_z']:.1f}: what differs from "
        "alpha_tf is which positions are tested (bonus tokens are not, and acceptance runs in streaks), not "
        "the acceptance rule.")
    return lines


def markdown(config, results):
    return "\n".join(_setup_lines(config, results) + _acceptance_lines(config, results)
                     + _speed_lines(config, results) + _lossy_lines(config, results) + _target_lines(results)) + "\n"


def plot(config, workdir, results):
    """W/tau_vs_gamma.png (measured solid, predicted dashed, per draft and temperature) and
    W/speedup_vs_eps.png (measured batch-1 speed-up and the target's NLL against eps)."""
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

    exact = [r for r in results["acceptance"] if r["lenience"] == 1.0]
    temps = sorted({r["temperature"] for r in exact})
    fig, axes = plt.subplots(1, len(temps), figsize=(5 * len(temps), 3.8), squeeze=False)
    for ax, t in zip(axes[0], temps):
        for i, name in enumerate(results["drafts"]):
            rows = sorted((r for r in exact if r["draft"] == name and r["temperature"] == t), key=lambda r: r["gamma"])
            color = f"C{i}"
            ax.plot([r["gamma"] for r in rows], [r["tau_hat"] for r in rows], "o-", color=color, label=name)
            ax.plot([r["gamma"] for r in rows], [r["tau_pred"] for r in rows], "--", color=color, alpha=0.6)
        gammas = sorted(config.eval.gammas)
        ax.plot(gammas, [g + 1 for g in gammas], ":", color="gray", label="gamma + 1 (alpha = 1)")
        ax.set(title=f"T = {t:g} (dashed: tau(alpha_tf))", xlabel="gamma", ylabel="tokens per target call")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "tau_vs_gamma.png"), dpi=100)
    plt.close(fig)
    e = config.eval
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, name in enumerate(results["drafts"]):
        sp = sorted((r for r in results["speed"] if r["draft"] == name and r["gamma"] == e.lossy_gamma
                     and r["temperature"] == e.lossy_temperature), key=lambda r: r["lenience"])
        ac = sorted((r for r in results["acceptance"] if r["draft"] == name and r["gamma"] == e.lossy_gamma
                     and r["temperature"] == e.lossy_temperature), key=lambda r: r["lenience"])
        a1.plot([r["lenience"] for r in sp], [r["speedup"] for r in sp], "o-", color=f"C{i}", label=name)
        a2.plot([r["lenience"] for r in ac], [r["nll"] for r in ac], "o-", color=f"C{i}", label=name)
    a1.set(xscale="log", xlabel="eps (lenience)", ylabel="speed-up over target-only (batch 1)",
           title=f"gamma {e.lossy_gamma}, T = {e.lossy_temperature:g}")
    a2.set(xscale="log", xlabel="eps (lenience)", ylabel="target NLL of the generated text")
    a1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "speedup_vs_eps.png"), dpi=100)
    plt.close(fig)


def write_outputs(config, workdir, results):
    results["targets"] = check_targets(results)
    if jax.process_index() == 0:
        hostio.write_json_atomically(os.path.join(workdir, "results.json"), results)
        text = markdown(config, results)
        hostio.write_atomically(os.path.join(workdir, "results.md"), text.encode())
        plot(config, workdir, results)
        print(text)
    return results


def run_all(config, workdir, *, eval_only=False, command="python -m experiments.distillspec"):
    """Every stage (or, eval_only, the evaluation of config.eval.drafts against the given target); returns
    the results dict written to W/results.json."""
    validate(config, eval_only=eval_only)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise run.ConfigError(f"work directory {workdir!r} exists and is a file, not a directory")
    stages = {}
    if eval_only:
        target = (config.target_workdir, config.target_hf_path)
        drafts = dict(parse_drafts(config.eval.drafts))
    else:
        target, drafts, stages = train_all(config, workdir)
        methods = {"base": "pretraining (lm_pretrain)", "target": "the base embedded (embed_params)",
                   "draft_init": f"cross-entropy, {config.draft_init_steps} steps", RAW: "cross-entropy",
                   **{r[0]: f"{r[1]}/{r[2]} lambda={r[3]:g} T_sample={r[4]:g}" for r in config.runs}}
        for name, record in stages.items():
            record["method"] = methods[name]
    results = evaluate(config, workdir, target, drafts)
    results.update(stages=stages, command=command, backend=jax.default_backend())
    return write_outputs(config, workdir, results)


def main(argv):
    del argv
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    # A rerun compiles nothing it compiled before (the evaluation has one program per gamma and temperature).
    cli.enable_compilation_cache(os.path.join(os.path.expanduser("~/.cache/kdjax"), "jax"))
    command = " ".join(["python -m experiments.distillspec"] + sys.argv[1:])
    cli.run_main(lambda: run_all(config, workdir, eval_only=flags.FLAGS.eval_only, command=command))


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, cli.config_help("configs/distillspec.py"))
    flags.DEFINE_string("workdir", None, "Where every stage's outputs go.")
    flags.DEFINE_bool("eval_only", False, "Only evaluate config.eval.drafts against the given target.")
    cli.check_config_overrides(sys.argv)
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)

"""Diversity-rewarded CFG distillation end to end: conditional teacher -> classifier -> students -> evaluation.

  python -m experiments.cfg_distill --config configs/cfg_distill.py --workdir W [--config.k=v]

Stages, each in its own directory and resumable (a rerun finishes what is missing, then re-evaluates):
  W/teacher            a category-conditional LM on the labelled stdlib corpus (`kdjax.data.categories`),
                       trained with condition dropout (prefix -> null prefix with probability p_uncond), so one
                       model gives p(y | c) and p(y | null);  a kdjax work directory (pretrained.load_workdir);
  W/classifier         a small Transformer classifier of the category from real windows (the quality metric);
  W/student_b<beta>    one student per beta, initialised from the teacher, trained on its own samples against
                       the teacher's CFG distribution at config.guidance (`kdjax.guidance.make_objective`),
                       plus beta x the REINFORCE diversity reward;
  W/eval/<model>.json  each evaluated model's metrics (a rerun reuses them when the model and the evaluation
                       settings are unchanged).
Then W/results.json, W/results.md and W/pareto.png: the CFG teacher at every eval.guidances, the students,
and the weight interpolation theta(kappa) between the beta = 0 student and the beta = interp_beta one.
Formulas and a measured table: docs/cfg_distill.md.
"""

import hashlib
import json
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from kdjax import checkpoint, cli, distill, guidance, hostio, loop, losses, pretrained, run, sharding, steps
from kdjax.data import categories
from kdjax.models import sampling
from kdjax.models.text_classifier import TextClassifier, TextClassifierConfig, class_probabilities
from kdjax.models.transformer import Transformer

STAGE_KEYS = ("steps", "batch_size", "learning_rate", "warmup_steps")
SHARED_KEYS = ("seed", "accum_steps", "weight_decay", "grad_clip", "log_every", "eval_every", "eval_batches",
               "checkpoint_every", "mesh", "sharding_rules", "distributed", "debug_sleep_per_step",
               "allow_resume_changes")
CLASSIFIER_CONFIG_FILE = "classifier_config.json"


# ------------------------------------------------------------------------------------------------------
# Validation and the stages' own configs.


def validate(config):
    """Every check that needs no data or model, before anything is read or written."""
    with run.Problems("cfg_distill config") as p:
        for name in ("teacher", "classifier", "student"):
            run.check_common(p.prefixed(name), stage_config(config, name))
        p.check(0.0 < config.teacher.p_uncond < 1.0,
                f"teacher.p_uncond must be in (0, 1) so the teacher learns both distributions, got {config.teacher.p_uncond}")
        p.check(config.data.vocab_size >= 257, f"data.vocab_size must be >= 257, got {config.data.vocab_size}")
        p.check(config.data.prefix_len >= 0, f"data.prefix_len must be >= 0, got {config.data.prefix_len}")
        p.check(config.max_new_tokens >= 2, f"max_new_tokens must be >= 2, got {config.max_new_tokens}")
        p.check(config.max_new_tokens < config.data.seq_len,
                f"max_new_tokens={config.max_new_tokens} must be < data.seq_len={config.data.seq_len} (the prefix "
                "and the generation must fit the teacher's context)")
        p.check(config.classifier.min_len >= 1 and config.classifier.min_len <= config.max_new_tokens,
                f"classifier.min_len must be in [1, max_new_tokens], got {config.classifier.min_len}")
        p.check(config.guidance >= 0, f"guidance must be >= 0, got {config.guidance}")
        p.check(config.loss in losses.LOSSES, f"loss must be one of {tuple(losses.LOSSES)}, got {config.loss!r}")
        if config.loss in losses.LOSSES:
            p.run(losses.check_hparams, config.loss, **_hparams(config))
        p.check(config.temperature > 0, f"temperature must be > 0, got {config.temperature}")
        p.check(config.sample_temperature > 0, f"sample_temperature must be > 0, got {config.sample_temperature}")
        betas = tuple(config.betas)
        p.check(0.0 in betas and all(b >= 0 for b in betas) and len(set(betas)) == len(betas),
                f"betas must be distinct, >= 0 and include 0 (the quality model), got {betas}")
        p.check(config.interp_beta in betas and config.interp_beta > 0,
                f"interp_beta={config.interp_beta} must be one of the positive betas {betas}")
        p.check(config.num_generations >= (3 if any(b > 0 for b in betas) else 1),
                f"num_generations must be >= 3 when a beta > 0 (the leave-one-out baseline of the pairwise "
                f"diversity reward; with 2 every advantage is 0), got {config.num_generations}")
        p.check(config.embedding in guidance.EMBEDDINGS,
                f"embedding must be one of {guidance.EMBEDDINGS}, got {config.embedding!r}")
        p.check(all(0.0 <= k <= 1.0 for k in config.kappas), f"kappas must be in [0, 1], got {tuple(config.kappas)}")
        e = config.eval
        p.check(config.guidance in tuple(e.guidances),
                f"eval.guidances {tuple(e.guidances)} must include guidance={config.guidance} (the targets compare to it)")
        p.check(all(g >= 0 for g in e.guidances), f"eval.guidances must be >= 0, got {tuple(e.guidances)}")
        p.check(e.generations >= 2, f"eval.generations must be >= 2 (diversity is within a prompt), got {e.generations}")
        p.check(e.groups_per_category >= 1, f"eval.groups_per_category must be >= 1, got {e.groups_per_category}")
        p.run(sharding.make_mesh, config.mesh)


def _hparams(config):
    return distill.divergence_hparams(config.loss, jsd_beta=config.jsd_beta, skew_alpha=config.skew_alpha)


def stage_config(config, stage: str, **identity):
    """A stage's own config: what kdjax.run reads and W/<stage>/config.json records (a resume must match it)."""
    c = config.copy_and_resolve_references()
    out = {k: c[stage][k] for k in STAGE_KEYS}
    out.update({k: c[k] for k in SHARED_KEYS})
    out.update(identity)
    return ml_collections.ConfigDict(out)


def student_dir(workdir, beta):
    return os.path.join(workdir, f"student_b{beta:g}")


# ------------------------------------------------------------------------------------------------------
# Stage timing (wall, CPU and the machine's load, so a time measured on a busy machine can be read).


def timed(workdir, fn):
    """fn() once; W/<stage>/wall_time.json keeps the first run's wall and CPU seconds and the 1-minute load."""
    path = os.path.join(workdir, "wall_time.json")
    usage = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
    load0, t0, c0 = os.getloadavg()[0], time.perf_counter(), usage()
    result = fn()
    if not os.path.exists(path) and jax.process_index() == 0:
        hostio.write_json_atomically(path, {"seconds": time.perf_counter() - t0, "cpu_seconds": usage() - c0,
                                            "load_start": load0, "load_end": os.getloadavg()[0]})
    return result, hostio.read_json(path)


# ------------------------------------------------------------------------------------------------------
# Data.


def load_data(config) -> categories.ConditionalData:
    d = config.data
    return categories.load_conditional_data(vocab_size=d.vocab_size, seq_len=d.seq_len, cache_dir=d.cache_dir,
                                            max_files=d.max_files, val_fraction=d.val_fraction,
                                            prefix_len=d.prefix_len)


def _host_batches(source, sc, keys):
    """Padded validation batches with only `keys` (+ mask), at most sc.eval_batches of them."""
    batches = run.eval_batches(source, sc)
    for i, b in enumerate(batches):
        if sc.eval_batches and i >= sc.eval_batches:
            return
        yield {k: b[k] for k in (*keys, "mask")}


def _example(source, sc, keys):
    first = source[0]
    local = run.local_batch_size(sc)
    return {k: np.zeros((local, *np.shape(first[k])), np.asarray(first[k]).dtype) for k in keys}


# ------------------------------------------------------------------------------------------------------
# Stage 1: the conditional teacher.


def train_teacher(config, data, workdir) -> dict:
    """Trains (or resumes) the conditional LM with condition dropout; returns its validation metrics."""
    sc = stage_config(config, "teacher", p_uncond=config.teacher.p_uncond, model=config.teacher.model.to_dict(),
                      data=config.data.to_dict(), data_fingerprint=data.fingerprint)
    mesh, rules = sharding.make_mesh(sc.mesh), tuple(sc.sharding_rules)
    model_cfg = run.new_model_config(config.teacher.model, vocab_size=data.tokenizer.vocab_size,
                                     max_len=config.data.seq_len)
    run.prepare_workdir(workdir, sc)
    pretrained.save_model_files(workdir, model_cfg, data.tokenizer)
    print(f"teacher: {model_cfg.num_params() / 1e6:.2f}M parameters; p_uncond {sc.p_uncond}")
    tx = run.make_optimizer(sc)
    spec = steps.train_state_spec(lambda r: Transformer(model_cfg, rngs=r), tx, seed=sc.seed, mesh=mesh, rules=rules)
    keys = ("tokens", "loss_mask")
    batch_sh = sharding.batch_shardings(_example(data.train, sc, keys), mesh, rules)
    eval_sh = sharding.batch_shardings({**_example(data.train, sc, keys), "mask": np.zeros((1, 1))}, mesh, rules)
    objective = guidance.conditional_lm_objective(null_prefix_p=data.null_p, rate=sc.p_uncond)
    train_step = steps.jit_train_step(graphdef=spec.graphdef, tx=tx, loss_fn=objective, state_shardings=spec.shardings,
                                      batch_shardings=batch_sh, mesh=mesh, accum_steps=sc.accum_steps)
    null = jnp.asarray(data.null_p)

    def metrics(model, batch, frozen):
        del frozen
        tokens, mask = batch["tokens"], batch["loss_mask"] * batch["mask"]
        ce = lambda t: losses.cross_entropy(model(t[:, :-1]), t[:, 1:], mask)
        return {"ce": ce(tokens), "ce_null": ce(guidance.with_prefix(tokens, null))}

    eval_step = steps.jit_eval_step(graphdef=spec.graphdef, metrics_fn=metrics, params_shardings=spec.shardings.params,
                                    batch_shardings=eval_sh, mesh=mesh)

    def run_eval(params):
        m = loop.evaluate(eval_step, params, _host_batches(data.validation, sc, keys), eval_sh)
        return {"val/ce": m["ce"], "val/ce_null": m["ce_null"], "val/pmi_per_token": m["ce_null"] - m["ce"]}

    _, val = run.fit(workdir, sc, spec=spec, data_iter=_train_iter(data.train, sc, keys), train_step=train_step,
                     batch_shardings=batch_sh, run_eval=run_eval,
                     tokens_per_step=sc.batch_size * config.data.seq_len, desc="teacher")
    return val


class _Select:
    """A source view with only some fields (the train batches then hold nothing the step does not read)."""

    def __init__(self, source, keys):
        self.source, self.keys = source, keys

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        ex = self.source[i]
        return {k: ex[k] for k in self.keys}


def _train_iter(source, sc, keys):
    return run.train_iterator(_Select(source, keys), sc)


# ------------------------------------------------------------------------------------------------------
# Stage 2: the category classifier (the quality metric).


def classifier_config(config, data) -> TextClassifierConfig:
    return TextClassifierConfig(vocab_size=data.tokenizer.vocab_size, num_classes=categories.num_categories(),
                                max_len=config.max_new_tokens, **config.classifier.model.to_dict())


def classifier_inputs(tokens_bt, loss_mask_bt, prefix_len, length):
    """A window's first `length` tokens after the prefix and their validity: [B, T+1], [B, T] -> [B, N] x2."""
    return (tokens_bt[:, prefix_len: prefix_len + length],
            loss_mask_bt[:, prefix_len - 1: prefix_len - 1 + length])


def classifier_loss(*, prefix_len, length, min_len):
    """CE of the category on real windows cut to a random length in [min_len, length] (generations may stop
    early at EOS); (sum, count) over rows."""

    def loss_fn(model, batch, rng, frozen, extra):
        del frozen, extra
        tokens, mask = classifier_inputs(batch["tokens"], batch["loss_mask"], prefix_len, length)
        cut_b = jax.random.randint(rng, (tokens.shape[0],), min_len, length + 1)
        mask = mask * (jnp.arange(length)[None, :] < cut_b[:, None])
        ce = optax.softmax_cross_entropy_with_integer_labels(model(tokens, mask), batch["label"])
        n = jnp.asarray(ce.shape[0], jnp.float32)
        return jnp.sum(ce), n, {"ce": (jnp.sum(ce), n)}

    return loss_fn


def train_classifier(config, data, workdir) -> dict:
    """Trains (or resumes) the category classifier on the train windows; returns its validation accuracy."""
    sc = stage_config(config, "classifier", model=config.classifier.model.to_dict(), min_len=config.classifier.min_len,
                      max_new_tokens=config.max_new_tokens, data=config.data.to_dict(),
                      data_fingerprint=data.fingerprint)
    mesh, rules = sharding.make_mesh(sc.mesh), tuple(sc.sharding_rules)
    cfg = classifier_config(config, data)
    run.prepare_workdir(workdir, sc)
    save_classifier_config(workdir, cfg)
    tx = run.make_optimizer(sc)
    spec = steps.train_state_spec(lambda r: TextClassifier(cfg, rngs=r), tx, seed=sc.seed, mesh=mesh, rules=rules)
    keys = ("tokens", "loss_mask", "label")
    batch_sh = sharding.batch_shardings(_example(data.train, sc, keys), mesh, rules)
    eval_sh = sharding.batch_shardings({**_example(data.train, sc, keys), "mask": np.zeros((1, 1))}, mesh, rules)
    p, n = data.prefix_kp.shape[1], config.max_new_tokens
    train_step = steps.jit_train_step(
        graphdef=spec.graphdef, tx=tx, loss_fn=classifier_loss(prefix_len=p, length=n, min_len=sc.min_len),
        state_shardings=spec.shardings, batch_shardings=batch_sh, mesh=mesh, accum_steps=sc.accum_steps)

    def metrics(model, batch, frozen):
        del frozen
        tokens, mask = classifier_inputs(batch["tokens"], batch["loss_mask"], p, n)
        logits = model(tokens, mask)
        valid = batch["mask"][:, 0]
        correct = (jnp.argmax(logits, -1) == batch["label"]) * valid
        prob = class_probabilities(logits, batch["label"]) * valid
        return {"accuracy": (jnp.sum(correct), jnp.sum(valid)), "p_label": (jnp.sum(prob), jnp.sum(valid))}

    eval_step = steps.jit_eval_step(graphdef=spec.graphdef, metrics_fn=metrics, params_shardings=spec.shardings.params,
                                    batch_shardings=eval_sh, mesh=mesh)

    def run_eval(params):
        m = loop.evaluate(eval_step, params, _host_batches(data.validation, sc, keys), eval_sh)
        return {"val/accuracy": m["accuracy"], "val/p_label": m["p_label"]}

    _, val = run.fit(workdir, sc, spec=spec, data_iter=_train_iter(data.train, sc, keys), train_step=train_step,
                     batch_shardings=batch_sh, run_eval=run_eval, tokens_per_step=sc.batch_size * n, desc="classifier")
    return val


def save_classifier_config(workdir, cfg: TextClassifierConfig):
    path = os.path.join(workdir, CLASSIFIER_CONFIG_FILE)
    new = json.loads(json.dumps(cfg.__dict__))
    if os.path.exists(path) and hostio.read_json(path) != new:
        raise run.ConfigError(f"{path} describes another classifier; not replacing it (use another --workdir)")
    if jax.process_index() == 0:
        hostio.write_json_atomically(path, new)


def load_classifier(workdir, *, mesh, rules):
    """(graphdef, params) of W/classifier's latest checkpoint."""
    cfg = TextClassifierConfig(**hostio.read_json(os.path.join(workdir, CLASSIFIER_CONFIG_FILE)))
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: TextClassifier(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    shardings = sharding.tree_shardings(abstract, rules, mesh)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1)
    try:
        params = ckpt.restore_params(sharding.abstract_with_shardings(abstract, shardings))
    finally:
        ckpt.close()
    return graphdef, params


# ------------------------------------------------------------------------------------------------------
# Stage 3: the students.


def make_objective(config, teacher, data, beta) -> steps.Objective:
    """The CFG-distillation objective (`kdjax.guidance.make_objective`) with the config's settings."""
    return guidance.make_objective(
        teacher_graphdef=teacher.graphdef, null_prefix_p=data.null_p, guidance=config.guidance, loss=config.loss,
        hparams=_hparams(config), temperature=config.temperature, beta=beta,
        num_generations=config.num_generations, max_new_tokens=config.max_new_tokens,
        sample_temperature=config.sample_temperature, eos_id=data.tokenizer.eos_id, embedding=config.embedding)


def _copy(tree):
    # Train steps donate their state: the teacher's arrays must not be the student's starting buffers.
    return jax.tree.map(lambda x: x.copy(), tree)


def train_student(config, data, teacher, teacher_fingerprint, beta, workdir) -> dict:
    """Trains (or resumes) one student from the teacher on its own samples; returns its last evaluation."""
    sc = stage_config(config, "student", beta=float(beta), guidance=config.guidance, loss=config.loss,
                      hparams=_hparams(config), temperature=config.temperature, num_generations=config.num_generations,
                      embedding=config.embedding, max_new_tokens=config.max_new_tokens,
                      sample_temperature=config.sample_temperature, teacher_fingerprint=teacher_fingerprint)
    mesh, rules = sharding.make_mesh(sc.mesh), tuple(sc.sharding_rules)
    run.prepare_workdir(workdir, sc)
    pretrained.save_model_files(workdir, teacher.config, data.tokenizer)
    tx = run.make_optimizer(sc)
    spec = steps.train_state_spec(lambda r: Transformer(teacher.config, rngs=r), tx, seed=sc.seed, mesh=mesh,
                                  rules=rules)
    prompts = categories.PromptSource(data.prefix_kp)
    keys = ("prompt", "label")
    batch_sh = sharding.batch_shardings(_example(prompts, sc, keys), mesh, rules)
    teacher_sh = sharding.tree_shardings(teacher.params, rules, mesh)
    objective = make_objective(config, teacher, data, beta)
    train_step = steps.jit_train_step(graphdef=spec.graphdef, tx=tx, loss_fn=objective, state_shardings=spec.shardings,
                                      batch_shardings=batch_sh, mesh=mesh, frozen_shardings=teacher_sh,
                                      accum_steps=sc.accum_steps)
    # No separate evaluation: the train metrics (kd, reward) are on the student's own fresh samples already,
    # and the evaluation stage scores every student the same way.
    run_eval = lambda params: {}
    _, val = run.fit(workdir, sc, spec=spec, data_iter=_train_iter(prompts, sc, keys), train_step=train_step,
                     batch_shardings=batch_sh, run_eval=run_eval, frozen=teacher.params,
                     tokens_per_step=sc.batch_size * config.num_generations * config.max_new_tokens,
                     init_params=_copy(teacher.params), desc=f"student beta={beta:g}")
    return val


def train_all(config, workdir) -> dict:
    """Teacher, classifier, the students; returns what evaluation needs and the stage times."""
    data = load_data(config)
    print(data.description)
    p = data.prefix_kp.shape[1]
    if p + config.max_new_tokens > config.data.seq_len + 1:
        raise run.ConfigError(f"the {p}-token prefix + max_new_tokens={config.max_new_tokens} exceed the teacher's "
                              f"context data.seq_len={config.data.seq_len} + 1: lower max_new_tokens or raise seq_len")
    mesh, rules = sharding.make_mesh(config.mesh), tuple(config.sharding_rules)
    times = {}
    tdir = os.path.join(workdir, "teacher")
    print("== teacher")
    _, times["teacher"] = timed(tdir, lambda: train_teacher(config, data, tdir))
    print("== classifier")
    cdir = os.path.join(workdir, "classifier")
    _, times["classifier"] = timed(cdir, lambda: train_classifier(config, data, cdir))
    teacher = pretrained.load_workdir(tdir, mesh=mesh, rules=rules)
    fingerprint = guidance.tree_fingerprint(teacher.params)
    for beta in config.betas:
        print(f"== student beta={beta:g}")
        sdir = student_dir(workdir, beta)
        _, times[f"student_b{beta:g}"] = timed(
            sdir, lambda: train_student(config, data, teacher, fingerprint, beta, sdir))
    return dict(data=data, teacher=teacher, teacher_fingerprint=fingerprint, times=times, mesh=mesh, rules=rules)


# ------------------------------------------------------------------------------------------------------
# Evaluation.


def eval_prompts(config, data):
    """(prompts [R, P], labels [R], keys [R]): K categories x groups_per_category prompts x generations rows,
    prompt-major (rows g G .. g G + G - 1 are one prompt's generations); the same keys for every model."""
    e = config.eval
    k = categories.num_categories()
    labels = np.repeat(np.arange(k), e.groups_per_category * e.generations).astype(np.int32)
    keys = jax.random.split(jax.random.key(e.seed), len(labels))
    return data.prefix_kp[labels], labels, keys


class Evaluator:
    """Samples a model on the evaluation prompts and scores the samples (every function jitted once)."""

    def __init__(self, config, data, teacher, classifier):
        self.config, self.data, self.teacher = config, data, teacher
        self.prompts, self.labels, self.keys = eval_prompts(config, data)
        self.nulls = np.broadcast_to(data.null_p, self.prompts.shape).copy()
        n, eos, temp = config.max_new_tokens, data.tokenizer.eos_id, config.sample_temperature
        gd = teacher.graphdef
        self._sample = jax.jit(lambda params, prompts, keys: sampling.sample(
            gd, params, prompts, keys, max_new_tokens=n, temperature=temp, eos_id=eos))
        # guidance is traced: one compiled program serves every gamma.
        self._sample_cfg = jax.jit(lambda params, prompts, nulls, keys, g: sampling.sample_cfg(
            gd, params, prompts, nulls, keys, guidance=g, max_new_tokens=n, temperature=temp, eos_id=eos))
        self._score = jax.jit(self._score_fn(classifier[0]))
        self.classifier_params = classifier[1]
        self._compiled = {}

    def _score_fn(self, clf_graphdef):
        p, null = self.data.prefix_kp.shape[1], jnp.asarray(self.data.null_p)
        gd, embedding = self.teacher.graphdef, self.config.embedding

        def score(teacher_params, clf_params, tokens, mask, labels):
            teacher = nnx.merge(gd, teacher_params)
            inputs, targets, label_mask = tokens[:, :-1], tokens[:, 1:], mask[:, 1:]
            lc = guidance.token_logprobs(teacher(inputs), targets)
            lu = guidance.token_logprobs(teacher(guidance.with_prefix(inputs, null)), targets)
            n_tok = jnp.maximum(jnp.sum(label_mask, 1), 1.0)
            emb = guidance.generation_embedding(teacher, tokens, mask,
                                                null_prefix_p=null if embedding == "teacher_null" else None)
            logits, feats = nnx.merge(clf_graphdef, clf_params)(tokens[:, p:], mask[:, p:], return_features=True)
            return {"p_label": class_probabilities(logits, labels),
                    "correct": (jnp.argmax(logits, -1) == labels).astype(jnp.float32),
                    "pmi": jnp.sum((lc - lu) * label_mask, 1) / n_tok,
                    "length": jnp.sum(label_mask, 1), "embedding": emb, "features": feats}

        return score

    def generate(self, params, guidance_value):
        """(tokens [R, P + N], mask, forwards per generated token, seconds): guidance None = plain sampling."""
        if guidance_value is None:
            fn, args, forwards = self._sample, (params, self.prompts, self.keys), 1
        else:
            fn, args = self._sample_cfg, (params, self.prompts, self.nulls, self.keys, jnp.float32(guidance_value))
            forwards = 2
        kind = "plain" if guidance_value is None else "cfg"
        if kind not in self._compiled:  # compiled once per kind: every model has the same shapes
            self._compiled[kind] = fn.lower(*args).compile()
        compiled = self._compiled[kind]
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        seconds = time.perf_counter() - t0
        if guidance_value is not None:
            forwards = int(out["forwards"]) / self.config.max_new_tokens
        return np.asarray(out["tokens"]), np.asarray(out["mask"]), forwards, seconds

    def __call__(self, params, guidance_value=None) -> dict:
        tokens, mask, forwards, seconds = self.generate(params, guidance_value)
        s = jax.device_get(self._score(self.teacher.params, self.classifier_params, tokens, mask, self.labels))
        g = self.config.eval.generations
        p = self.data.prefix_kp.shape[1]
        groups = [[row[p:][m[p:] > 0].tolist() for row, m in zip(tokens[i: i + g], mask[i: i + g])]
                  for i in range(0, len(tokens), g)]
        per_class = [float(np.mean(s["p_label"][self.labels == c])) for c in range(categories.num_categories())]
        distances = guidance.pairwise_cosine_distances(s["embedding"].reshape(-1, g, s["embedding"].shape[-1]))
        se = lambda x: float(np.std(x, ddof=1) / np.sqrt(len(x)))
        return {
            "quality": float(np.mean(s["p_label"])),
            "quality_se": se(s["p_label"]),
            "accuracy": float(np.mean(s["correct"])),
            "pmi": float(np.mean(s["pmi"])),
            "diversity": float(np.mean(distances)),
            "diversity_se": se(distances),
            "diversity_classifier": guidance.pairwise_cosine_distance(
                s["features"].reshape(-1, g, s["features"].shape[-1])),
            "distinct2": guidance.distinct_n(groups, 2),
            "length": float(np.mean(s["length"])),
            "forwards_per_token": float(forwards),
            "ms_per_token": 1000.0 * seconds / max(float(np.sum(s["length"])), 1.0),
            "quality_per_class": per_class,
            "sample": self.data.tokenizer.decode(tokens[0, p:][mask[0, p:] > 0]),
        }


def _cached(workdir, name, key, fn):
    """The metrics recorded for `key` (the evaluation settings, the params' fingerprint, gamma) in
    W/eval/<sha256(key)>.json, else fn(), recorded: a killed evaluation resumes, and a model whose params are
    bitwise another's (interpolation at kappa = 0 or 1) reuses its samples' metrics."""
    path = os.path.join(workdir, "eval", hashlib.sha256(key.encode()).hexdigest()[:20] + ".json")
    if os.path.exists(path) and hostio.read_json(path).get("key") == key:
        return hostio.read_json(path)["metrics"]
    metrics = fn()
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        hostio.write_json_atomically(path, {"key": key, "first_evaluated_as": name, "metrics": metrics})
    return metrics


def load_student(workdir, beta, *, mesh, rules, teacher_fingerprint):
    """A student's final params; refused if it was fine-tuned from another teacher than this one."""
    sdir = student_dir(workdir, beta)
    recorded = hostio.read_json(os.path.join(sdir, run.CONFIG_FILE)).get("teacher_fingerprint")
    if recorded != teacher_fingerprint:
        raise run.ConfigError(f"{sdir} was fine-tuned from another teacher ({recorded}, not {teacher_fingerprint})")
    return pretrained.load_workdir(sdir, mesh=mesh, rules=rules)


def evaluate(config, workdir, plan) -> list[dict]:
    """Every model's row: the CFG teacher at each gamma, the students, the interpolation curve."""
    data, teacher, mesh, rules = plan["data"], plan["teacher"], plan["mesh"], plan["rules"]
    evaluator = Evaluator(config, data, teacher, load_classifier(os.path.join(workdir, "classifier"), mesh=mesh,
                                                                 rules=rules))
    eval_key = json.dumps({"eval": config.eval.to_dict(), "n": config.max_new_tokens, "t": config.sample_temperature,
                           "emb": config.embedding, "teacher": plan["teacher_fingerprint"]}, sort_keys=True)
    rows = []

    def add(name, kind, params, gamma=None, **extra):
        key = eval_key + guidance.tree_fingerprint(params) + str(gamma)
        metrics = _cached(workdir, name, key, lambda: evaluator(params, None if gamma in (None, 1.0) else gamma))
        rows.append({"model": name, "kind": kind, **extra, **metrics})
        r = rows[-1]
        print(f"{name:>16}: quality {r['quality']:.3f} pmi {r['pmi']:.3f} diversity {r['diversity']:.4f} "
              f"distinct2 {r['distinct2']:.3f} forwards/token {r['forwards_per_token']:g}")

    for g in config.eval.guidances:
        add(f"teacher_g{g:g}", "cfg_teacher", teacher.params, gamma=float(g), guidance=float(g))
    students = {}
    for beta in config.betas:
        students[beta] = load_student(workdir, beta, mesh=mesh, rules=rules,
                                      teacher_fingerprint=plan["teacher_fingerprint"]).params
        add(f"student_b{beta:g}", "student", students[beta], beta=float(beta))
    quality, diverse = students[0.0], students[config.interp_beta]
    for kappa in config.kappas:
        add(f"interp_k{kappa:g}", "interpolation", guidance.interpolate_params(quality, diverse, kappa),
            kappa=float(kappa), beta=float(config.interp_beta))
    return rows


# ------------------------------------------------------------------------------------------------------
# Targets and results.


def targets(config, rows) -> dict:
    """The issue's three targets, computed from the rows (quality = classifier p(category), diversity = the
    teacher-embedding pairwise distance)."""
    by = {r["model"]: r for r in rows}
    ref = by[f"teacher_g{config.guidance:g}"]
    q0 = by["student_b0"]
    curve = [(r["diversity"], r["quality"]) for r in rows if r["kind"] == "cfg_teacher"]
    diverse = [r for r in rows if r["kind"] == "student" and r["beta"] > 0]
    interior = [r for r in rows if r["kind"] == "interpolation"]
    return {
        "quality_student_vs_cfg": {
            "ratio": q0["quality"] / ref["quality"], "forwards_ratio": q0["forwards_per_token"] / ref["forwards_per_token"],
            "met": q0["quality"] >= 0.9 * ref["quality"] and q0["forwards_per_token"] <= 0.5 * ref["forwards_per_token"]},
        "diverse_student_vs_cfg": {
            "students": {r["model"]: {"diversity_ratio": r["diversity"] / ref["diversity"],
                                      "quality_ratio": r["quality"] / ref["quality"]} for r in diverse},
            "met": any(r["diversity"] > ref["diversity"] and r["quality"] >= 0.9 * ref["quality"] for r in diverse)},
        "interpolation_above_cfg_curve": {
            "points": {r["model"]: guidance.above_curve((r["diversity"], r["quality"]), curve) for r in interior},
            "met": any(guidance.above_curve((r["diversity"], r["quality"]), curve) for r in interior)},
    }


def write_results(config, workdir, rows, times, command):
    if jax.process_index() != 0:
        return
    record = {"rows": rows, "targets": targets(config, rows), "stage_times": times, "command": command,
              "config": run.resolved_config(config)}
    hostio.write_json_atomically(os.path.join(workdir, "results.json"), json.loads(json.dumps(record, default=str)))
    hostio.write_atomically(os.path.join(workdir, "results.md"), results_markdown(config, record).encode())
    write_pareto(config, workdir, rows)


COLUMNS = ("quality", "quality_se", "accuracy", "pmi", "diversity", "diversity_se", "diversity_classifier",
           "distinct2", "length", "forwards_per_token", "ms_per_token")


def results_markdown(config, record) -> str:
    rows, t = record["rows"], record["targets"]
    lines = ["# CFG distillation results", "", f"Command: `{record['command']}`", "",
             "quality = mean classifier probability of the requested category; pmi = teacher log p(y|c) - log "
             "p(y|null) per token; diversity = mean pairwise 1 - cos of the teacher embedding within a prompt's "
             "generations (diversity_classifier: the classifier's features); distinct2 = distinct bigrams / "
             "bigrams within a prompt's generations; *_se = standard errors (over generations for quality, over "
             "prompts for diversity); ms_per_token = sampling wall time per generated token on this machine, "
             "compilation excluded.", "",
             "| model | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append(f"| {r['model']} | " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |")
    q, d, i = t["quality_student_vs_cfg"], t["diverse_student_vs_cfg"], t["interpolation_above_cfg_curve"]
    g = f"{config.guidance:g}"
    lines += ["", "## Targets", "",
              f"- beta = 0 student quality / CFG (gamma = {g}) quality = {q['ratio']:.3f} at {q['forwards_ratio']:g}x the "
              f"forwards per token (target >= 0.9 at 0.5x): {'met' if q['met'] else 'missed'}",
              "- a beta > 0 student more diverse than the CFG teacher at >= 90% of its quality: "
              + ", ".join(f"{k}: diversity x{v['diversity_ratio']:.3f}, quality x{v['quality_ratio']:.3f}"
                          for k, v in d["students"].items()) + f": {'met' if d['met'] else 'missed'}",
              "- an interpolation point above the CFG teacher's quality-diversity curve: "
              + ", ".join(f"{k} {'above' if v else 'not above'}" for k, v in i["points"].items())
              + f": {'met' if i['met'] else 'missed'}", "",
              "## Stage wall-clock (first run; CPU seconds; 1-minute load average at start / end)", "",
              "| stage | seconds | CPU seconds | load start | load end |", "|---|---|---|---|---|"]
    for stage, s in record["stage_times"].items():
        lines.append(f"| {stage} | {s['seconds']:.1f} | {s.get('cpu_seconds', 0):.1f} | {s['load_start']:.2f} | "
                     f"{s['load_end']:.2f} |")
    return "\n".join(lines) + "\n"


def _fmt(v):
    return str(v) if isinstance(v, int) else f"{v:.4g}"


def write_pareto(config, workdir, rows):
    """W/pareto.png: quality against diversity (teacher embedding; distinct-2) for every model."""
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "diversity", "diversity: pairwise 1 - cos (teacher embedding)"),
                           (axes[1], "distinct2", "diversity: distinct-2 within a prompt")):
        cfg_rows = sorted((r for r in rows if r["kind"] == "cfg_teacher"), key=lambda r: r["guidance"])
        ax.plot([r[key] for r in cfg_rows], [r["quality"] for r in cfg_rows], "k--o", label="teacher + CFG (2 fwd/token)")
        for r in cfg_rows:
            ax.annotate(f"γ={r['guidance']:g}", (r[key], r["quality"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        interp = sorted((r for r in rows if r["kind"] == "interpolation"), key=lambda r: r["kappa"])
        ax.plot([r[key] for r in interp], [r["quality"] for r in interp], "-s", color="C0",
                label=f"interpolation β=0 → β={config.interp_beta:g} (1 fwd/token)")
        for r in interp:
            ax.annotate(f"κ={r['kappa']:g}", (r[key], r["quality"]), fontsize=7, xytext=(3, -9), textcoords="offset points")
        for i, r in enumerate(r for r in rows if r["kind"] == "student"):
            ax.plot(r[key], r["quality"], "^", color=f"C{i + 1}", markersize=9, label=f"student β={r['beta']:g}")
        ax.set_xlabel(label)
        ax.set_ylabel("quality: classifier p(requested category)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"CFG distillation (γ={config.guidance:g}): quality vs diversity")
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "pareto.png"), dpi=100)
    plt.close(fig)


def run_all(config, workdir, command="") -> dict:
    """Validates, trains every stage (resuming), evaluates, writes the results; returns the results record."""
    validate(config)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise run.ConfigError(f"work directory {workdir!r} exists and is a file, not a directory")
    plan = train_all(config, workdir)
    print("== evaluation")
    rows, times = timed(os.path.join(workdir, "eval"), lambda: evaluate(config, workdir, plan))
    plan["times"]["evaluation"] = times
    write_results(config, workdir, rows, plan["times"], command)
    print(f"wrote {workdir}/results.md")
    return {"rows": rows, "targets": targets(config, rows), "stage_times": plan["times"]}


def main(argv):
    del argv
    config = flags.FLAGS.config
    command = " ".join(["python -m experiments.cfg_distill"] + sys.argv[1:])
    cli.run_main(lambda: run_all(config, flags.FLAGS.workdir, command), config)


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, cli.config_help("configs/cfg_distill.py"))
    flags.DEFINE_string("workdir", None, "Where every stage's directory and the results go.")
    cli.check_config_overrides(sys.argv)
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)

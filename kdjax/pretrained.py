"""Loading a trained model with its tokenizer: a kdjax work directory or a Hugging Face directory.

A kdjax work directory, as written by `experiments.lm_pretrain` (and the distillation experiments), holds
`model_config.json`, `tokenizer.json` and `checkpoints/`.
"""

import dataclasses
import functools
import json
import os
from typing import Optional

import jax
from flax import nnx

from kdjax import checkpoint, hostio, sharding
from kdjax.data import hf_tokenizer
from kdjax.data.tokenizer import Tokenizer
from kdjax.models import transformer
from kdjax.models.transformer import Transformer, TransformerConfig

MODEL_CONFIG_FILE = "model_config.json"


@dataclasses.dataclass
class Pretrained:
    graphdef: nnx.GraphDef
    params: nnx.State  # nnx.Param state, sharded on the mesh it was loaded onto
    config: TransformerConfig
    tokenizer: Tokenizer
    step: int
    source: str = ""  # the directory it came from (its tokenizer.json is the one the data must use)
    max_positions: Optional[int] = None  # a Hugging Face source's stated position limit (exports keep it)

    def model(self) -> Transformer:
        return nnx.merge(self.graphdef, self.params)


def load_model_config(workdir: str) -> TransformerConfig:
    """The architecture a kdjax work directory's model was trained with (its model_config.json)."""
    path = os.path.join(workdir, MODEL_CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir} is not a kdjax work directory: no {MODEL_CONFIG_FILE}")
    return TransformerConfig(**hostio.read_json(path))


class ArchitectureMismatchError(ValueError):
    """A work directory already describes another model."""


def check_model_files(workdir: str, model_config: TransformerConfig):
    """Raises ArchitectureMismatchError if the work directory's model_config.json describes another model.

    `run.prepare_workdir(..., model_config=)` calls it before recording the config, so a refused architecture
    change leaves the directory exactly as it was.
    """
    path = os.path.join(workdir, MODEL_CONFIG_FILE)
    new = dataclasses.asdict(model_config)
    if os.path.exists(path):
        # Fields added since the file was written take their defaults (e.g. scan_layers); remat_policy changes
        # how the step is computed, not the model or its checkpoints' layout.
        old = dataclasses.asdict(TransformerConfig(**hostio.read_json(path)))
        old["remat_policy"] = new["remat_policy"]
        old, new = json.loads(json.dumps(old)), json.loads(json.dumps(new))
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ArchitectureMismatchError(f"{path} describes another architecture (differs in {diff}); not replacing it")


def save_model_files(workdir: str, model_config: TransformerConfig, tokenizer: Tokenizer):
    """Writes model_config.json, tokenizer.json and tokenizer_config.json (which keeps a non-default EOS) next
    to the checkpoints, on process 0.

    An existing different model_config.json is an error (`check_model_files`), never overwritten: the work
    directory's checkpoints (and anyone using it as a teacher) depend on it.
    """
    check_model_files(workdir, model_config)
    path = os.path.join(workdir, MODEL_CONFIG_FILE)
    new = dataclasses.asdict(model_config)
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    hf_tokenizer.save_tokenizer_files(workdir, tokenizer, model_max_length=model_config.max_len)
    hostio.write_json_atomically(path, new, sort_keys=False)


def abstract_model(model_config: TransformerConfig, mesh, rules):
    """(graphdef, params as sharded ShapeDtypeStructs, param shardings) without allocating anything."""
    graphdef, params = nnx.split(
        nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(0))), nnx.Param
    )
    shardings = sharding.tree_shardings(params, rules, mesh)
    return graphdef, sharding.abstract_with_shardings(params, shardings), shardings


def convert_layers(model: Pretrained, *, scan_layers: bool) -> Pretrained:
    """`model` in the scanned (one Block, params stacked on [L]) or unscanned (blocks/0, blocks/1, ...) layout,
    whichever it is not in yet (unchanged if it is): config, graphdef and params (`transformer.to_scanned` /
    `to_unscanned`; the stacked or split copy is built on the params' devices, sharded by XLA).  A kdjax work
    directory's checkpoints are in the layout its model_config.json names; load, then convert."""
    if model.config.scan_layers == scan_layers:
        return model
    config = dataclasses.replace(model.config, scan_layers=scan_layers)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
    params = jax.jit(functools.partial(transformer.convert_layers, scan_layers=scan_layers))(model.params)
    return dataclasses.replace(model, graphdef=graphdef, params=params, config=config)


def load_workdir(workdir: str, *, mesh, rules, step=None) -> Pretrained:
    """Loads the params of a kdjax work directory's latest (or given) checkpoint straight into shardings."""
    model_config = load_model_config(workdir)
    tokenizer = hf_tokenizer.load_tokenizer_files(workdir)
    if tokenizer.vocab_size != model_config.vocab_size:
        raise ValueError(
            f"{workdir}: tokenizer.json has vocab size {tokenizer.vocab_size} but the model has "
            f"{model_config.vocab_size}"
        )
    graphdef, abstract, _ = abstract_model(model_config, mesh, rules)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1)
    try:
        params = ckpt.restore_params(abstract, step)
        step = ckpt.latest_step() if step is None else step
    finally:
        ckpt.close()
    return Pretrained(graphdef, params, model_config, tokenizer, step, source=workdir)


def load_model(*, workdir: str = "", hf_path: str = "", mesh, rules, what: str = "model"):
    """The model named by `workdir` (kdjax) or `hf_path` (Hugging Face: config.json, safetensors,
    tokenizer.json), loaded straight into shardings; None when both are empty."""
    if workdir and hf_path:
        raise ValueError(f"{what}: give a kdjax work directory or a Hugging Face path, not both")
    if hf_path:
        from kdjax import hf  # pylint: disable=g-import-not-at-top  (transformers-free, but heavier)

        ckpt = hf.load_hf_params(hf_path, mesh=mesh, rules=rules)
        limit = ckpt.hf_config.get("max_position_embeddings", ckpt.hf_config.get("n_positions"))
        return Pretrained(ckpt.graphdef, ckpt.params, ckpt.config, ckpt.tokenizer, 0, source=hf_path,
                          max_positions=limit)
    if workdir:
        return load_workdir(workdir, mesh=mesh, rules=rules)
    return None

"""Loading a trained model with its tokenizer: a kdjax work directory or a Hugging Face directory.

A kdjax work directory, as written by `experiments.lm_pretrain` (and the distillation experiments), holds
`model_config.json`, `tokenizer.json` and `checkpoints/`.
"""

import dataclasses
import json
import os

from flax import nnx

from kdjax import checkpoint, sharding
from kdjax.data.tokenizer import Tokenizer
from kdjax.models.transformer import Transformer, TransformerConfig


@dataclasses.dataclass
class Pretrained:
    graphdef: nnx.GraphDef
    params: nnx.State  # nnx.Param state, sharded on the mesh it was loaded onto
    config: TransformerConfig
    tokenizer: Tokenizer
    step: int
    source: str = ""  # the directory it came from (its tokenizer.json is the one the data must use)

    def model(self) -> Transformer:
        return nnx.merge(self.graphdef, self.params)


def save_model_files(workdir: str, model_config: TransformerConfig, tokenizer: Tokenizer):
    """Writes model_config.json and tokenizer.json next to the checkpoints."""
    os.makedirs(workdir, exist_ok=True)
    tokenizer.save(os.path.join(workdir, "tokenizer.json"))
    with open(os.path.join(workdir, "model_config.json"), "w") as f:
        json.dump(dataclasses.asdict(model_config), f, indent=1)


def abstract_model(model_config: TransformerConfig, mesh, rules):
    """(graphdef, params as sharded ShapeDtypeStructs, param shardings) without allocating anything."""
    graphdef, params = nnx.split(
        nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(0))), nnx.Param
    )
    shardings = sharding.tree_shardings(params, rules, mesh)
    return graphdef, sharding.abstract_with_shardings(params, shardings), shardings


def load_workdir(workdir: str, *, mesh, rules, step=None) -> Pretrained:
    """Loads the params of a kdjax work directory's latest (or given) checkpoint straight into shardings."""
    config_path = os.path.join(workdir, "model_config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{workdir} is not a kdjax work directory: no model_config.json")
    with open(config_path) as f:
        model_config = TransformerConfig(**json.load(f))
    tokenizer = Tokenizer.from_file(os.path.join(workdir, "tokenizer.json"))
    if tokenizer.vocab_size != model_config.vocab_size:
        raise ValueError(
            f"{workdir}: tokenizer.json has vocab size {tokenizer.vocab_size} but the model has "
            f"{model_config.vocab_size}"
        )
    graphdef, abstract, _ = abstract_model(model_config, mesh, rules)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no finished checkpoint in {workdir}/checkpoints")
    params = ckpt.restore_params(abstract, step)
    ckpt.close()
    return Pretrained(graphdef, params, model_config, tokenizer, step, source=workdir)


def load_model(*, workdir: str = "", hf_path: str = "", mesh, rules, what: str = "model"):
    """The model named by `workdir` (kdjax) or `hf_path` (Hugging Face: config.json, safetensors,
    tokenizer.json), loaded straight into shardings; None when both are empty."""
    if workdir and hf_path:
        raise ValueError(f"{what}: give a kdjax work directory or a Hugging Face path, not both")
    if hf_path:
        from kdjax.models import hf  # pylint: disable=g-import-not-at-top

        ckpt = hf.load_hf_params(hf_path, mesh=mesh, rules=rules)
        return Pretrained(ckpt.graphdef, ckpt.params, ckpt.config, ckpt.tokenizer, 0, source=hf_path)
    if workdir:
        return load_workdir(workdir, mesh=mesh, rules=rules)
    return None

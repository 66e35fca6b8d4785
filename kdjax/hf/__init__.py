"""Hugging Face checkpoints <-> the kdjax transformer: config, safetensors weights and tokenizer files.

transformers 5 has no Flax models, so kdjax reads and writes the HF directory format itself:

    load_hf(path, mesh=...)         -> (Transformer, Tokenizer)   config.json, *.safetensors, tokenizer.json
    load_hf_params(path, mesh=...)  -> HFCheckpoint               the same as graphdef + sharded params
    save_hf(path, model, tokenizer) -> config.json dict           what AutoModelForCausalLM / AutoTokenizer load
    kdjax_to_hf_config(cfg), hf_config_to_kdjax(hf_config)        config.json <-> TransformerConfig
    check_export_dir(path)                                        refuse a bad export path before any work
    hf_state_dict(model)            -> {HF tensor name: array}    the tensors save_hf writes, in memory

Supported `model_type`s: gpt2, llama, qwen2, mistral (`SUPPORTED_MODEL_TYPES`); anything the kdjax transformer
cannot compute exactly is refused by name, never approximated.  The modules, one job each:

    config.py           config.json <-> TransformerConfig; which HF family a kdjax config is written as
    layouts.py          per family: which HF tensor holds which kdjax parameter, and the reshapes
    safetensors_io.py   memory-mapped reader, streaming writer, sharding into several files
    load.py / save.py   the directory in / out (loading places each device's slice straight from the file)
and `kdjax.data.hf_tokenizer`: tokenizer.json with its EOS in, tokenizer files that AutoTokenizer reproduces out.
"""

from kdjax.data.hf_tokenizer import compare_tokenizers
from kdjax.hf.config import SUPPORTED_MODEL_TYPES, hf_config_to_kdjax, kdjax_to_hf_config
from kdjax.hf.load import HFCheckpoint, load_hf, load_hf_params
from kdjax.hf.save import check_export_dir, hf_state_dict, save_hf

__all__ = [
    "HFCheckpoint",
    "SUPPORTED_MODEL_TYPES",
    "check_export_dir",
    "compare_tokenizers",
    "hf_config_to_kdjax",
    "hf_state_dict",
    "kdjax_to_hf_config",
    "load_hf",
    "load_hf_params",
    "save_hf",
]

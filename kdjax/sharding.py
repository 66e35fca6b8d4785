"""Device mesh from the config, logical-axis rules, and shardings computed once from abstract shapes.

Sharding mode: the mesh's axes are `AxisType.Auto` (GSPMD propagation), not the `Explicit` axes that
`jax.make_mesh` now makes by default.  We pin the shardings of everything that crosses a jit boundary
(parameters, optimizer state, batches) and let XLA propagate the rest; Explicit mode would force a
sharding decision on every ambiguous contraction inside the model, which would tie `kdjax.models` to a
mesh.  The mesh is always passed in; nothing here reads or sets global mesh state.

Logical axes (named on every parameter by `kdjax.models`): `vocab`, `embed`, `mlp`, `heads`, `kv_heads`,
`head_dim`, `layers`, and `batch` for data.  Rules map each to a mesh axis (or a tuple of them, or None).
Activations have their own names (`activation_batch`, `activation_length`, `activation_embed`, ...), applied
as sharding constraints inside the model when a step is traced under `with_activation_sharding`: the batch
dimension on the data-parallel axes and the model dimension replicated, so that FSDP gathers each layer's
weights (small) instead of regathering activations (large), and tensor parallelism splits heads, MLP and
vocabulary activations as it splits their weights.
"""

import functools
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

# One implementation, shared with the models (which may import nothing from kdjax outside kdjax.models).
from kdjax.models.partitioning import activation_sharding, constrain, logical_to_spec  # noqa: F401

MESH_AXES = ("data", "fsdp", "tensor")

# Data parallel over `data` and `fsdp` (FSDP is data parallelism whose parameters are also sharded);
# parameters sharded over `fsdp` on their embed dimension and over `tensor` on heads / mlp / vocab.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    # Activations: batch data-parallel, the residual stream's model dimension whole on every device.
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_head_dim", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)


def make_mesh(mesh_shape: Mapping[str, int], devices: Sequence[Any] = None) -> Mesh:
    """Mesh with axes ('data', 'fsdp', 'tensor') from e.g. {'data': -1, 'fsdp': 2, 'tensor': 1}.

    One entry may be -1: it takes all remaining devices.  Raises ValueError naming the shape when the
    product does not equal the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    unknown = set(mesh_shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
    sizes = [int(mesh_shape.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {dict(mesh_shape)}: at most one axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh {dict(mesh_shape)} does not divide {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, " f"have {len(devices)}"
        )
    return jax.make_mesh(
        tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def with_activation_sharding(fn, mesh: Mesh, rules):
    """`fn` traced with the model's activation constraints resolved by `rules` on `mesh`.

    Wrap the step function *before* `jax.jit` (``jax.jit(with_activation_sharding(step, mesh, rules), ...)``):
    jit traces on the first call, and the wrapper enters `activation_sharding(mesh, rules)` around every trace,
    so the `partitioning.constrain` calls inside `kdjax.models` (and `kdjax.fused_head`) become sharding
    constraints.  Without it they are no-ops.
    """

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with activation_sharding(mesh, rules):
            return fn(*args, **kwargs)

    return wrapped


def _is_variable(x):
    return isinstance(x, nnx.Variable)


def tree_shardings(abstract_tree, rules, mesh: Mesh):
    """NamedShardings for a pytree of (abstract) arrays, e.g. a whole train state from `jax.eval_shape`.

    `nnx.Variable` nodes use their `logical_axes` metadata; optax states built from nnx params keep the
    Variable nodes (and so the metadata) of the params, which is how optimizer moments get the same
    sharding as their parameter without path matching.  Every other leaf is replicated.
    The result has a NamedSharding where the input has a Variable or an array: a pytree prefix of the
    input that `jax.jit` (in/out_shardings) and `jax.device_put` accept.
    """

    def one(x):
        if _is_variable(x):
            axes = x.get_metadata().get("logical_axes")
            value = x.get_value() if hasattr(x, "get_value") else x.value
            if axes is None:
                return NamedSharding(mesh, P())
            if len(axes) != len(value.shape):
                raise ValueError(f"logical axes {axes} do not match shape {value.shape}")
            return NamedSharding(mesh, logical_to_spec(axes, value.shape, rules, mesh))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, abstract_tree, is_leaf=_is_variable)


def abstract_with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs of `abstract_tree` carrying `shardings` (a prefix tree, as from `tree_shardings`).

    The result is a restore target for orbax and an argument spec for `jit(...).lower`.
    """
    return jax.tree.map(
        lambda sh, sub: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), sub),
        shardings,
        abstract_tree,
        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding),
    )


def batch_sharding(mesh: Mesh, rules, ndim: int = 2) -> NamedSharding:
    """Sharding of a batch array [B, ...]: B over the `batch` rule's mesh axes, the rest replicated."""
    target = dict(rules)["batch"]
    axes = (target,) if isinstance(target, str) else tuple(target)
    return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))


def batch_shardings(batch, mesh: Mesh, rules):
    """`batch_sharding` for every array of a batch dict, by its rank."""
    return jax.tree.map(lambda x: batch_sharding(mesh, rules, np.ndim(x)), batch)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())

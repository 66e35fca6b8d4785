"""Logical axis names -> mesh PartitionSpecs, and sharding constraints on activations by logical name.

The models name the dimensions of their parameters (`logical_axes` metadata) and of their activations
(`constrain(x, ("activation_batch", "activation_length", "activation_embed"))`); neither knows a mesh.  The
caller decides, by entering `activation_sharding(mesh, rules)` while the step is *traced* (`kdjax.sharding.
with_activation_sharding` wraps a step function so), and then every `constrain` becomes a
`jax.lax.with_sharding_constraint` to the spec the rules give.  Outside that context `constrain` returns its
input unchanged, so a model called eagerly, in a test, or in a step jitted without rules computes exactly as
before.

Why constraints at all: the mesh axes are `Auto` (GSPMD propagation) and only the step's inputs and outputs
have pinned shardings.  With `batch` and `embed` both on the `fsdp` axis, propagation alone may shard an
activation's embed dimension like its weight's and then regather the batch ("Involuntary full
rematerialization"); pinning activations to batch-sharded / embed-replicated makes XLA gather the weights
per layer instead, which is what FSDP means.

This module lives under `kdjax.models` (it imports only jax) so that the models can use it;
`kdjax.sharding` re-exports `logical_to_spec` and `activation_sharding`.
"""

import contextlib
import contextvars
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

# (mesh, rules) while a caller's step is being traced; None otherwise.
_ACTIVE = contextvars.ContextVar("kdjax_activation_sharding", default=None)


def logical_to_spec(logical_axes, shape, rules, mesh) -> P:
    """PartitionSpec for an array whose dimensions carry `logical_axes` names.

    A dimension is sharded over its rule's mesh axes only if its size divides evenly and none of those
    mesh axes is already used by an earlier dimension; otherwise it is replicated (e.g. 2 kv heads on a
    tensor axis of 4, or a batch of 1 on 8 data-parallel devices).  Unknown logical names are an error, so a
    typo in the rules cannot silently replicate a whole model.
    """
    rules = dict(rules)
    used, spec = set(), []
    for name, size in zip(logical_axes, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ValueError(f"logical axis {name!r} has no sharding rule; rules cover {sorted(rules)}")
        target = rules[name]
        axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        axes = tuple(a for a in axes if mesh.shape[a] > 1)
        n = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if not axes or size % n or used & set(axes):
            spec.append(None)
        else:
            used |= set(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
    return P(*spec)


@contextlib.contextmanager
def activation_sharding(mesh, rules):
    """Within this context (at trace time), `constrain` pins activations to `rules` on `mesh`."""
    token = _ACTIVE.set((mesh, tuple(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> Optional[tuple]:
    """(mesh, rules) of the enclosing `activation_sharding`, or None."""
    return _ACTIVE.get()


def constrain(x, logical_axes: Sequence[Optional[str]]):
    """`x` with a sharding constraint to its logical axes under the active rules; `x` itself when none are.

    On a mesh of one device every spec is replicated and the constraint is a no-op.
    """
    context = _ACTIVE.get()
    if context is None:
        return x
    mesh, rules = context
    if len(logical_axes) != x.ndim:
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match the shape {x.shape}")
    spec = logical_to_spec(logical_axes, x.shape, rules, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def unstacked_ndim(variable) -> int:
    """A parameter's rank without its stacked `layers` axis (a scanned model's [L, D] norm scale is a vector).

    For rules that depend on a parameter's shape, e.g. AdamW's "decay matrices, not vectors":
    ``jax.tree.map(lambda v: unstacked_ndim(v) >= 2, params, is_leaf=lambda x: isinstance(x, nnx.Variable))``.
    """
    axes = variable.get_metadata().get("logical_axes") or ()
    return variable.get_value().ndim - (1 if "layers" in axes else 0)

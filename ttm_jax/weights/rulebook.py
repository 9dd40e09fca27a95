"""One declarative, reversible rulebook for PyTorch <-> Flax parameters.

A model's conversion is a table of `Rule`s; the same table converts both ways:

    RuleBook("t5", [
        Rule("shared.weight", "embedding/embedding", aliases=("encoder.embed_tokens.weight",)),
        Rule("encoder.block.{i}.layer.0.SelfAttention.q.weight", "layers/attention/q/kernel", LINEAR, stack="i"),
        Rule("blocks.{i}.attn.qkv.weight", ("blocks_{i}/q/kernel", "blocks_{i}/k/kernel", "blocks_{i}/v/kernel"),
             LINEAR, fuse_axis=0),
        Ignore("encoder.rope.freqs", "recomputed"), Ignore("decoder.*", "encoder only"),
    ])

- Patterns: torch keys are `.`-joined, Flax paths `/`-joined; `{name}` is a non-negative integer placeholder.
- `transform`: an exactly invertible array map, torch layout -> Flax layout (`LINEAR` `[out, in] -> [in, out]`,
  `CONV2D`/`CONV3D` `[O, I, *k] -> [*k, I, O]`, `SplitAxis`, `Chain` of them).
- `stack="i"`: stack-for-scan; torch keys `...{i}...` for i = 0..n-1 are the slices of one Flax param along
  `stack_axis` (the `nn.scan` "layers" axis); the Flax pattern has no `{i}`.
- Fused weights: a tuple on one side. Torch single, Flax tuple: the torch tensor is split along `fuse_axis` (of the
  torch tensor, per layer) into the Flax params, in order. Torch tuple, Flax single: the torch tensors are concatenated
  along `fuse_axis` (of the Flax param, per layer, i.e. without the stack axis).
- `aliases`: more torch keys holding the same tensor (tied weights): read ones must equal the primary bit for bit;
  written ones are copies. They are optional on the torch side.
- `stack_offset=k`: flax layer j is torch index j + k (a torch stack split over several Flax scans, e.g. the first
  blocks with added layers and the rest without).
- `Ignore`: torch keys deliberately dropped (buffers recomputed by the model); optional on the torch side.
- `FlaxOnly`: Flax params with no torch counterpart (new layers, zero-initialised): torch -> flax keeps the values of
  the template (pass `model.init` output, not shapes), flax -> torch drops them.

Every conversion is planned on shapes first, from the Flax template (`jax.eval_shape(model.init, ...)`) and, where
known, the torch shapes (a state dict or a safetensors header): every torch key must be mapped, every Flax param
produced, every shape match, or `ConversionError` lists all the offending keys by name before any data moves. Then
data moves tensor by tensor on numpy arrays: `FlaxWriter.add(key, array)` writes each torch tensor into its slot of
preallocated Flax buffers, so a converter can stream a sharded safetensors checkpoint (`stream_to_flax` over a
`safetensors_io` reader) with one copy of the weights in memory; `iter_torch` yields torch tensors one at a time the
other way.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np

from ttm_jax import cli

Shape = tuple[int, ...]
Spec = tuple[Shape, Any]  # (shape, numpy dtype or None)


class ConversionError(cli.UserError, ValueError):
    """A conversion that cannot be exact; the message lists every offending torch key / Flax path."""


# --------------------------------------------------------------------------------------------------------- transforms


class Transform:
    """An exactly invertible map from a torch tensor to a Flax one (one layer's slice, one fused part)."""

    def to_flax(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def to_torch(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def flax_shape(self, torch_shape: Shape) -> Shape:
        raise NotImplementedError

    def torch_shape(self, flax_shape: Shape) -> Shape:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Identity(Transform):
    def to_flax(self, x):
        return x

    def to_torch(self, x):
        return x

    def flax_shape(self, torch_shape):
        return tuple(torch_shape)

    def torch_shape(self, flax_shape):
        return tuple(flax_shape)


@dataclasses.dataclass(frozen=True)
class Transpose(Transform):
    """Flax tensor = `torch_tensor.transpose(perm)`."""

    perm: tuple[int, ...]

    def _check(self, shape: Shape, side: str) -> None:
        if len(shape) != len(self.perm):
            raise ValueError(f"Transpose{self.perm} needs a {len(self.perm)}-d {side} tensor, got shape {tuple(shape)}")

    @property
    def inverse(self) -> tuple[int, ...]:
        return tuple(int(i) for i in np.argsort(self.perm))

    def to_flax(self, x):
        self._check(x.shape, "torch")
        return np.transpose(x, self.perm)

    def to_torch(self, x):
        self._check(x.shape, "flax")
        return np.transpose(x, self.inverse)

    def flax_shape(self, torch_shape):
        self._check(torch_shape, "torch")
        return tuple(torch_shape[p] for p in self.perm)

    def torch_shape(self, flax_shape):
        self._check(flax_shape, "flax")
        return tuple(flax_shape[p] for p in self.inverse)


@dataclasses.dataclass(frozen=True)
class SplitAxis(Transform):
    """Flax splits torch axis `axis` of size n into `(parts, n // parts)` (e.g. fused heads -> heads x head_dim)."""

    axis: int
    parts: int

    def flax_shape(self, torch_shape):
        a = self.axis % len(torch_shape)
        n = torch_shape[a]
        if n % self.parts:
            raise ValueError(f"SplitAxis: axis {a} of size {n} does not split into {self.parts} parts")
        return tuple(torch_shape[:a]) + (self.parts, n // self.parts) + tuple(torch_shape[a + 1:])

    def torch_shape(self, flax_shape):
        a = self.axis % (len(flax_shape) - 1)
        if flax_shape[a] != self.parts:
            raise ValueError(f"SplitAxis: flax axis {a} is {flax_shape[a]}, expected {self.parts} parts")
        return tuple(flax_shape[:a]) + (flax_shape[a] * flax_shape[a + 1],) + tuple(flax_shape[a + 2:])

    def to_flax(self, x):
        return x.reshape(self.flax_shape(x.shape))

    def to_torch(self, x):
        return x.reshape(self.torch_shape(x.shape))


@dataclasses.dataclass(frozen=True)
class Chain(Transform):
    """`transforms` applied in order torch -> flax, in reverse order flax -> torch."""

    transforms: tuple[Transform, ...]

    def to_flax(self, x):
        for t in self.transforms:
            x = t.to_flax(x)
        return x

    def to_torch(self, x):
        for t in reversed(self.transforms):
            x = t.to_torch(x)
        return x

    def flax_shape(self, torch_shape):
        for t in self.transforms:
            torch_shape = t.flax_shape(torch_shape)
        return torch_shape

    def torch_shape(self, flax_shape):
        for t in reversed(self.transforms):
            flax_shape = t.torch_shape(flax_shape)
        return flax_shape


IDENTITY = Identity()
LINEAR = Transpose((1, 0))  # torch nn.Linear [out, in] -> flax Dense kernel [in, out]
CONV2D = Transpose((2, 3, 1, 0))  # [O, I, kh, kw] -> [kh, kw, I, O]
CONV3D = Transpose((2, 3, 4, 1, 0))  # [O, I, kt, kh, kw] -> [kt, kh, kw, I, O]


# -------------------------------------------------------------------------------------------------------------- rules

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _as_tuple(x: str | Sequence[str]) -> tuple[str, ...]:
    return (x,) if isinstance(x, str) else tuple(x)


def _names(pattern: str) -> set[str]:
    return set(_PLACEHOLDER.findall(pattern))


def _literal(text: str, glob: bool) -> str:
    return ".*".join(re.escape(t) for t in text.split("*")) if glob else re.escape(text)


def _regex(pattern: str, glob: bool = False) -> re.Pattern:
    out, seen, pos = [], set(), 0
    for m in _PLACEHOLDER.finditer(pattern):
        out.append(_literal(pattern[pos:m.start()], glob))
        name = m.group(1)
        out.append(f"(?P={name})" if name in seen else f"(?P<{name}>0|[1-9][0-9]*)")
        seen.add(name)
        pos = m.end()
    out.append(_literal(pattern[pos:], glob))
    return re.compile("".join(out))


def _fill(pattern: str, caps: Mapping[str, Any]) -> str:
    return _PLACEHOLDER.sub(lambda m: str(caps[m.group(1)]), pattern)


@dataclasses.dataclass(frozen=True)
class Rule:
    """Torch key pattern(s) <-> Flax path pattern(s), with a transform; see the module docstring."""

    torch: str | tuple[str, ...]
    flax: str | tuple[str, ...]
    transform: Transform = IDENTITY
    stack: str | None = None
    stack_axis: int = 0
    stack_offset: int = 0
    fuse_axis: int = 0
    aliases: tuple[str, ...] = ()

    def __post_init__(self):
        t, f = _as_tuple(self.torch), _as_tuple(self.flax)
        where = f"Rule({self.torch!r} <-> {self.flax!r})"
        if len(t) > 1 and len(f) > 1:
            raise ValueError(f"{where}: only one side may list several keys (a fused weight)")
        if not t or not f:
            raise ValueError(f"{where}: both sides need a pattern")
        if self.aliases and len(t) > 1:
            raise ValueError(f"{where}: aliases need a single torch key")
        tn = [_names(p) for p in t + tuple(self.aliases)]
        fn = [_names(p) for p in f]
        if any(n != tn[0] for n in tn) or any(n != fn[0] for n in fn):
            raise ValueError(f"{where}: every pattern on one side must use the same placeholders")
        want = tn[0] - {self.stack}
        if self.stack_offset and (self.stack is None or self.stack_offset < 0):
            raise ValueError(f"{where}: stack_offset={self.stack_offset} needs stack= and must be >= 0")
        if self.stack is not None and self.stack not in tn[0]:
            raise ValueError(f"{where}: stack={self.stack!r} is not a placeholder of the torch pattern")
        if self.stack is not None and self.stack in fn[0]:
            raise ValueError(f"{where}: the stacked placeholder {{{self.stack}}} must not appear in the Flax path")
        if fn[0] != want:
            raise ValueError(f"{where}: placeholders {sorted(tn[0])} (torch, minus stack) and {sorted(fn[0])} (flax) "
                             f"differ, so the rule is not invertible")

    @property
    def torch_patterns(self) -> tuple[str, ...]:
        return _as_tuple(self.torch)

    @property
    def flax_patterns(self) -> tuple[str, ...]:
        return _as_tuple(self.flax)


@dataclasses.dataclass(frozen=True)
class Ignore:
    """Torch keys deliberately not converted, e.g. buffers the model recomputes; `*` matches any text."""

    torch: str
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class FlaxOnly:
    """Flax params (`/`-joined pattern, `*` matches any text) that no torch tensor feeds, e.g. added layers."""

    flax: str
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class Move:
    """One torch tensor (or a slice of it) <-> one Flax param slot (layer `stack_index`, `flax_slice`)."""

    torch_key: str
    flax_path: str
    rule: Rule
    torch_shape: Shape  # of the whole torch tensor
    stack_index: int | None = None
    torch_slice: tuple[int, int] | None = None  # along rule.fuse_axis of the torch tensor
    flax_slice: tuple[int, int] | None = None  # along rule.fuse_axis of the per-layer flax tensor
    alias: bool = False


# ------------------------------------------------------------------------------------------------------- tree helpers


def _leaf_value(x: Any) -> Any:
    return x.unbox() if hasattr(x, "unbox") and hasattr(x, "names") else x


def flatten(tree: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
    """Nested dict (Flax params, boxed or not) -> {"a/b/c": leaf}."""
    out: dict[str, Any] = {}

    def walk(node, prefix):
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{prefix}{sep}{k}" if prefix else str(k))
        else:
            out[prefix] = _leaf_value(node)

    walk(tree, "")
    return out


def unflatten(flat: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
    """{"a/b/c": leaf} -> nested dict."""
    out: dict[str, Any] = {}
    for path, v in flat.items():
        node = out
        *parents, last = path.split(sep)
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = v
    return out


_DTYPE_NAMES = {"bfloat16": ml_dtypes.bfloat16, "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
                "float8_e5m2": ml_dtypes.float8_e5m2}


def as_dtype(dtype: Any) -> np.dtype | None:
    """numpy dtype of a numpy / jax / torch dtype (by name), or None."""
    if dtype is None:
        return None
    name = str(dtype).removeprefix("torch.")
    if name in _DTYPE_NAMES:
        return np.dtype(_DTYPE_NAMES[name])
    try:
        return np.dtype(dtype)
    except TypeError:
        return np.dtype(name)


def as_numpy(x: Any) -> np.ndarray:
    """A numpy array of `x`: an array, a jax array, or a torch tensor (detached, on the CPU; torch is not imported)."""
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def spec_of(x: Any) -> Spec:
    """(shape, dtype) of an array, a `jax.ShapeDtypeStruct`, a torch tensor, or a bare shape tuple."""
    x = _leaf_value(x)
    if isinstance(x, tuple | list) and all(isinstance(d, int | np.integer) for d in x):
        return tuple(int(d) for d in x), None
    if isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple | list):
        return tuple(int(d) for d in x[0]), as_dtype(x[1])
    return tuple(int(d) for d in x.shape), as_dtype(getattr(x, "dtype", None))


def _without(shape: Shape, axis: int | None) -> Shape:
    return shape if axis is None else shape[:axis] + shape[axis + 1:]


def _with(shape: Shape, axis: int, size: int) -> Shape:
    return shape[:axis] + (size,) + shape[axis + 1:]


def _index(ndim: int, axis: int, sl: tuple[int, int]) -> tuple[slice, ...]:
    idx = [slice(None)] * ndim
    idx[axis] = slice(*sl)
    return tuple(idx)


class _Problems:
    def __init__(self, book: str, direction: str):
        self.head = f"{book} rulebook ({direction})"
        self.lines: list[str] = []

    def add(self, line: str) -> None:
        self.lines.append(line)

    def raise_if_any(self, limit: int = 60) -> None:
        if not self.lines:
            return
        shown = self.lines[:limit]
        more = len(self.lines) - len(shown)
        msg = f"{self.head}: {len(self.lines)} problem(s):\n  " + "\n  ".join(shown)
        if more:
            msg += f"\n  ... and {more} more"
        raise ConversionError(msg)


# ----------------------------------------------------------------------------------------------------------- rulebook


class RuleBook:
    """A model's conversion table; see the module docstring."""

    def __init__(self, name: str, rules: Iterable[Rule | Ignore]):
        self.name = name
        rules = list(rules)
        bad = [r for r in rules if not isinstance(r, Rule | Ignore | FlaxOnly)]
        if bad:
            raise TypeError(f"RuleBook {name!r}: {bad[0]!r} is not a Rule, an Ignore or a FlaxOnly")
        self.rules = [r for r in rules if isinstance(r, Rule)]
        self.ignores = [r for r in rules if isinstance(r, Ignore)]
        self.flax_only = [r for r in rules if isinstance(r, FlaxOnly)]
        self._flax_only_rx = [_regex(r.flax, glob=True) for r in self.flax_only]
        self._flax_rx = [[_regex(p) for p in r.flax_patterns] for r in self.rules]
        self._torch_rx = [[_regex(p) for p in r.torch_patterns + tuple(r.aliases)] for r in self.rules]
        self._ignore_rx = [_regex(r.torch, glob=True) for r in self.ignores]

    # ---- matching

    def _match_flax(self, path: str) -> list[tuple[Rule, int, dict[str, str]]]:
        out = []
        for rule, rxs in zip(self.rules, self._flax_rx, strict=True):
            for j, rx in enumerate(rxs):
                m = rx.fullmatch(path)
                if m:
                    out.append((rule, j, m.groupdict()))
        return out

    def _match_torch(self, key: str) -> list[tuple[Rule, dict[str, str]]]:
        out = []
        for rule, rxs in zip(self.rules, self._torch_rx, strict=True):
            for rx in rxs:
                m = rx.fullmatch(key)
                if m:
                    out.append((rule, m.groupdict()))
        return out

    def ignored(self, key: str) -> bool:
        return any(rx.fullmatch(key) for rx in self._ignore_rx)

    def flax_only_param(self, path: str) -> bool:
        return any(rx.fullmatch(path) for rx in self._flax_only_rx)

    # ---- planning (shapes only)

    def plan(self, flax_specs: Mapping[str, Any], torch_specs: Mapping[str, Any] | None,
             direction: str) -> list[Move]:
        """All moves between the Flax params `flax_specs` ({path: spec}) and the torch tensors `torch_specs` ({key:
        spec}, or None: unknown, the rulebook's own shapes are used); raises `ConversionError` listing every unmapped
        or missing key, every unused key and every shape mismatch."""
        problems = _Problems(self.name, direction)
        fspecs = {p: spec_of(v) for p, v in flax_specs.items()}
        tspecs = None if torch_specs is None else {k: spec_of(v) for k, v in torch_specs.items()}
        moves: list[Move] = []
        for path, (fshape, _) in fspecs.items():
            if self.flax_only_param(path):
                continue
            matches = self._match_flax(path)
            if not matches:
                problems.add(f"unmapped flax param {path!r} {fshape}: no rule produces it")
                continue
            if len(matches) > 1:
                problems.add(f"flax param {path!r} is matched by several rules: "
                             + "; ".join(repr(r) for r, _, _ in matches))
                continue
            rule, j, caps = matches[0]
            try:
                moves.extend(self._moves_for(path, fshape, rule, j, caps, fspecs, tspecs))
            except (ValueError, KeyError) as e:
                problems.add(f"flax param {path!r} {fshape}: {e}")

        expected: dict[str, list[Move]] = collections.defaultdict(list)
        for mv in moves:
            expected[mv.torch_key].append(mv)
        for key, mvs in expected.items():
            primary = [m for m in mvs if not m.alias]
            if len(primary) > 1 and any(m.torch_slice is None for m in primary):
                problems.add(f"torch key {key!r} is produced by several flax params "
                             f"{sorted({m.flax_path for m in primary})}; give each its own rule or use aliases")
        if tspecs is not None:
            for key, (tshape, _) in tspecs.items():
                if key in expected:
                    want = expected[key][0].torch_shape
                    if tshape != want:
                        paths = sorted({m.flax_path for m in expected[key]})
                        problems.add(f"shape mismatch: torch {key!r} is {tshape}, but flax {', '.join(paths)} "
                                     f"needs torch shape {want}")
                elif not self.ignored(key):
                    hits = self._match_torch(key)
                    if hits:
                        rule, caps = hits[0]
                        dest = [_fill(p, {k: v for k, v in caps.items() if k != rule.stack})
                                for p in rule.flax_patterns]
                        problems.add(f"unused torch key {key!r} {tshape}: rule maps it to flax {dest}, which the "
                                     f"model does not have (or the layer index is out of range)")
                    else:
                        problems.add(f"unmapped torch key {key!r} {tshape}: no rule matches it; add a Rule or an "
                                     f"Ignore")
            for key, mvs in expected.items():
                if key not in tspecs and not all(m.alias for m in mvs):
                    problems.add(f"missing torch key {key!r} {mvs[0].torch_shape} for flax "
                                 f"{sorted({m.flax_path for m in mvs})}")
            moves = [m for m in moves if m.torch_key in tspecs]
        problems.raise_if_any()
        return moves

    def _moves_for(self, path: str, fshape: Shape, rule: Rule, j: int, caps: dict[str, str],
                   fspecs: Mapping[str, Spec], tspecs: Mapping[str, Spec] | None) -> list[Move]:
        t = rule.transform
        if rule.stack is not None:
            if len(fshape) <= rule.stack_axis:
                raise ValueError(f"has no stack axis {rule.stack_axis} (rule stacks torch {{{rule.stack}}} on it)")
            layers: list[int | None] = list(range(fshape[rule.stack_axis]))
        else:
            layers = [None]
        layer_shape = _without(fshape, rule.stack_axis if rule.stack is not None else None)
        fused = rule.fuse_axis
        out = []
        for idx in layers:
            c = dict(caps)
            if idx is not None:
                c[rule.stack] = idx + rule.stack_offset
            if len(rule.flax_patterns) > 1:
                # one torch tensor split into several flax params along torch axis `fuse_axis`
                key = _fill(rule.torch_patterns[0], c)
                parts = []
                for p in rule.flax_patterns:
                    sib = _fill(p, caps)
                    if sib not in fspecs:
                        raise ValueError(f"its fused sibling {sib!r} (rule {rule.torch!r}) is not in the model")
                    parts.append(t.torch_shape(_without(fspecs[sib][0], rule.stack_axis if idx is not None else None)))
                full = _with(parts[0], fused, sum(s[fused] for s in parts))
                off = sum(s[fused] for s in parts[:j])
                out.append(Move(key, path, rule, full, idx, torch_slice=(off, off + parts[j][fused])))
                for a in rule.aliases:
                    out.append(Move(_fill(a, c), path, rule, full, idx, torch_slice=out[-1].torch_slice, alias=True))
            elif len(rule.torch_patterns) > 1:
                # several torch tensors concatenated into one flax param along flax axis `fuse_axis`
                keys = [_fill(p, c) for p in rule.torch_patterns]
                total = layer_shape[fused]
                if tspecs is not None and all(k in tspecs for k in keys):
                    sizes = [t.flax_shape(tspecs[k][0])[fused] for k in keys]
                else:
                    if total % len(keys):
                        raise ValueError(f"axis {fused} of size {total} does not split evenly into {len(keys)} torch "
                                         f"tensors {keys}; pass the torch shapes")
                    sizes = [total // len(keys)] * len(keys)
                if sum(sizes) != total:
                    raise ValueError(f"torch tensors {keys} concatenate to {sum(sizes)} along flax axis {fused}, "
                                     f"the param has {total}")
                off = 0
                for k, size in zip(keys, sizes, strict=True):
                    ts = t.torch_shape(_with(layer_shape, fused, size))
                    out.append(Move(k, path, rule, ts, idx, flax_slice=(off, off + size)))
                    off += size
            else:
                ts = t.torch_shape(layer_shape)
                out.append(Move(_fill(rule.torch_patterns[0], c), path, rule, ts, idx))
                for a in rule.aliases:
                    out.append(Move(_fill(a, c), path, rule, ts, idx, alias=True))
        return out

    # ---- torch -> flax

    def flax_writer(self, flax_template: Mapping[str, Any], torch_specs: Mapping[str, Any]) -> FlaxWriter:
        """A `FlaxWriter` for torch tensors with shapes `torch_specs` into params shaped like `flax_template`
        (nested, e.g. `jax.eval_shape(model.init, ...)["params"]`); checks the whole plan first."""
        flat = flatten(flax_template)
        moves = self.plan(flat, torch_specs, "torch -> flax")
        keep = {}
        for p, v in flat.items():
            if self.flax_only_param(p):
                if not hasattr(v, "__array__"):
                    raise ConversionError(
                        f"{self.name} rulebook: flax param {p!r} has no torch source (FlaxOnly); pass a template "
                        f"holding its initial values (e.g. model.init(...)['params']), not only shapes")
                keep[p] = np.array(v)
        w = FlaxWriter(self, {p: spec_of(v) for p, v in flat.items()}, moves,
                       {k: spec_of(v) for k, v in torch_specs.items()})
        w.buffers.update(keep)
        return w

    def to_flax(self, torch_tensors: Mapping[str, Any], flax_template: Mapping[str, Any]) -> dict[str, Any]:
        """{torch key: array} -> nested Flax params of numpy arrays in the template's dtypes."""
        w = self.flax_writer(flax_template, torch_tensors)
        for k, v in torch_tensors.items():
            w.add(k, v)
        return w.finish()

    # ---- flax -> torch

    def iter_torch(self, flax_params: Mapping[str, Any],
                   torch_specs: Mapping[str, Any] | None = None) -> Iterator[tuple[str, np.ndarray]]:
        """(torch key, array) one tensor at a time, after checking the whole plan. With `torch_specs` (e.g. the
        target model's state dict shapes) every key must be produced with its shape and dtype; without, torch keys
        come from the rules (aliases included) and dtypes stay the Flax ones."""
        flat = flatten(flax_params)
        moves = self.plan(flat, torch_specs, "flax -> torch")
        tspecs = None if torch_specs is None else {k: spec_of(v) for k, v in torch_specs.items()}
        by_key: dict[str, list[Move]] = collections.defaultdict(list)
        for mv in moves:
            by_key[mv.torch_key].append(mv)
        host: dict[str, np.ndarray] = {}  # a few whole params on the host, so a stacked one crosses once

        def fetch(path: str) -> np.ndarray:
            if path not in host:
                if len(host) >= 4:
                    host.pop(next(iter(host)))
                host[path] = np.asarray(flat[path])
            return host[path]

        for key, mvs in by_key.items():
            parts = []
            for mv in mvs:
                x = fetch(mv.flax_path)
                if mv.stack_index is not None:
                    x = np.take(x, mv.stack_index, axis=mv.rule.stack_axis)
                if mv.flax_slice is not None:
                    x = x[_index(x.ndim, mv.rule.fuse_axis, mv.flax_slice)]
                parts.append((mv, mv.rule.transform.to_torch(x)))
            dtype = tspecs[key][1] if tspecs is not None and tspecs[key][1] is not None else parts[0][1].dtype
            if len(parts) == 1 and parts[0][0].torch_slice is None:
                y = np.ascontiguousarray(parts[0][1], dtype=dtype)
            else:
                y = np.empty(mvs[0].torch_shape, dtype)
                for mv, x in parts:
                    y[_index(y.ndim, mv.rule.fuse_axis, mv.torch_slice)] = x
            yield key, y

    def to_torch(self, flax_params: Mapping[str, Any],
                 torch_specs: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
        """Nested Flax params -> {torch key: numpy array}."""
        return dict(self.iter_torch(flax_params, torch_specs))


class FlaxWriter:
    """Receives torch tensors one by one (any order) and writes them into preallocated Flax buffers."""

    def __init__(self, book: RuleBook, flax_specs: dict[str, Spec], moves: list[Move], torch_specs: dict[str, Spec]):
        self.book = book
        self.torch_specs = torch_specs
        self.moves: dict[str, list[Move]] = collections.defaultdict(list)
        src_dtype: dict[str, Any] = {}
        for mv in moves:
            self.moves[mv.torch_key].append(mv)
            src_dtype.setdefault(mv.flax_path, torch_specs[mv.torch_key][1])
        # the template's dtype; for a bare-shape template, the torch tensors' own
        self.buffers = {p: np.empty(shape, dtype or src_dtype.get(p) or np.float32)
                        for p, (shape, dtype) in flax_specs.items()}
        self.filled: set[tuple] = set()
        self.seen: set[str] = set()

    def add(self, key: str, array: Any) -> None:
        """Write torch tensor `key` (numpy array, any dtype: cast to the Flax param's) into its Flax slot(s)."""
        if key not in self.moves:
            if self.book.ignored(key):
                return
            raise ConversionError(f"{self.book.name} rulebook: torch key {key!r} was not in the planned torch keys "
                                  f"(plan with every key you will add)")
        array = np.asarray(array)
        want = self.moves[key][0].torch_shape
        if tuple(array.shape) != want:
            raise ConversionError(f"{self.book.name} rulebook: shape mismatch: torch {key!r} is {tuple(array.shape)}, "
                                  f"expected {want}")
        for mv in self.moves[key]:
            rule = mv.rule
            x = array if mv.torch_slice is None else array[_index(array.ndim, rule.fuse_axis, mv.torch_slice)]
            y = rule.transform.to_flax(x)
            buf = self.buffers[mv.flax_path]
            idx: list[Any] = [slice(None)] * buf.ndim
            fuse = rule.fuse_axis
            if mv.stack_index is not None:
                idx[rule.stack_axis] = mv.stack_index
                if fuse >= rule.stack_axis:
                    fuse += 1
            if mv.flax_slice is not None:
                idx[fuse] = slice(*mv.flax_slice)
            slot = (mv.flax_path, mv.stack_index, mv.flax_slice)
            if slot in self.filled:
                # a tied copy: must hold the very same tensor
                if y.astype(buf.dtype).tobytes() != np.ascontiguousarray(buf[tuple(idx)]).tobytes():
                    raise ConversionError(
                        f"{self.book.name} rulebook: torch {key!r} should be a tied copy of what is already in flax "
                        f"{mv.flax_path!r} (layer {mv.stack_index}), but its values differ")
            else:
                buf[tuple(idx)] = y
                self.filled.add(slot)
        self.seen.add(key)

    def finish(self) -> dict[str, Any]:
        """The nested Flax params; raises naming every planned torch key that was never added."""
        missing = [k for k, mvs in self.moves.items() if k not in self.seen and not all(m.alias for m in mvs)]
        if missing:
            raise ConversionError(f"{self.book.name} rulebook: {len(missing)} torch tensor(s) never added: "
                                  f"{missing[:20]}{' ...' if len(missing) > 20 else ''}")
        return unflatten(self.buffers)


def stream_to_flax(book: RuleBook, reader: Mapping[str, np.ndarray], flax_template: Mapping[str, Any],
                   specs: Mapping[str, Any] | None = None,
                   on_tensor: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Convert tensor by tensor from a lazy mapping (e.g. `safetensors_io.PreadReader`), planning on `specs` (default
    `reader.specs`) first; only the Flax buffers and one torch tensor are alive at a time."""
    specs = specs if specs is not None else getattr(reader, "specs", None)
    if specs is None:
        specs = {k: spec_of(reader[k]) for k in reader}
    w = book.flax_writer(flax_template, specs)
    for k in specs:
        w.add(k, reader[k])
        if on_tensor is not None:
            on_tensor(k)
    return w.finish()

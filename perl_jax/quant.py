"""Quantised storage of the frozen backbone's projection kernels: int8, 4-bit NF4, GGUF blocks,
and bfloat16 held as its bits.

In PERL the backbone never changes, so its projection kernels (attention q/k/v/o, MLP
gate/up/down) can be stored in 8 or 4 bits and dequantised inside each matmul; LoRA adapters,
heads, norms, embeddings and optimizer state keep their float dtypes.

  int8  symmetric, one scale per output channel: kernel ~ codes * scale, codes in [-127, 127],
        scale = max |w| over the contraction axes / 127 (f32).
  gguf  a GGUF file's own blocks, kept exactly (checkpoints.gguf): kernel ~ (code - bias) *
        scale + offset per block of the last contraction axis (32, or 16 where a Q6_K layer
        shares the path), codes of `bits` bits (5, 6 or 8: the widest layer of the path; bias
        2^(bits-1)), f32 scale and, for K-quants with minimums, offset. Leaves: `kernel` (low
        4 bits, two per byte), `high` (the bits above them, packed 8 // (bits - 4) per byte),
        `scale` and `offset`. A float kernel (random or SFT backbones) becomes 8-bit blocks of
        32 with absmax scales.
  nf4   QLoRA's NormalFloat4: blocks of 64 along the last contraction axis (fewer when that
        axis is shorter, see nf4_block), each scaled by its absmax (bf16) and rounded to the
        nearest of 16 normal quantiles; two codes per byte.
  bf16_bits  lossless: the bfloat16 kernel's 16-bit patterns (uint16, no scale), reinterpreted
        inside each matmul; the same numbers as weight_dtype "bfloat16". XLA:CPU has no bfloat16
        slicing: it converts a stacked bf16 layer kernel to f32 whole before the layer loop
        slices one layer out (an f32 copy of every frozen layer, twice the bf16 backbone, which
        no barrier prevents), while integer codes are sliced as they are. On GPU and TPU the two
        storages cost the same.

A kernel of shape in_shape + out_shape (with a leading layer axis when layers are stacked)
becomes two leaves beside each other (bf16_bits: the uint16 `kernel` alone): `kernel` (int8,
or uint8 with the last contraction axis halved) and `scale` (the kernel's shape with the
contraction axes reduced to 1 for int8, or the last one divided by the block length for nf4).
Both keep the kernel's rank, so the kernel's sharding rule shards them the same way
(perl_jax.sharding), and an NF4 block never straddles two shards.

The output embedding (`model.embedding_dtype`) can be stored the same way: the tied table
`embedder/input_embedding` [vocab, d] is a kernel whose vocabulary axis leads and whose d axis is
contracted (per-row int8 scales, NF4 blocks along d), an untied `lm_head/kernel` [d, vocab] an
ordinary one; the scales sit beside them as `embedder/scale` / `lm_head/scale`. The input lookup
dequantises only the gathered rows, the log-prob computation one vocabulary tile at a time
(perl_jax.logprobs).

The functions take numpy or jax.numpy arrays (`xp`): checkpoint loaders quantise each tensor on
the host as it is read, jitted code quantises an SFT or random backbone on device.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

FORMATS = ("int8", "nf4", "gguf", "bf16_bits")
NF4_BLOCK = 64
# QLoRA's NF4 code values (Dettmers et al. 2023, appendix E), in increasing order.
NF4_VALUES = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
_NF4_MIDPOINTS = (NF4_VALUES[1:] + NF4_VALUES[:-1]) / 2
SCALE_DTYPES = {"int8": np.float32, "nf4": jnp.bfloat16}
CODE_DTYPES = {"int8": jnp.int8, "nf4": jnp.uint8, "bf16_bits": jnp.uint16}

# Projection kernels and how many contraction axes each has (the rest are outputs).
_PROJECTION = re.compile(r"(^|/)(attn/(q|k|v|o)|mlp/(gate|up|down))/kernel$")


def check_format(fmt: str) -> None:
  if fmt not in FORMATS:
    raise ValueError(f"unknown weight format {fmt!r}; quantised formats are {FORMATS}")


def contraction_axes(path: str) -> int | None:
  """How many leading (contraction) axes the kernel at `path` has, None if it is not a
  projection kernel that is quantised."""
  match = _PROJECTION.search(path)
  if not match:
    return None
  return 2 if match.group(2) == "attn/o" else 1


def embedding_axes(path: str) -> tuple[int, int] | None:
  """(leading axes, contraction axes) of the output embedding at `path`, None for other leaves."""
  if re.search(r"(^|/)embedder/input_embedding$", path):
    return 1, 1  # [vocab, d]
  if re.search(r"(^|/)lm_head/kernel$", path):
    return 0, 1  # [d, vocab]
  return None


def scale_path(path: str) -> str:
  """Where the scales of the stored kernel at `path` go: beside it, named `scale`."""
  return path.rsplit("/", 1)[0] + "/scale" if "/" in path else "scale"


def _xp(x):
  return np if isinstance(x, np.ndarray) else jnp


def stored_shapes(shape: tuple, fmt: str, n_in: int, n_lead: int = 0) -> tuple[tuple, tuple]:
  """(codes shape, scale shape) of a kernel of `shape` (n_lead leading layer axes, then n_in
  contraction axes)."""
  check_format(fmt)
  shape, last = tuple(shape), n_lead + n_in - 1
  if fmt == "bf16_bits":
    return shape, None
  if fmt == "int8":
    return shape, shape[:n_lead] + (1,) * n_in + shape[n_lead + n_in:]
  block = nf4_block(shape[last], shape)
  return (shape[:last] + (shape[last] // 2,) + shape[last + 1:],
          shape[:last] + (shape[last] // block,) + shape[last + 1:])


def nf4_block(size: int, shape: tuple = ()) -> int:
  """NF4 block length along a contraction axis of `size`: 64, or for a smaller axis (a tiny
  model's head_dim) the largest even divisor of it up to 64."""
  block = next((b for b in range(NF4_BLOCK, 1, -2) if size % b == 0), None)
  if block is None:
    raise ValueError(f"nf4 needs an even last contraction axis, got {size} (kernel shape "
                     f"{shape}): use int8 for this model")
  return block


def quantize(kernel, fmt: str, n_in: int, n_lead: int = 0):
  """(codes, scale) of a float kernel; see the module docstring for their layouts."""
  check_format(fmt)
  xp = _xp(kernel)
  if fmt == "bf16_bits":
    bf16 = kernel.astype(jnp.bfloat16)
    return (bf16.view(np.uint16) if xp is np
            else jax.lax.bitcast_convert_type(bf16, jnp.uint16)), None
  w = kernel.astype(xp.float32)
  if fmt == "int8":
    axes = tuple(range(n_lead, n_lead + n_in))
    scale = (xp.max(xp.abs(w), axis=axes, keepdims=True) * (1 / 127)).astype(SCALE_DTYPES[fmt])
    safe = xp.where(scale == 0, 1, scale.astype(xp.float32))
    codes = xp.clip(xp.round(w / safe), -127, 127).astype(xp.int8)
    return codes, scale
  last = n_lead + n_in - 1
  block = nf4_block(w.shape[last], w.shape)
  blocks = w.reshape(w.shape[:last] + (w.shape[last] // block, block) + w.shape[last + 1:])
  scale = xp.max(xp.abs(blocks), axis=last + 1).astype(SCALE_DTYPES[fmt])
  safe = xp.where(scale == 0, 1, scale.astype(xp.float32))
  normalized = blocks / xp.expand_dims(safe, last + 1)
  index = xp.searchsorted(xp.asarray(_NF4_MIDPOINTS), normalized).astype(xp.uint8)
  pairs = index.reshape(index.shape[:last + 1] + (block // 2, 2) + index.shape[last + 2:])
  low = xp.take(pairs, 0, axis=last + 2)
  high = xp.take(pairs, 1, axis=last + 2)
  packed = (low | (high << 4)).astype(xp.uint8)
  codes = packed.reshape(w.shape[:last] + (w.shape[last] // 2,) + w.shape[last + 1:])
  return codes, scale


def dequantize(codes, scale, fmt: str, n_in: int, dtype=jnp.float32, n_lead: int = 0):
  """The float kernel `codes` and `scale` stand for, in `dtype`."""
  check_format(fmt)
  xp = _xp(codes)
  if fmt == "bf16_bits":
    bf16 = (codes.view(jnp.bfloat16) if xp is np
            else jax.lax.bitcast_convert_type(codes, jnp.bfloat16))
    return bf16.astype(dtype)
  if fmt == "int8":
    return (codes.astype(xp.float32) * scale.astype(xp.float32)).astype(dtype)
  last = n_lead + n_in - 1
  shape, num_blocks = codes.shape, scale.shape[last]
  block = shape[last] * 2 // num_blocks
  blocks = codes.reshape(shape[:last] + (num_blocks, block // 2) + shape[last + 1:])
  index = xp.stack([blocks & 15, blocks >> 4], axis=last + 2)
  index = index.reshape(shape[:last] + (num_blocks, block) + shape[last + 1:])
  values = xp.asarray(NF4_VALUES)[index.astype(xp.int32)]
  values = values * xp.expand_dims(scale.astype(xp.float32), last + 1)
  return values.reshape(shape[:last] + (shape[last] * 2,) + shape[last + 1:]).astype(dtype)


def is_quantized(weight_dtype: str) -> bool:
  return weight_dtype in FORMATS


def store_on_mesh(params: dict, weight_dtype: str, mesh, embedding_dtype: str = "") -> dict:
  """store_params jitted onto the stored leaves' shardings on `mesh` (perl_jax.sharding rules);
  only the leaves that change are passed through the jitted function."""
  if not weight_dtype and not embedding_dtype:
    return params
  from flax import traverse_util
  from perl_jax import sharding as sharding_lib
  flat = traverse_util.flatten_dict(params, sep="/")
  changing = {p: v for p, v in flat.items() if _format_of(p, weight_dtype, embedding_dtype)[0]}
  if not changing:
    return params

  def store(leaves):
    out = {}
    for path, value in leaves.items():
      out.update(store_kernel(value, path, weight_dtype, embedding_dtype))
    return out

  shardings = sharding_lib.tree_shardings(jax.eval_shape(store, changing), mesh)
  stored = jax.jit(store, out_shardings=shardings)(changing)
  unchanged = {p: v for p, v in flat.items() if p not in changing}
  return traverse_util.unflatten_dict({**unchanged, **stored}, sep="/")


def _format_of(path: str, weight_dtype: str, embedding_dtype: str
               ) -> tuple[str, int | None, int]:
  """(storage format, contraction axes, leading axes) of the leaf at `path`; format "" = kept."""
  embedding = embedding_axes(path)
  if embedding is not None:
    return (embedding_dtype, embedding[1], embedding[0]) if embedding_dtype else ("", None, 0)
  n_in = contraction_axes(path) if weight_dtype else None
  if n_in is None:
    return "", None, 0
  return weight_dtype, n_in, 1 if re.search(r"(^|/)layers/", path) else 0


def store_kernel(value, path: str, weight_dtype: str, embedding_dtype: str = "") -> dict:
  """{path: stored kernel} or {path: codes, <path>/../scale: scales} of one leaf (any leaf that
  is neither a projection kernel nor the output embedding is returned as it is).
  weight_dtype (projection kernels) / embedding_dtype (the output embedding): "" (as it is),
  "float32"/"bfloat16" (a cast) or a quantised format."""
  fmt, n_in, n_lead = _format_of(path, weight_dtype, embedding_dtype)
  if not fmt:
    return {path: value}
  if not is_quantized(fmt):
    return {path: value.astype(fmt)}
  if fmt == "gguf":
    if embedding_axes(path) is not None:
      raise ValueError("embedding_dtype 'gguf' is not supported: use int8 or nf4")
    base = path.rsplit("/", 1)[0]
    return {f"{base}/{leaf}": v for leaf, v in quantize_gguf(value, n_in, n_lead).items()}
  if fmt == "bf16_bits" and embedding_axes(path) is not None:
    raise ValueError("embedding_dtype 'bf16_bits' is not supported: use bfloat16, int8 or nf4")
  codes, scale = quantize(value, fmt, n_in, n_lead)
  return {path: codes} if scale is None else {path: codes, scale_path(path): scale}


def store_params(params: dict, weight_dtype: str, embedding_dtype: str = "") -> dict:
  """A float backbone tree with its projection kernels stored as `weight_dtype` and its output
  embedding as `embedding_dtype` (see store_kernel); pure, so under jit it runs on device on
  each kernel's sharding."""
  if not weight_dtype and not embedding_dtype:
    return params
  from flax import traverse_util
  out = {}
  for path, value in traverse_util.flatten_dict(params, sep="/").items():
    out.update(store_kernel(value, path, weight_dtype, embedding_dtype))
  return traverse_util.unflatten_dict(out, sep="/")


def dequantize_slice(group: dict, name: str, fmt: str, axis: int, dtype, start=None,
                     size: int | None = None):
  """The float kernel group[name] (stored as `fmt`, scales in group["scale"]), or its
  [start, start + size) slice along `axis` (the output embedding's vocabulary axis: 0 for the
  tied [vocab, d] table, 1 for lm_head [d, vocab]); only that slice is dequantised."""
  codes, scale = group[name], group.get("scale")
  if start is not None:
    codes = jax.lax.dynamic_slice_in_dim(codes, start, size, axis)
    if scale is not None:
      scale = jax.lax.dynamic_slice_in_dim(scale, start, size, axis)
  if scale is None:
    return codes.astype(dtype)
  return dequantize(codes, scale, fmt, 1, dtype, n_lead=1 if axis == 0 else 0)


def lookup_rows(group: dict, fmt: str, tokens, dtype):
  """Rows `tokens` [...] of the [vocab, d] table group["input_embedding"], as floats [..., d]
  (a quantised table: only the gathered rows are dequantised)."""
  table, scale = group["input_embedding"], group.get("scale")
  rows = jnp.take(table, tokens, axis=0)
  if scale is None:
    return rows.astype(dtype)
  return dequantize(rows, jnp.take(scale, tokens, axis=0), fmt, 1, dtype, n_lead=tokens.ndim)


# ----------------------------------------------------------------------------- gguf blocks

GGUF_BLOCK = 32  # blocks of a float kernel stored as "gguf" (Q8_0's length)


def pack_bits(values, bits: int, axis: int):
  """uint8 `values` < 2**bits packed 8 // bits per byte along `axis` (the first in the low
  bits), numpy or jax."""
  xp = _xp(values)
  per = 8 // bits
  v = xp.moveaxis(values.astype(xp.uint8), axis, -1)
  v = v.reshape(v.shape[:-1] + (v.shape[-1] // per, per))
  packed = v[..., 0]
  for j in range(1, per):
    packed = packed | (v[..., j] << (bits * j))
  return xp.moveaxis(packed.astype(xp.uint8), -1, axis)


def unpack_bits(packed, bits: int, axis: int):
  """The inverse of pack_bits."""
  xp = _xp(packed)
  per, mask = 8 // bits, (1 << bits) - 1
  p = xp.moveaxis(packed, axis, -1)
  parts = xp.stack([(p >> (bits * j)) & mask for j in range(per)], axis=-1)
  return xp.moveaxis(parts.reshape(p.shape[:-1] + (p.shape[-1] * per,)), -1, axis)


def gguf_leaves(codes, scale, offset, bits: int, axis: int) -> dict:
  """Stored "gguf" leaves of signed integer `codes` (|code| < 2**(bits-1)) with per-block
  `scale` / `offset` (None: no minimums), blocks and packing along `axis`."""
  xp = _xp(codes)
  unsigned = (codes.astype(xp.int32) + (1 << (bits - 1))).astype(xp.uint8)
  leaves = {"kernel": pack_bits(unsigned & 15, 4, axis),
            "high": pack_bits(unsigned >> 4, bits - 4, axis),
            "scale": scale.astype(xp.float32)}
  if offset is not None:
    leaves["offset"] = offset.astype(xp.float32)
  return leaves


def gguf_bits(leaves: dict, axis: int) -> int:
  """Code width of stored "gguf" leaves, from the packed shapes."""
  n = leaves["kernel"].shape[axis] * 2
  return 4 + 8 * leaves["high"].shape[axis] // n


def dequantize_gguf(leaves: dict, n_in: int, dtype=jnp.float32, n_lead: int = 0):
  """The float kernel stored "gguf" leaves stand for: (code - bias) * scale (+ offset), in f32
  first (the GGUF reference's arithmetic, so the values are exactly the file's), then `dtype`."""
  xp = _xp(leaves["kernel"])
  axis = n_lead + n_in - 1
  bits = gguf_bits(leaves, axis)
  unsigned = unpack_bits(leaves["kernel"], 4, axis) | (unpack_bits(leaves["high"], bits - 4,
                                                                   axis) << 4)
  codes = (unsigned.astype(xp.int32) - (1 << (bits - 1))).astype(xp.float32)
  shape, num_blocks = codes.shape, leaves["scale"].shape[axis]
  blocks = codes.reshape(shape[:axis] + (num_blocks, shape[axis] // num_blocks) + shape[axis + 1:])
  values = blocks * xp.expand_dims(leaves["scale"].astype(xp.float32), axis + 1)
  if "offset" in leaves:
    values = values + xp.expand_dims(leaves["offset"].astype(xp.float32), axis + 1)
  return values.reshape(shape).astype(dtype)


def quantize_gguf(kernel, n_in: int, n_lead: int = 0) -> dict:
  """"gguf" leaves of a float kernel: 8-bit symmetric blocks of 32 (or the whole axis when it
  is shorter), absmax / 127 scales, no offset."""
  xp = _xp(kernel)
  w = kernel.astype(xp.float32)
  axis = n_lead + n_in - 1
  block = GGUF_BLOCK if w.shape[axis] % GGUF_BLOCK == 0 else w.shape[axis]
  blocks = w.reshape(w.shape[:axis] + (w.shape[axis] // block, block) + w.shape[axis + 1:])
  scale = xp.max(xp.abs(blocks), axis=axis + 1) * (1 / 127)
  safe = xp.expand_dims(xp.where(scale == 0, 1, scale), axis + 1)
  codes = xp.clip(xp.round(blocks / safe), -127, 127).reshape(w.shape).astype(xp.int8)
  return gguf_leaves(codes, scale, None, 8, axis)


def gguf_shapes(shape: tuple, n_in: int, n_lead: int = 0) -> dict:
  """Leaf shapes of a float kernel of `shape` stored "gguf" by quantize_gguf."""
  shape, axis = tuple(shape), n_lead + n_in - 1
  block = GGUF_BLOCK if shape[axis] % GGUF_BLOCK == 0 else shape[axis]
  at = lambda n: shape[:axis] + (n,) + shape[axis + 1:]
  return {"kernel": at(shape[axis] // 2), "high": at(shape[axis] // 2),
          "scale": at(shape[axis] // block)}

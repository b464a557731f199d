"""The collectives of a compiled program, read from its HLO text: op, bytes, mesh axes.

  records = collectives(compiled.as_text(), mesh)
  summary(records)  # {op: (count, bytes)}; by_axes(records) # {(op, axes): count}

Ops: all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute. An asynchronous
pair (`all-gather-start` / `-done`, as GPU and TPU emit) counts once, as maxtext's HLO tests
count them. Bytes are the op's result on one device (for an async start, the result half of
its (operand, result) tuple). The mesh axes of an op are those along which the devices of one
of its groups differ: an all-reduce over ("tensor",) is a Megatron reduction, one over
("data", "fsdp") a gradient reduction. Device ids in the HLO are positions in the program's
device assignment, which for a mesh-sharded jit is `mesh.devices` flattened.
"""
import dataclasses
import math
import re
from typing import Tuple

import numpy as np

OPS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_INSTRUCTION = re.compile(
    r"=\s*(?P<shape>.*?)\s(?P<op>" + "|".join(OPS) + r")(?P<start>-start)?\(")
_ARRAY = re.compile(r"\b(?P<dtype>pred|s4|u4|s8|u8|s16|u16|f16|bf16|s32|u32|f32|s64|u64|f64|"
                    r"c64|c128|f8e4m3fn|f8e5m2)\[(?P<dims>[\d,]*)\]")
_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
          "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
          "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
_EXPLICIT_GROUPS = re.compile(r"replica_groups=\{(?P<groups>(?:\{[\d,]*\},?)*)\}")
_IOTA_GROUPS = re.compile(
    r"replica_groups=\[(?P<shape>[\d,]+)\]<=\[(?P<dims>[\d,]+)\](?:T\((?P<perm>[\d,]+)\))?")
_PAIRS = re.compile(r"source_target_pairs=\{(?P<pairs>(?:\{\d+,\d+\},?)*)\}")


@dataclasses.dataclass(frozen=True)
class Collective:
  op: str
  bytes: int
  axes: Tuple[str, ...]   # mesh axes its groups span; () when it moves nothing across devices


def _result_bytes(shape_text, op, is_start):
  arrays = [(m.group("dtype"), m.group("dims")) for m in _ARRAY.finditer(shape_text)]
  if is_start and op != "all-reduce" and len(arrays) >= 2:
    arrays = arrays[len(arrays) // 2:]   # (operands..., results...)
  total = 0
  for dtype, dims in arrays:
    total += _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return int(total)


def _groups(line, num_devices):
  """The device groups of one instruction (lists of flat device positions)."""
  pairs = _PAIRS.search(line)
  if pairs:
    return [[int(x) for x in p.split(",")] for p in re.findall(r"\{(\d+,\d+)\}",
                                                                pairs.group("pairs"))]
  iota = _IOTA_GROUPS.search(line)
  if iota:
    shape = [int(x) for x in iota.group("shape").split(",")]
    dims = [int(x) for x in iota.group("dims").split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if iota.group("perm"):
      ids = ids.transpose([int(x) for x in iota.group("perm").split(",")])
    return ids.reshape(shape).tolist()
  explicit = _EXPLICIT_GROUPS.search(line)
  if explicit and explicit.group("groups"):
    return [[int(x) for x in g.split(",") if x]
            for g in re.findall(r"\{([\d,]*)\}", explicit.group("groups"))]
  return [list(range(num_devices))]   # replica_groups={} : every device


def _axes(groups, mesh_shape, axis_names):
  varying = set()
  for group in groups:
    if len(group) < 2:
      continue
    coords = np.array(np.unravel_index(group, mesh_shape)).T
    varying.update(int(i) for i in np.nonzero((coords != coords[0]).any(axis=0))[0])
  return tuple(axis_names[i] for i in sorted(varying))


def collectives(hlo_text, mesh):
  """Every collective of `hlo_text` (a compiled program's `as_text()`), in program order."""
  mesh_shape = tuple(mesh.devices.shape)
  records = []
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.search(line)
    if not match:
      continue
    op, is_start = match.group("op"), bool(match.group("start"))
    groups = _groups(line, int(np.prod(mesh_shape)))
    records.append(Collective(op, _result_bytes(match.group("shape"), op, is_start),
                              _axes(groups, mesh_shape, tuple(mesh.axis_names))))
  return records


def summary(records):
  """{op: (count, bytes)} for every op in OPS (zeros included)."""
  out = {op: [0, 0] for op in OPS}
  for r in records:
    out[r.op][0] += 1
    out[r.op][1] += r.bytes
  return {op: tuple(v) for op, v in out.items()}


def by_axes(records):
  """{(op, axes): count}."""
  out = {}
  for r in records:
    out[(r.op, r.axes)] = out.get((r.op, r.axes), 0) + 1
  return out


def format_lines(records):
  """Human-readable lines: per op count and MiB, then per (op, mesh axes) counts."""
  lines = ["collectives per step (count, MiB per device):"]
  for op, (count, size) in summary(records).items():
    lines.append(f"  {op:<19} {count:5d}  {size / 2 ** 20:10.2f} MiB")
  for (op, axes), count in sorted(by_axes(records).items()):
    lines.append(f"    {op} over {'x'.join(axes) or 'no axis'}: {count}")
  return lines

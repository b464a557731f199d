"""hlo_collectives: ops, bytes and mesh axes read from compiled HLO text."""
import types

import numpy as np

from detailflow_jax import hlo_collectives as hc

MESH = types.SimpleNamespace(devices=np.zeros((2, 2, 2)), axis_names=("data", "fsdp", "tensor"))

HLO = """
ENTRY %main {
  %ar = f32[64,32]{1,0} all-reduce(f32[64,32]{1,0} %p), channel_id=1, replica_groups={{0,1},{2,3},{4,5},{6,7}}, use_global_device_ids=true, to_apply=%add
  %ar2 = (f32[10]{0}, bf16[4]{0}) all-reduce(f32[10]{0} %a, bf16[4]{0} %b), channel_id=2, replica_groups={}, to_apply=%add
  %ags = (f32[4,8]{1,0}, f32[8,8]{1,0}) all-gather-start(f32[4,8]{1,0} %x), channel_id=3, replica_groups=[2,4]<=[8], dimensions={0}, use_global_device_ids=true
  %agd = f32[8,8]{1,0} all-gather-done((f32[4,8]{1,0}, f32[8,8]{1,0}) %ags)
  %rs = f32[2]{0} reduce-scatter(f32[4]{0} %y), channel_id=4, replica_groups=[4,2]<=[2,4]T(1,0), dimensions={0}, use_global_device_ids=true, to_apply=%add
  %cp = s32[3]{0} collective-permute(s32[3]{0} %z), channel_id=5, source_target_pairs={{0,2},{2,0},{1,3},{3,1}}
  %a2a = f32[16]{0} all-to-all(f32[16]{0} %w), channel_id=6, replica_groups={{0,4},{1,5},{2,6},{3,7}}, dimensions={0}
  %not = f32[16]{0} add(f32[16]{0} %w, f32[16]{0} %w), metadata={op_name="all-reduce"}
}
"""


def test_ops_bytes_and_axes():
  records = hc.collectives(HLO, MESH)
  assert records == [
      hc.Collective("all-reduce", 64 * 32 * 4, ("tensor",)),
      hc.Collective("all-reduce", 10 * 4 + 4 * 2, ("data", "fsdp", "tensor")),
      hc.Collective("all-gather", 8 * 8 * 4, ("fsdp", "tensor")),   # the start counts, once
      hc.Collective("reduce-scatter", 2 * 4, ("data",)),            # iota groups, transposed
      hc.Collective("collective-permute", 3 * 4, ("fsdp",)),
      hc.Collective("all-to-all", 16 * 4, ("data",)),
  ]
  summary = hc.summary(records)
  assert summary["all-reduce"] == (2, 64 * 32 * 4 + 48)
  assert summary["collective-permute"] == (1, 12)
  assert hc.by_axes(records)[("all-reduce", ("tensor",))] == 1
  lines = hc.format_lines(records)
  assert lines[1].split()[:2] == ["all-reduce", "2"]
  assert "    all-gather over fsdpxtensor: 1" in lines

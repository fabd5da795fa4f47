r"""Per-chip memory of the training step compiled ahead of time for a TPU topology, with one
slice's mesh laid out two ways: the devices in their order (`--layout=order`, the layout before
the topology-aware mesh) and `mesh_utils.create_device_mesh` (`--layout=topology`, what
`partitioning.make_mesh` does now).

  python -m bench.aot_mesh --config=experiments/retro_172m.py --topology=v5e:4x4 \
      --per_chip_batch=4 --layout=order      # and --layout=topology

Appends one JSON line (retro_jax.training.aot.compile_step's result, the layout, the mesh's device
ids and provenance) to bench/results/aot_mesh.jsonl. Nothing runs on a TPU (libtpu compiles).
"""
from __future__ import annotations

import functools
import json

from absl import app, flags

from bench.common import run_provenance
from retro_jax import flags as shared
from retro_jax.errors import guard
from retro_jax.model import partitioning
from retro_jax.training import aot, experiment

FLAGS = flags.FLAGS
shared.define("config", required=True, note="the model and recipe to compile")
flags.DEFINE_string("topology", "v5e:4x4", "TPU topology, e.g. v5e:4x4, v5p:2x2x4")
flags.DEFINE_integer("per_chip_batch", None, "sequences per chip (default: the experiment's)")
flags.DEFINE_enum("layout", "topology", ["order", "topology"],
                  "order: the devices in their order; topology: mesh_utils.create_device_mesh")
flags.DEFINE_string("out", "bench/results/aot_mesh.jsonl", "appended, one JSON line")


def main(argv):
  del argv
  c = experiment.with_defaults(FLAGS.config)
  aware = FLAGS.layout == "topology"
  # compile_step builds its mesh with partitioning.make_mesh; the layout is that function's switch.
  aot.make_mesh = functools.partial(partitioning.make_mesh, topology_aware=aware)
  _, devices = aot.topology_devices(FLAGS.topology)
  grid = partitioning.make_mesh(tuple(c.mesh), devices, topology_aware=aware).devices
  res = aot.compile_step(experiment.model_config(c), FLAGS.topology, c.seq_len, tuple(c.mesh),
                         per_chip_batch=FLAGS.per_chip_batch, global_batch=c.global_batch,
                         grad_accum_steps=c.grad_accum_steps, size=c.model_size)
  res.update(layout=FLAGS.layout, device_ids=[int(d.id) for d in grid.flat],
             provenance=run_provenance("bench.aot_mesh"))
  print(f"{res['size']} on {res['topology']}, layout {FLAGS.layout} {res['device_ids']}: "
        f"per-chip memory {res['per_chip_gib']:.3f} GiB (temporaries {res['temp_gib']:.3f}), "
        f"compiled in {res['compile_s']} s")
  with open(FLAGS.out, "a") as f:
    f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
  app.run(guard(main), flags_parser=shared.parse)

"""Parameter counts of the paper's four sizes against Table 2, from nnx.eval_shape (nothing is
allocated; seconds on a CPU). Writes bench/results/param_counts.json; docs/design.md's table is
written from it by `python -m bench.docs_tables`.

    python -m bench.param_counts [--out=bench/results/param_counts.json]
"""
import argparse
import json

from flax import nnx

from retro_jax.evaluation.figures import provenance
from retro_jax.model import PAPER_PARAM_COUNTS, PAPER_SIZES, Retro, count_params


def counts(size: str) -> dict:
  """Non-embedding baseline and RETRO counts, RETRO's with embeddings, and Table 2's."""
  cfg = PAPER_SIZES[size]
  retro = nnx.eval_shape(lambda: Retro(cfg, rngs=nnx.Rngs(0)))
  base = nnx.eval_shape(lambda: Retro(cfg.baseline(), rngs=nnx.Rngs(0)))
  want_base, want_retro = PAPER_PARAM_COUNTS[size]
  return {"d_model": cfg.d_model, "layers": cfg.num_layers, "cca_layers": list(cfg.cca_layers),
          "baseline": count_params(base), "retro": count_params(retro),
          "retro_with_embeddings": count_params(retro, non_embedding=False),
          "table2_baseline": want_base, "table2_retro": want_retro}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default="bench/results/param_counts.json")
  args = p.parse_args()
  cmd = "python -m bench.param_counts" + (f" --out={args.out}"
                                          if args.out != p.get_default("out") else "")
  res = {"provenance": provenance(cmd), "sizes": {s: counts(s) for s in PAPER_PARAM_COUNTS}}
  with open(args.out, "w") as f:
    json.dump(res, f, indent=1)
    f.write("\n")
  print(json.dumps(res["sizes"]))


if __name__ == "__main__":
  main()

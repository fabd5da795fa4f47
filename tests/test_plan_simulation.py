"""The build's planning stays flat from 1e7 to 2.8e10 chunks (bench/plan_simulation.py: the real
planning code over a simulated layout, metadata only)."""

from bench import plan_simulation


def test_graph_and_launcher_requests_stay_flat_to_28_billion_chunks(tmp_path):
  small = plan_simulation.simulate(10_000_000, str(tmp_path))
  big = plan_simulation.simulate(28_000_000_000, str(tmp_path))
  for stage in plan_simulation.STAGES:
    s, b = small["stages"][stage], big["stages"][stage]
    assert b["graph_bytes"] <= 5_000_000, (stage, b["graph_bytes"])
    assert b["graph_bytes"] <= 2 * s["graph_bytes"], (stage, s["graph_bytes"], b["graph_bytes"])
    assert b["launcher_requests"] <= 2 * s["launcher_requests"], (stage, s, b)
    # No shard list, shard file or per-shard record is touched by the launcher.
    assert not [p for p in b["launcher_paths"] if "shard" in p], b["launcher_paths"]
    assert min(b["grouping_keys"].values()) >= 1000, (stage, b["grouping_keys"])
  # The chunk store, the embeddings and the index are known from fixed-size files.
  for stage in plan_simulation.STAGES:
    assert big["stages"][stage]["launcher_bytes_read"] <= 2 * small["stages"][stage][
        "launcher_bytes_read"]
  assert big["train_sample"] >= 39 * big["nlist"]
  # Index training: one k-means at 1e7 (the 10M build's bytes); at 2.8e10 in parallel elements,
  # each of which holds fewer vectors than the threshold above which training goes parallel.
  assert not small["training"]["parallel"] and small["training"]["elements"] == 1
  t = big["training"]
  assert t["parallel"] and min(t["element_keys"][k] for k in ("assign", "cell")) >= 1000, t
  assert t["largest_element_vectors"] <= t["threshold_vectors"] < t["sample"], t
  assert t["largest_element_bytes_float32"] <= 2 << 30, t
  assert t["nlist"] <= t["sample_over_39"], t


def test_a_jsonl_corpus_plans_in_bounded_byte_ranges_without_reading(tmp_path):
  """The tokenizer and chunks stages over a .jsonl of 1e9 and 1e13 bytes (sparse, never read):
  the launcher reads no byte of it, its requests stay flat, the graph stays under 5 MB."""
  small = plan_simulation.simulate_corpus("jsonl", 10**9, str(tmp_path))
  big = plan_simulation.simulate_corpus("jsonl", 10**13, str(tmp_path))
  assert big["units"] <= plan_simulation.corpus_lib.PLAN_UNITS + 1 < 10**13 // (8 << 20)
  for stage in plan_simulation.CORPUS_STAGES:
    s, b = small["stages"][stage], big["stages"][stage]
    assert s["launcher_bytes_read"] == b["launcher_bytes_read"] == 0
    assert b["launcher_requests"] == s["launcher_requests"]
    assert b["graph_bytes"] <= 5_000_000, (stage, b)

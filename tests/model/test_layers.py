"""cpu_forms.project and cpu_forms.einsum equal plain jnp.einsum, gradients included."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retro_jax.model.cpu_forms import einsum, project

SPECS = [  # (spec, shape of a, shape of b): the attention's contractions
    ("bqhk,bgshk->bhqgs", (2, 5, 3, 4), (2, 2, 6, 3, 4)),
    ("bhqk,bhpk->bhqp", (2, 3, 5, 4), (2, 3, 7, 4)),
    ("bhqgs,bgshk->bqhk", (2, 3, 5, 2, 6), (2, 2, 6, 3, 4)),
    ("bqcrk,bgsck->bcrqgs", (2, 5, 2, 2, 4), (2, 1, 6, 2, 4)),
]


@pytest.mark.parametrize("spec,shape_a,shape_b", SPECS)
def test_einsum_value_and_gradients_match_jnp(spec, shape_a, shape_b):
  ka, kb, kg = jax.random.split(jax.random.key(0), 3)
  a, b = jax.random.normal(ka, shape_a), jax.random.normal(kb, shape_b)
  want = jnp.einsum(spec, a, b)
  g = jax.random.normal(kg, want.shape)
  np.testing.assert_allclose(einsum(spec, a, b), want, rtol=1e-5, atol=1e-5)
  ours = jax.grad(lambda a, b: jnp.sum(einsum(spec, a, b) * g), argnums=(0, 1))(a, b)
  ref = jax.grad(lambda a, b: jnp.sum(jnp.einsum(spec, a, b) * g), argnums=(0, 1))(a, b)
  for x, y in zip(ours, ref):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


def test_einsum_out_dtype_and_bf16_gradients():
  a = jnp.ones((2, 3, 4), jnp.bfloat16)
  b = jnp.ones((2, 5, 4), jnp.bfloat16)
  out = einsum("bqk,bsk->bqs", a, b, jnp.float32)
  assert out.dtype == jnp.float32 and float(out[0, 0, 0]) == 4.0
  ga, gb = jax.grad(lambda a, b: einsum("bqk,bsk->bqs", a, b, jnp.float32).sum(), (0, 1))(a, b)
  assert ga.dtype == gb.dtype == jnp.bfloat16 and float(ga[0, 0, 0]) == 5.0


def test_project_matches_einsum_over_several_axes():
  kx, kw = jax.random.split(jax.random.key(1))
  x = jax.random.normal(kx, (2, 3, 4, 5))   # [B, Q, H, K]
  w = jax.random.normal(kw, (4, 5, 6))      # [H, K, D]
  np.testing.assert_allclose(project(x, w, n_in=2), jnp.einsum("bqhk,hkd->bqd", x, w),
                             rtol=1e-5, atol=1e-5)
  w2 = jax.random.normal(kw, (5, 3, 2))     # [K, H', K']
  np.testing.assert_allclose(project(x, w2), jnp.einsum("bqhk,kij->bqhij", x, w2),
                             rtol=1e-5, atol=1e-5)

"""The next-token loss: one definition for training, evaluation and the examples."""
import jax
import jax.numpy as jnp


def token_nll(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
  """Per-token negative log-likelihood in nats, float32 [B, T].

  logsumexp minus the target logit, the latter as a one-hot product: it fuses, and its backward
  pass needs no [B, T, V] scatter (take_along_axis would).
  """
  logits_BxTxV = logits_BxTxV.astype(jnp.float32)
  target_BxT = jnp.sum(logits_BxTxV * jax.nn.one_hot(targets_BxT, logits_BxTxV.shape[-1],
                                                     dtype=jnp.float32), axis=-1)
  return jax.nn.logsumexp(logits_BxTxV, axis=-1) - target_BxT


def cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array, pad_id: int):
  """Summed next-token loss in nats over non-pad targets, and the number of such targets."""
  mask_BxT = (targets_BxT != pad_id).astype(jnp.float32)
  return jnp.sum(token_nll(logits_BxTxV, targets_BxT) * mask_BxT), jnp.sum(mask_BxT)

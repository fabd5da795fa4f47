"""retro-jax: the Retrieval-Enhanced Transformer (RETRO, arXiv 2112.04426) in JAX / Flax NNX."""

import logging
import warnings

# apache-beam 2.77 needs protobuf < 7, which holds grpcio at 1.80; google-auth and google-api-core
# warn on import about grpcio < 1.83 (no post-quantum TLS), a warning no user of ours can act on.
warnings.filterwarnings("ignore", message=r"(?s).*grpcio < 1\.83\.0", category=FutureWarning)


class _NoApitoolsNotice(logging.Filter):
  """apache-beam logs on the root logger at import that Google's apitools is missing: it serves
  BigQuery I/O, which the database build does not use."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("apitools not found")


logging.getLogger().addFilter(_NoApitoolsNotice())

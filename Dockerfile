# imgcurate image: Ray 2.60 (CUDA, Python 3.11) plus imgcurate with its model and index extras.
# One image runs the head, the CPU download workers and the GPU workers
# (cluster/raycluster.yaml, rayjob.yaml, raycronjob.yaml, cluster-launcher.yaml).
FROM rayproject/ray:2.60.0-py311-gpu

# NO_ALBUMENTATIONS_UPDATE: no network version check when albumentations is imported.
ENV NO_ALBUMENTATIONS_UPDATE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# The base image runs as its non-root user `ray` (uid 1000, gid 100 "users"); keep it, by number
# so that Kubernetes' runAsNonRoot can verify it. COPY creates /app owned by that user, so the
# build below can write its metadata there.
COPY --chown=1000:100 . /app
WORKDIR /app
USER 1000:100

# "./[extras]" is the local project (hadolint reads ".[...]" as an unpinned package name).
# `imgcurate --help` fails the build if the console script cannot import.
RUN pip install --no-cache-dir "./[models,index]" \
    && imgcurate --help > /dev/null

# S3 credentials come from the environment at run time (e.g. a Kubernetes Secret), never from
# the image or the configs.
CMD ["imgcurate", "--help"]

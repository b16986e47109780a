# raylane's GPU image: every pod of a rendered RayJob, RayCronJob, RayService or RayCluster whose
# spec asks for GPUs runs it (kubernetes.image defaults to this tag).
#   docker build -t raylane:0.1.0-py311-cu128 .
# The base has Ray 2.60 and the vLLM it pins (0.29.0) for CUDA 12.8 on Python 3.11. raylane is
# installed into it, not only shipped as a working_dir: the pods run `python -m jobs.<shape>`, and
# vLLM finds raylane's plugin through package metadata. Model weights never go into the image
# (they are staged onto a PVC, kubernetes.weights). tests/test_images.py keeps the tags, Python
# and Ray versions in step with pyproject.toml and the rendered manifests.
FROM rayproject/ray-llm:2.60.0-py311-cu128

COPY --chown=ray:users pyproject.toml README.md /tmp/raylane/
COPY --chown=ray:users runtime /tmp/raylane/runtime
COPY --chown=ray:users jobs /tmp/raylane/jobs
COPY --chown=ray:users serve_apps /tmp/raylane/serve_apps
COPY --chown=ray:users cluster /tmp/raylane/cluster
COPY --chown=ray:users raylane /tmp/raylane/raylane
COPY --chown=ray:users scripts/check_image.py /tmp/raylane/scripts/

# The [gpu] extra pins vllm==0.29.0 and ray 2.60, both already in the base, so pip adds only
# raylane's own dependencies; check_image.py fails the build if the base drifted from the pins.
RUN pip install --no-cache-dir "/tmp/raylane[gpu]" \
 && cd / && python /tmp/raylane/scripts/check_image.py --stack gpu \
 && rm -rf /tmp/raylane

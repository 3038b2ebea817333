# syntax=docker/dockerfile:1
# tessera database bootstrap: a Lambda function (container image) that alone reads the RDS master secret. It
# creates each service's IAM-authenticated login, applies every migration and grants each service exactly its
# schemas (services/cloud/database_roles.py). Built by the Pulumi program (infra/registry.py) with the
# repository root as context and run by `pulumi up` (infra/database.py, DatabaseBootstrap):
#   docker build -f images/db-bootstrap.Dockerfile --platform linux/amd64 .
#
# Not a queue worker, so not the tessera CLI: AWS's Lambda base image brings Python and the runtime interface
# client; the function's packages (psycopg, whose binary wheel carries libpq, and boto3) come from a hashed
# lock into the task root, beside the services code and the migrations. Lambda runs the function as its own
# unprivileged user, whatever the image says.
#
# The base is pinned to one dated build of AWS's Python 3.11 image (Amazon Linux 2, glibc 2.26: the lock
# takes manylinux2014 wheels), not the moving `3.11` tag. A tag is still a name: pinning its digest
# (`...:3.11.2026.02.28.00@sha256:...`) would make the base immutable too, but that digest can only be read
# from the registry (`docker buildx imagetools inspect`), which this file was written without: add it then.
FROM public.ecr.aws/lambda/python:3.11.2026.02.28.00
LABEL org.opencontainers.image.title="tessera-db-bootstrap" \
      org.opencontainers.image.description="tessera database bootstrap: service users, migrations, grants" \
      org.opencontainers.image.vendor="tessera" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="public.ecr.aws/lambda/python:3.11.2026.02.28.00"
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The locked packages (images/locks/db-bootstrap.txt, made by images/lock.sh): every one pinned and hashed,
# installed into the task root, where the function's imports find them before the base image's boto3.
COPY images/locks/db-bootstrap.txt /tmp/requirements.txt
RUN pip install --no-cache-dir --require-hashes --target "${LAMBDA_TASK_ROOT}" -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt
# The services tree: the bootstrap module, the shared database code and every service's migrations.
COPY services/ ${LAMBDA_TASK_ROOT}/services/
CMD ["services.cloud.database_roles.handler"]

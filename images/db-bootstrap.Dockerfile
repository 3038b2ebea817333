# syntax=docker/dockerfile:1
# tessera database bootstrap: a Lambda function (container image) that alone reads the RDS master secret. It
# creates each service's IAM-authenticated login, applies every migration and grants each service exactly its
# schemas (services/cloud/database_roles.py). Built by the Pulumi program (infra/registry.py) with the
# repository root as context and run by `pulumi up` (infra/database.py, DatabaseBootstrap):
#   docker build -f images/db-bootstrap.Dockerfile --platform linux/amd64 .
#
# Not a queue worker, so not the tessera CLI: AWS's Lambda base image brings the runtime interface client and
# boto3; the function needs only psycopg (its binary wheel carries libpq) beside the services code and the
# migrations. Lambda runs the function as its own unprivileged user, whatever the image says.
FROM public.ecr.aws/lambda/python:3.11
LABEL org.opencontainers.image.title="tessera-db-bootstrap" \
      org.opencontainers.image.description="tessera database bootstrap: service users, migrations, grants" \
      org.opencontainers.image.vendor="tessera" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="public.ecr.aws/lambda/python:3.11"
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The same range as pyproject.toml's dependency.
RUN pip install --no-cache-dir "psycopg[binary]>=3.2,<4"
# The services tree: the bootstrap module, the shared database code and every service's migrations.
COPY services/ ${LAMBDA_TASK_ROOT}/services/
CMD ["services.cloud.database_roles.handler"]

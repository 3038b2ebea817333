"""The auto-stop safety net: a scheduled Lambda function that stops idle accelerator instances.

It runs from its own directory (zipped by ``infra/autostop.py``), so it imports only the standard library
and boto3, never the rest of ``services``.
"""

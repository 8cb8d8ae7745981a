"""gunicorn's entry point: ``gunicorn -c server/gunicorn_conf.py server.wsgi:app`` (what ``python -m server`` runs).

The app is created in the gunicorn master (``preload_app``): the configuration, the model's checksums and
the catalog are checked once, before any worker starts. The onnxruntime sessions are created in each
worker after the fork (``post_worker_init`` in the gunicorn config), hence ``load="deferred"``.
"""
from server.app import create_app

app = create_app({"load": "deferred"})

"""Celery app, tasks, study settle, outbox dispatch and the serve/listen wiring."""

"""The Celery side shared by producers and workers: the app's configuration
(``messaging.config``), sending a step (``messaging.dispatch``), and every override of a
private Celery or kombu method (``messaging.patches``). The core (``cancelflow``) never
imports it: it knows nothing of Celery."""

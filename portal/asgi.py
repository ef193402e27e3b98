"""ASGI entry point: what the web server runs (gunicorn with uvicorn workers).

Pages and API calls are Django's usual synchronous views, each on a thread of its own;
a log follower's stream waits on the event loop instead, so followers hold no thread.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
application = get_asgi_application()

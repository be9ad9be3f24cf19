"""The web page's static files (``static/``), served by ``app.api.web``."""

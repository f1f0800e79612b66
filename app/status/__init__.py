"""The status page (``/``, ``/status``) and the JSON API behind it (``/api/v1``), served with /health.

Both show the same truth as /health: the verdict is the monitor's own payload, computed per request as
/health computes it; everything else (history, charts, runs, the retention plan) is a model built from the
monitor's cache whenever that cache changes, so a request never reads a target and never walks a year of
manifests.

* ``model.py``: the model and the cache that rebuilds it;
* ``chart.py``: one database's history as inline SVG;
* ``api.py``: /api/v1 and its OpenAPI document (``openapi.json``);
* ``page.py``: the HTML page (``templates/status.html``);
* ``auth.py``: STATUS_TOKEN.
"""

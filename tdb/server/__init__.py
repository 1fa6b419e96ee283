"""`tdb serve`: the HTTP API and the web page (see docs/server.md).

>>> from tdb.server.app import create_app
>>> app = create_app(load_model(), max_prompt_tokens=512, extra_routers=[scan_router])
"""

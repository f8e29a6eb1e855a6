"""Test support: small chat models made on the fly for tests and examples, not part of the deployment path.

:mod:`.tinymodel` trains tiny, really trained chat models; :mod:`.tinyfamilies` holds the published
chat-model families they come in; :mod:`.tinydefects` puts defects into them on purpose. The plugin
never imports this package; the project's tests, scripts and example project do.
"""

"""The catalog API's routes, by resource: :mod:`.health`, :mod:`.cities` (and their sights), :mod:`.images`
(listing and uploads), :mod:`.models`, :mod:`.recognitions` and :mod:`.ui` (the web UI, its docs page and
the problem types). Each module's ``add_routes(app, catalog)`` adds its routes to the app
:func:`services.sight_catalog.api.create_app` makes; :mod:`.common` holds what they share."""

"""A plugin that cannot be imported: start-up must name this file."""

import no_such_module_anywhere  # noqa: F401

"""
Drop-in pipeline stages: put a module here (this directory is
[server] plugin_directory, "plugins" by default) and name its stage in a
[[pipeline]] table. See README.md, "The plugin pipeline".
"""

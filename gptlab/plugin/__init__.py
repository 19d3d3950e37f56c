"""The plugin contract and its machinery: the kinds and hooks (hookspecs), the registry, the
plugin system that discovers and loads plugins (manager), and what plugin authors subclass or
receive (components: positional context, KV cache; layers: attention and MLP base classes).
Imports only gptlab.errors, gptlab.fmt and gptlab.rundir."""

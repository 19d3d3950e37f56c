"""The plugin contract and its machinery: the kinds and hooks (hookspecs), what each kind's
factory returns and every value a plugin receives, in one module (contract: its base class or
protocol, the helpers, the parameter names importers rely on), the base classes behind it
(components: positional context, KV cache; layers: attention and MLP), the registry, and the
plugin system that discovers and loads plugins (manager).
Imports only gptlab.errors, gptlab.fmt and gptlab.rundir."""

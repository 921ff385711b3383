"""
The multiplexer's defaults that are no wire constant, each written once:
the settings (L{nova.agent.options}) and the L{Multiplexer} both take them
from here.
"""

# Streams open at once on one tunnel before the agent refuses further OPENs
# with OVERLOADED: each holds a connection and up to a window of buffers.
DEFAULT_MAX_STREAMS = 1024

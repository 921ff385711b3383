"""
NOVAS: accepts agents' tunnels, and opens streams through them for the
connections that arrive on its routes.
"""

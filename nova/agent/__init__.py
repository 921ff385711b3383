"""
NOVAC: dials out to every NOVAS, registers, and connects the streams NOVAS
opens to targets inside its own network.
"""

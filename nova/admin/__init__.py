"""
What operators and monitoring see: the audit history (L{nova.admin.audit},
L{nova.admin.store}), Prometheus metrics (L{nova.admin.metrics}) and the
admin HTTP interface with the Reverse Tunnels page (L{nova.admin.web}).
"""

"""
What operators and monitoring see: the audit history (L{nova.admin.audit},
L{nova.admin.store}), Prometheus metrics (L{nova.admin.metrics}) and the
admin HTTP interface with the Reverse Tunnels page (L{nova.admin.web}) and
the cluster API: routes, members, drain (L{nova.admin.cluster_api}).
"""

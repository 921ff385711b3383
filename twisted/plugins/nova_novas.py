from twisted.application.service import ServiceMaker

novas = ServiceMaker("NOVA server", "nova.server.tap", "NOVA reverse-tunnel server (NOVAS)", "novas")

from twisted.application.service import ServiceMaker

novac = ServiceMaker("NOVA agent", "nova.agent.tap", "NOVA reverse-tunnel agent (NOVAC)", "novac")

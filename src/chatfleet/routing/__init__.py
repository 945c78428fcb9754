"""Routing between pods: the scoring (pure, shared with the fleet simulator) and the endpoint
picker the Gateway API Inference Extension's proxies call (``chatfleet epp``)."""

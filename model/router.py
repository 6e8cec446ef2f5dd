"""Compatibility names for the top-k router; the gates and losses live in model/routing.py."""

from moeswarm.model.routing import Routing as RouterOutput
from moeswarm.model.routing import TopKGate as Router
from moeswarm.model.routing import load_balancing_loss, router_z_loss

__all__ = ["Router", "RouterOutput", "load_balancing_loss", "router_z_loss"]

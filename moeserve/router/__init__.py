"""The outer router: whole requests routed among profiles (model x K x decoding settings) behind
one endpoint. One module per stage, in the order a routed request meets them:
safety -> features -> rules -> budget -> bandit -> (generation) -> verifier -> escalation ->
audit. pipeline.Router joins them; replay.py estimates a new config's reward offline."""

from moeserve.router.config import ROUTED_NAME, RouterConfig, RouterConfigError

__all__ = ["ROUTED_NAME", "RouterConfig", "RouterConfigError"]

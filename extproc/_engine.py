"""``PolicyEngine``: a request in, a :class:`Decision` out. Pure: no I/O, no clock.

Order of a decision:

1. The tenant (from ``tenants.header``) fixes the backends this request may reach.
2. A request naming a backend's model (``models.direct``) goes straight there (403 if the
   tenant may not reach it); an unknown model is routed or rejected (``models.unknown``).
3. Rules in order; a rule whose backend is not eligible (tenant, images, context size) is
   skipped without evaluating its condition; the first rule whose condition holds wins.
   Conditions short-circuit, so signals a decision does not need are never computed.
4. No rule: the default backend, or if it is not eligible the tenant's first eligible one.
   No eligible backend at all: 503.
"""

from __future__ import annotations

from collections.abc import Callable

from extproc._decision import DEFAULT_RULE, DIRECT_RULE, Decision
from extproc._errors import RequestError
from extproc._policy import AllOf, AnyOf, Backend, Condition, Not, Policy, SignalRef
from extproc._request import RoutingRequest
from extproc._signals import SignalContext, SignalResult
from extproc._tokens import ESTIMATE

__all__ = ["PolicyEngine"]


Check = Callable[["_Evaluation"], bool]


def compile_condition(condition: Condition) -> Check:
    """Turn a condition tree into nested closures: no type dispatch per request."""
    if isinstance(condition, SignalRef):
        name = condition.name
        return lambda evaluation: evaluation.signal(name)
    if isinstance(condition, Not):
        inner = compile_condition(condition.item)
        return lambda evaluation: not inner(evaluation)
    checks = tuple(compile_condition(item) for item in condition.items)
    if isinstance(condition, AllOf):

        def all_of(evaluation: _Evaluation) -> bool:
            for check in checks:
                if not check(evaluation):
                    return False
            return True

        return all_of

    def any_of(evaluation: _Evaluation) -> bool:
        for check in checks:
            if check(evaluation):
                return True
        return False

    return any_of


class _Evaluation:
    """One request's evaluation: memoised signal results and backend eligibility."""

    def __init__(self, policy: Policy, request: RoutingRequest) -> None:
        self.signals = policy.signals
        self.ctx = SignalContext(request)
        self.results: dict[str, SignalResult] = {}
        self._ineligible: dict[str, str | None] = {}

    def signal(self, name: str) -> bool:
        result = self.results.get(name)
        if result is None:
            result = self.results[name] = self.signals[name].evaluate(self.ctx)
        return result.matched

    def ineligible(self, backend: Backend) -> str | None:
        """Why ``backend`` cannot serve this request, or ``None`` when it can."""
        if backend.name in self._ineligible:
            return self._ineligible[backend.name]
        reason = None
        request = self.ctx.request
        if not backend.supports_images and request.image_count:
            reason = "backend does not support images"
        elif backend.max_context_tokens is not None:
            tokens = self.ctx.token_count("all", ESTIMATE)
            if tokens > backend.max_context_tokens:
                reason = f"prompt (~{tokens} tokens) exceeds max_context_tokens {backend.max_context_tokens}"
        self._ineligible[backend.name] = reason
        return reason


class PolicyEngine:
    """Evaluates one :class:`Policy`. Safe to share between concurrent requests."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._rules = tuple(
            (rule, policy.backends[rule.backend], compile_condition(rule.when)) for rule in policy.rules
        )

    def allowed_backends(self, tenant: str | None) -> tuple[str, ...]:
        """The backends a tenant may reach, in preference order."""
        tenants = self.policy.tenants
        if tenant is not None and tenant in tenants.allow:
            return tenants.allow[tenant]
        if tenants.otherwise is not None:
            return tenants.otherwise
        return tuple(self.policy.backends)

    def decide(self, request: RoutingRequest) -> Decision:
        """Pick the backend for ``request``; raises :class:`RequestError` when none may serve it."""
        policy = self.policy
        tenant = request.header(policy.tenants.header)
        allowed = self.allowed_backends(tenant)
        model = request.model

        if model is not None and model not in policy.models.routed:
            named = policy.backend_for_model(model) if policy.models.direct else None
            if named is not None:
                if named.name not in allowed:
                    raise RequestError(
                        f"Model {model!r} is not available to this tenant.", status=403, code="model_not_allowed"
                    )
                return self._decision(named, DIRECT_RULE, request, tenant, _Evaluation(policy, request))
            if policy.models.unknown == "reject":
                raise RequestError(f"The model {model!r} does not exist.", status=404, code="model_not_found")

        evaluation = _Evaluation(policy, request)
        skipped: list[tuple[str, str]] = []
        for rule, backend, holds in self._rules:
            if backend.name not in allowed:
                skipped.append((rule.name, "backend not allowed for tenant"))
                continue
            reason = evaluation.ineligible(backend)
            if reason is not None:
                skipped.append((rule.name, reason))
                continue
            if holds(evaluation):
                return self._decision(backend, rule.name, request, tenant, evaluation, skipped)

        candidates = [policy.default] if policy.default in allowed else []
        candidates += [name for name in allowed if name != policy.default]
        for name in candidates:
            backend = policy.backends[name]
            if evaluation.ineligible(backend) is None:
                return self._decision(backend, DEFAULT_RULE, request, tenant, evaluation, skipped)
        raise RequestError(
            "No backend this request may use can serve it (check images and prompt size).",
            status=503,
            code="no_eligible_backend",
        )

    def _decision(self, backend, rule, request, tenant, evaluation, skipped=None) -> Decision:
        model = request.model
        rewrite = self.policy.routing.rewrite_model and request.body is not None and model != backend.model
        return Decision(
            backend=backend,
            rule=rule,
            requested_model=model,
            rewrite_model=rewrite,
            tenant=tenant,
            signals=evaluation.results,
            skipped=skipped or [],
        )

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

import ast
from collections.abc import Callable

from extproc._decision import DEFAULT_RULE, DIRECT_RULE, Decision
from extproc._errors import RequestError
from extproc._policy import AllOf, AnyOf, Backend, Condition, Not, Policy, SignalRef
from extproc._request import RoutingRequest
from extproc._signals import SignalContext, SignalResult
from extproc._tokens import ESTIMATE

__all__ = ["PolicyEngine"]


#: A compiled condition: called with the request's memoised ``signal(name) -> bool``.
Check = Callable[[Callable[[str], bool]], bool]


def _expression(condition: Condition) -> ast.expr:
    if isinstance(condition, SignalRef):
        return ast.Call(ast.Name("signal", ast.Load()), [ast.Constant(condition.name)], [])
    if isinstance(condition, Not):
        return ast.UnaryOp(ast.Not(), _expression(condition.item))
    items = [_expression(item) for item in condition.items]  # the policy parser forbids empty lists
    if len(items) == 1:
        return items[0]
    return ast.BoolOp(ast.And() if isinstance(condition, AllOf) else ast.Or(), items)


def compile_condition(condition: Condition) -> Check:
    """Turn a condition tree into one Python boolean expression, e.g.
    ``lambda signal: (signal("code") or signal("code_block")) and not signal("short")``.

    Python's ``and`` / ``or`` short-circuit, so a signal is evaluated only when the
    outcome depends on it. Signal names enter the code as constants, never as source text.
    """
    arguments = ast.arguments(posonlyargs=[], args=[ast.arg("signal")], kwonlyargs=[], kw_defaults=[], defaults=[])
    tree = ast.fix_missing_locations(ast.Expression(ast.Lambda(arguments, _expression(condition))))
    return eval(compile(tree, "<policy condition>", "eval"), {})  # noqa: S307 - an AST built above


class _Evaluation:
    """One request's evaluation: the signal context and the memoised signal results."""

    __slots__ = ("signals", "ctx", "results")

    def __init__(self, policy: Policy, request: RoutingRequest) -> None:
        self.signals = policy.signals
        self.ctx = SignalContext(request)
        self.results: dict[str, SignalResult] = {}

    def signal(self, name: str) -> bool:
        result = self.results.get(name)
        if result is None:
            result = self.results[name] = self.signals[name].evaluate(self.ctx)
        return result.matched

    def unusable(self, backends: dict[str, Backend], allowed: tuple[str, ...]) -> dict[str, str]:
        """Why each backend that cannot serve this request cannot; usable ones are absent."""
        out: dict[str, str] = {}
        request = self.ctx.request
        for name, backend in backends.items():
            if name not in allowed:
                out[name] = "backend not allowed for tenant"
            elif not backend.supports_images and request.image_count:
                out[name] = "backend does not support images"
            elif backend.max_context_tokens is not None:
                tokens = self.ctx.token_count("all", ESTIMATE)
                if tokens > backend.max_context_tokens:
                    out[name] = f"prompt (~{tokens} tokens) exceeds max_context_tokens {backend.max_context_tokens}"
        return out


class PolicyEngine:
    """Evaluates one :class:`Policy`. Safe to share between concurrent requests."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._rules = tuple((rule.name, rule.backend, compile_condition(rule.when)) for rule in policy.rules)

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
        unusable = evaluation.unusable(policy.backends, allowed)
        signal = evaluation.signal
        skipped: list[tuple[str, str]] = []
        for rule, backend, holds in self._rules:
            if backend in unusable:
                skipped.append((rule, unusable[backend]))
            elif holds(signal):
                return self._decision(policy.backends[backend], rule, request, tenant, evaluation, skipped)

        candidates = [policy.default] if policy.default in allowed else []
        candidates += [name for name in allowed if name != policy.default]
        for name in candidates:
            if name not in unusable:
                return self._decision(policy.backends[name], DEFAULT_RULE, request, tenant, evaluation, skipped)
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

"""``PolicyEngine``: a request in, a :class:`Decision` out. Pure: no I/O, no clock.

Order of a decision:

1. The tenant (from ``tenants.header``) fixes the backends this request may reach.
2. A request naming a backend's model (``models.direct``) goes straight there (403 if the
   tenant may not reach it); an unknown model is routed or rejected (``models.unknown``).
3. Rules in order; a rule whose backend is not eligible (tenant, images, context size, or
   known to be down: :class:`SignalMemo`'s ``unhealthy``, ignored when every otherwise
   eligible backend is down) is skipped without evaluating its condition; the first rule whose condition holds wins.
   Conditions short-circuit, so signals a decision does not need are never computed.
   A ``route.utility`` rule picks, among its eligible backends, the best predicted
   quality − λ·cost.
4. No rule: the default backend, or if it is not eligible the tenant's first eligible one.
   No eligible backend at all: 503.

Learned scores come from the caller: :meth:`PolicyEngine.decide` takes the scores it has,
and raises :class:`ScoresNeeded` when a rule that can still win needs a scorer it was not
given. So cheap rules decide first and a request they decide never waits for a forward
pass; the caller (the servicer, ``policy explain``) scores and calls again. A scorer that
failed makes the decision the scorer's ``fallback`` (default: the policy's), recorded with
the reason.
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Callable, Collection, Mapping

from extproc.engine._decision import DEFAULT_RULE, DIRECT_RULE, FALLBACK_RULE, SESSION_RULE, Decision
from extproc._errors import RequestError
from extproc.policy._model import AllOf, Always, Condition, Not, Policy, SignalRef, UtilityRoute
from extproc.policy._sections import Backend
from extproc.request._body import RoutingRequest
from extproc.scorers._interface import Scorer, ScorerFailure, Scores, ScoresNeeded, ScoringFailed, score_key
from extproc.signals._kinds import SignalContext, SignalResult
from extproc.signals._tokens import ESTIMATE

__all__ = ["PolicyEngine", "SignalMemo", "PIN_BREAKS"]

#: Why a session's pinned backend cannot serve a request (:meth:`PolicyEngine.decide_pinned`):
#: the policy no longer has it, the tenant may not use it, it takes no images, the prompt is over
#: its context, it is down; ``rule``: a ``breaks_session`` rule held.
PIN_BREAKS = ("backend_removed", "tenant_not_allowed", "images_not_supported", "context_length_exceeded",
              "unhealthy", "rule")


#: Why a backend known to be down (``serve --envoy-admin``) is skipped.
UNHEALTHY = "backend unhealthy"

#: A compiled condition: called with the request's memoised ``signal(name) -> bool``.
Check = Callable[[Callable[[str], bool]], bool]


def _expression(condition: Condition) -> ast.expr:
    if isinstance(condition, Always):
        return ast.Constant(True)
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

    __slots__ = ("signals", "ctx", "results", "unhealthy")

    def __init__(self, policy: Policy, request: RoutingRequest, scores: Mapping[str, Scores | ScorerFailure] | None = None,
                 thresholds: Mapping[str, float] | None = None, unhealthy: Collection[str] = ()) -> None:
        self.signals = policy.signals
        self.ctx = SignalContext(request, scores, thresholds)
        self.results: dict[str, SignalResult] = {}
        self.unhealthy = unhealthy

    def signal(self, name: str) -> bool:
        result = self.results.get(name)
        if result is None:
            result = self.results[name] = self.signals[name].evaluate(self.ctx)
        return result.matched

    def over_limit(self, backend: Backend) -> tuple[str, str] | None:
        """``(error code, reason)`` when ``backend`` cannot hold this request, else ``None``."""
        if not backend.supports_images and self.ctx.request.image_count:
            return "images_not_supported", "backend does not support images"
        if backend.max_context_tokens is not None:
            tokens = self.ctx.token_count("all", ESTIMATE)
            if tokens > backend.max_context_tokens:
                reason = f"prompt (~{tokens} tokens) exceeds max_context_tokens {backend.max_context_tokens}"
                return "context_length_exceeded", reason
        return None

    def unusable(self, backends: dict[str, Backend], allowed: tuple[str, ...]) -> dict[str, str]:
        """Why each backend that cannot serve this request cannot; usable ones are absent.

        A backend known to be unhealthy is unusable too, unless every one of ``backends`` that
        could otherwise serve the request is unhealthy: then health is ignored, and the request
        is decided as if all were healthy (a gateway whose backends are all ejected still tries)."""
        out: dict[str, str] = {}
        for name, backend in backends.items():
            if name not in allowed:
                out[name] = "backend not allowed for tenant"
            elif (limit := self.over_limit(backend)) is not None:
                out[name] = limit[1]
        if self.unhealthy:
            down = [name for name in backends if name not in out and name in self.unhealthy]
            if down and len(down) < len(backends) - len(out):
                out.update(dict.fromkeys(down, UNHEALTHY))
        return out


class SignalMemo:
    """One request's signal results, kept across the engine's re-entries while its scorers
    answer, so that each signal is evaluated once per request. Never shared between requests:
    the caller makes one per request (:func:`~extproc.scoring._decide.decide_with_scores` does) and
    passes it to every :meth:`PolicyEngine.decide` of that request. A signal whose score is
    missing raises before its result is kept, so what is kept never changes as scores arrive.
    ``thresholds``: score signal name -> the threshold that replaces the policy's for this
    request (the ``share:`` controller's), fixed for the request's life. ``unhealthy``: the
    backends known to be down when the request arrived (``serve --envoy-admin``); the rules
    skip them and utility routes mask them, as :meth:`_Evaluation.unusable` says."""

    __slots__ = ("request", "evaluation", "thresholds", "unhealthy")

    def __init__(self, request: RoutingRequest, thresholds: Mapping[str, float] | None = None,
                 unhealthy: Collection[str] = ()) -> None:
        self.request = request
        self.evaluation: _Evaluation | None = None
        self.thresholds = thresholds
        self.unhealthy = unhealthy

    def prompt_tokens(self) -> int:
        """The request's prompt tokens by the estimate (:data:`ESTIMATE`), counted once: the
        evaluation's count when a check already made it."""
        ctx = self.evaluation.ctx if self.evaluation is not None else SignalContext(self.request)
        return ctx.token_count("all", ESTIMATE)


class PolicyEngine:
    """Evaluates one :class:`Policy`. Safe to share between concurrent requests."""

    def __init__(self, policy: Policy, scorers: Mapping[str, Scorer] | None = None) -> None:
        """``scorers``: the loaded scorers of ``policy.scorers`` by name, owned by the server
        (the engine never calls them; it carries them for whoever scores its requests)."""
        self.policy = policy
        self.scorers: Mapping[str, Scorer] = scorers or {}
        # (name, backend, condition); a utility rule has backend None and its route in
        # _routes, so the common loop stays as cheap as a policy without utility rules.
        self._rules = tuple((rule.name, rule.backend, compile_condition(rule.when)) for rule in policy.rules)
        self._routes = {rule.name: rule.route for rule in policy.rules if rule.route is not None}
        # (name, backend, condition) of the rules marked breaks_session: fixed backends, cheap signals
        self._session_breakers = tuple(entry for entry, rule in zip(self._rules, policy.rules) if rule.breaks_session)

    def allowed_backends(self, tenant: str | None) -> tuple[str, ...]:
        """The backends a tenant may reach, in preference order.

        Surrounding whitespace is not part of a tenant name. A value that reads as several
        tenants (Envoy joins a repeated header with ",") may reach only what every reading
        may: each part, and the whole value as an unlisted tenant. Readings that share no
        backend are a 403 (``ambiguous_tenant``).
        """
        if tenant is None or "," not in tenant:
            return self._allowed(tenant.strip() if tenant else None)
        readings = [self._allowed(part.strip()) for part in tenant.split(",")] + [self._allowed(None)]
        common = tuple(name for name in readings[0] if all(name in reading for reading in readings[1:]))
        if not common:
            header = self.policy.tenants.header
            raise RequestError(
                f"The `{header}` header reads as several tenants ({tenant!r}) that share no backend.",
                status=403,
                code="ambiguous_tenant",
            )
        return common

    def _allowed(self, tenant: str | None) -> tuple[str, ...]:
        tenants = self.policy.tenants
        if tenant and tenant in tenants.allow:
            return tenants.allow[tenant]
        if tenants.otherwise is not None:
            return tenants.otherwise
        return tuple(self.policy.backends)

    def decide(self, request: RoutingRequest, scores: Mapping[str, Scores | ScorerFailure] | None = None,
               memo: SignalMemo | None = None) -> Decision:
        """Pick the backend for ``request``; raises :class:`RequestError` when none may serve it,
        and :class:`ScoresNeeded` when a rule needs a scorer missing from ``scores``. ``memo``:
        the request's :class:`SignalMemo`, so that deciding again with more scores does not
        evaluate again the signals an earlier call evaluated."""
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
                evaluation = _Evaluation(policy, request)
                limit = evaluation.over_limit(named)
                if limit is not None:  # the answer an OpenAI client expects, not a backend failure
                    raise RequestError(f"Model {model!r} cannot serve this request: {limit[1]}.", code=limit[0])
                return self._decision(named, DIRECT_RULE, request, tenant, evaluation)
            if policy.models.unknown == "reject":
                raise RequestError(f"The model {model!r} does not exist.", status=404, code="model_not_found")

        evaluation = self._evaluation(request, scores, memo)
        unusable = evaluation.unusable(policy.backends, allowed)
        signal = evaluation.signal
        skipped: list[tuple[str, str]] = []
        try:
            for rule, backend, holds in self._rules:
                if backend is None:  # a utility rule: eligible while one of its backends is
                    route = self._routes[rule]
                    usable = [name for name in route.among if name not in unusable]
                    if not usable:
                        skipped.append((rule, "no backend of `route.among` can serve this request"))
                    elif holds(signal):
                        chosen, utilities = self._by_utility(route, usable, evaluation)
                        decision = self._decision(policy.backends[chosen], rule, request, tenant, evaluation, skipped)
                        decision.utilities = utilities
                        return decision
                elif backend in unusable:
                    skipped.append((rule, unusable[backend]))
                elif holds(signal):
                    return self._decision(policy.backends[backend], rule, request, tenant, evaluation, skipped)
        except ScoringFailed as failed:
            return self._fallback(failed, request, tenant, evaluation, allowed, unusable, skipped)

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

    def rerouted(self, decision: Decision, name: str, rule: str, request: RoutingRequest, why: str) -> Decision:
        """``decision`` sent to backend ``name`` instead, by ``rule`` (e.g. ``budget``); the rule
        it replaces is listed in ``skipped`` with ``why``. The caller checked :meth:`cannot_serve`."""
        backend = self.policy.backends[name]
        rewrite = self.policy.routing.rewrite_model and request.body is not None and request.model != backend.model
        return dataclasses.replace(decision, backend=backend, rule=rule, rewrite_model=rewrite,
                                   skipped=[*decision.skipped, (decision.rule, why)], utilities={})

    def cannot_serve(self, request: RoutingRequest, name: str, memo: SignalMemo | None = None) -> str | None:
        """Why backend ``name`` may not serve ``request`` (tenant, images, context, health: the
        memo's ``unhealthy``), or ``None`` when it may; the checks the rules skip backends by."""
        allowed = self.allowed_backends(request.header(self.policy.tenants.header))
        evaluation = memo.evaluation if memo is not None else None  # its counted tokens, scores untouched
        if evaluation is None:
            evaluation = _Evaluation(self.policy, request, unhealthy=memo.unhealthy if memo is not None else ())
        backends = self.policy.backends if evaluation.unhealthy else {name: self.policy.backends[name]}
        return evaluation.unusable(backends, allowed).get(name)

    def routes_by_rules(self, request: RoutingRequest) -> bool:
        """Whether :meth:`decide` picks ``request``'s backend by the rules: its model is routed (or
        unknown, with ``models.unknown: route``), not one a backend serves directly."""
        model, models = request.model, self.policy.models
        if model is None or model in models.routed:
            return True
        if models.direct and self.policy.backend_for_model(model) is not None:
            return False
        return models.unknown == "route"

    def decide_pinned(self, request: RoutingRequest, pinned: str, memo: SignalMemo | None = None,
                      unhealthy: Collection[str] = ()) -> tuple[Decision | None, str | None]:
        """The decision for a request of a session pinned to backend ``pinned``, without scorers.

        ``(decision, None)``: the pin holds, rule :data:`SESSION_RULE`. ``(decision, "rule")``: a
        rule marked ``breaks_session`` holds and routes elsewhere; it decides (the caller re-pins).
        ``(None, reason)``: ``pinned`` cannot serve this request, ``reason`` one of
        :data:`PIN_BREAKS` (the caller decides it with :meth:`decide` and re-pins). ``unhealthy``:
        backends known to be down. Raises :class:`RequestError` as :meth:`decide` does for the tenant.
        """
        policy = self.policy
        tenant = request.header(policy.tenants.header)
        allowed = self.allowed_backends(tenant)
        backend = policy.backends.get(pinned)
        if backend is None:
            return None, "backend_removed"
        if pinned not in allowed:
            return None, "tenant_not_allowed"
        evaluation = self._evaluation(request, None, memo)
        limit = evaluation.over_limit(backend)
        if limit is not None:
            return None, limit[0]
        if pinned in unhealthy:
            return None, "unhealthy"
        if self._session_breakers:
            unusable = evaluation.unusable(policy.backends, allowed)
            for rule, target, holds in self._session_breakers:
                if target != pinned and target not in unusable and target not in unhealthy and holds(evaluation.signal):
                    return self._decision(policy.backends[target], rule, request, tenant, evaluation), "rule"
        return self._decision(backend, SESSION_RULE, request, tenant, evaluation), None

    def _evaluation(self, request: RoutingRequest, scores: Mapping[str, Scores | ScorerFailure] | None,
                    memo: SignalMemo | None) -> _Evaluation:
        """This decide's evaluation: the memo's (given the scores known now), else a new one."""
        if memo is None:
            return _Evaluation(self.policy, request, scores)
        if memo.request is not request:
            raise ValueError("A SignalMemo belongs to one request; this decide was given another request's.")
        evaluation = memo.evaluation
        if evaluation is None or evaluation.signals is not self.policy.signals:
            evaluation = memo.evaluation = _Evaluation(self.policy, request, scores, memo.thresholds, memo.unhealthy)
        else:
            evaluation.ctx.scores = scores if scores is not None else {}
        return evaluation

    @staticmethod
    def _by_utility(route: UtilityRoute, usable: list[str], evaluation: _Evaluation) -> tuple[str, dict[str, float]]:
        """The usable backend with the best quality − λ·cost, and every usable backend's utility.

        LatentRouter scores only the pool models whose backends are usable: the others are
        masked out (masking changes the scores of the rest, so the mask is part of the ask)."""
        backend_of = dict(route.backends)
        available = tuple(model for model, backend in route.backends if backend in usable)
        scores = evaluation.ctx.scores.get(score_key(route.scorer, available))
        if scores is None:
            raise ScoresNeeded(route.scorer, available)
        if isinstance(scores, ScorerFailure):
            raise ScoringFailed(route.scorer, scores)
        utilities: dict[str, float] = {}
        for model, quality in scores.values.items():
            backend = backend_of.get(model)
            if backend in usable:
                utility = quality - route.lam * scores.costs.get(model, 0.0)
                if backend not in utilities or utility > utilities[backend]:
                    utilities[backend] = utility
        if not utilities:
            raise ScoringFailed(route.scorer, ScorerFailure("missing_output", "no scores for the eligible backends"))
        # ties go to the earlier backend in `among`
        chosen = max(usable, key=lambda name: (utilities.get(name, float("-inf")), -usable.index(name)))
        return chosen, utilities

    def _fallback(self, failed: ScoringFailed, request, tenant, evaluation, allowed, unusable, skipped) -> Decision:
        """The decision when a needed scorer failed: the scorer's own ``fallback``, else the
        policy's ``fallback`` (or ``default``), if it can serve the request; else the tenant's
        first backend that can."""
        policy = self.policy
        spec = policy.scorers.get(failed.scorer)
        first = (spec.fallback if spec is not None else None) or policy.fallback or policy.default
        candidates = [first] if first in allowed else []
        candidates += [name for name in allowed if name != first]
        for name in candidates:
            if name not in unusable:
                decision = self._decision(policy.backends[name], FALLBACK_RULE, request, tenant, evaluation, skipped)
                decision.fallback = f"{failed.scorer}: {failed.failure.reason}"
                return decision
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
            scores={
                key if isinstance(key, str) else key[0]: s
                for key, s in evaluation.ctx.scores.items() if isinstance(s, Scores)
            },
        )

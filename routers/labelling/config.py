"""The ``switchyard label --config`` file: which models to ask, how to grade, how to retry.

Declared once with ``extproc``'s schema classes, so every problem is reported as
``file:line:column`` naming the key, like a policy's. API keys come from an environment
variable or a file, never from the command line; they are held by :class:`Endpoint` with
``repr=False`` and never written to a log or an error message.

    models:                        # backend name -> OpenAI-compatible endpoint
      small: {base_url: http://127.0.0.1:8001/v1, model: qwen-small, api_key_env: SMALL_KEY,
              price_in_per_million: 0.1, price_out_per_million: 0.4}
    grading: {mode: reference, reference_grader: number}
    retries: {max_attempts: 4, backoff_s: 1.0}
    policy: ../policies/default.yaml   # optional: `model` defaults to the policy backend's
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from extproc import Bool, Int, Key, MapOf, Num, Obj, PolicyError, Str, Validation, compose_yaml

from routers.labelling.errors import LabelError

__all__ = [
    "DEFAULT_MAX_CONCURRENCY",
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_BACKOFF_S",
    "REFERENCE_GRADERS",
    "JUDGE_MODES",
    "Endpoint",
    "JudgeConfig",
    "Grading",
    "Retries",
    "LabelConfig",
    "LABEL_CONFIG_SCHEMA",
    "load_label_config",
]

#: ``models.<name>.max_concurrency``: calls in flight to one model at a time.
DEFAULT_MAX_CONCURRENCY = 4
#: ``models.<name>.timeout_s``: seconds one call may take, from sending to the last byte.
DEFAULT_TIMEOUT_S = 120.0
#: ``retries.max_attempts``: tries of one call (the first included) on 429 and 5xx answers.
DEFAULT_MAX_ATTEMPTS = 4
#: ``retries.backoff_s``: the wait before the first retry when the answer has no Retry-After;
#: it doubles on each further retry.
DEFAULT_BACKOFF_S = 1.0

REFERENCE_GRADERS = ("exact", "normalised", "number", "choice")
JUDGE_MODES = ("absolute", "pairwise")
_GRADING_MODES = ("reference", "judge")
#: A file holding an API key is read only up to this size (a key is a line, not a file of them).
_MAX_KEY_FILE_BYTES = 64 * 1024


def _endpoint_keys(model_doc: str) -> dict[str, Key]:
    return {
        "base_url": Key(Str(min_length=1), "OpenAI-compatible base URL, e.g. `http://vllm:8000/v1`; "
                                           "calls go to `<base_url>/chat/completions`."),
        "model": Key(Str(min_length=1), model_doc, None),
        "api_key_env": Key(Str(min_length=1), "Environment variable holding the API key (sent as a bearer "
                                              "token). Not with `api_key_file`; neither: no key is sent.", None),
        "api_key_file": Key(Str(min_length=1), "File holding the API key (relative to this config file).", None),
        "price_in_per_million": Key(Num(minimum=0), "USD per million prompt tokens (`usage.prompt_tokens`).", 0.0),
        "price_out_per_million": Key(Num(minimum=0), "USD per million completion tokens "
                                                     "(`usage.completion_tokens`).", 0.0),
        "max_concurrency": Key(Int(minimum=1, maximum=1024), "Calls in flight to this model at a time.",
                               DEFAULT_MAX_CONCURRENCY),
        "timeout_s": Key(Num(minimum=0.001), "Seconds one call may take, from sending to the last byte of the "
                                             "answer; then it is recorded as `timeout`.", DEFAULT_TIMEOUT_S),
    }


_MODEL = Obj({
    **_endpoint_keys("The `model` field sent in each request. Default: the `policy:` backend's `model`."),
    "max_tokens": Key(Int(minimum=1), "`max_tokens` sent in each request, unless the request sets its own "
                                      "(default: none sent, the server's).", None),
}, title="models.<name>")

_JUDGE = Obj({
    **_endpoint_keys("The judge's `model` field."),
    "mode": Key(Str(enum=JUDGE_MODES), "`absolute`: a 1-10 rating of each answer, mapped to a `score` in "
                                       "[0, 1]; `pairwise`: each answer against the `strongest` model's "
                                       "(`correct` 1 when it is as good or better).", "absolute"),
    "prompt_file": Key(Str(min_length=1), "The judge's prompt template (relative to this config file); "
                                          "default: the one shipped for `mode`.", None),
    "strongest": Key(Str(min_length=1), "`pairwise`: the `models:` entry every other answer is compared to.",
                     None),
    "both_orders": Key(Bool(), "`pairwise`: judge each pair twice, the strongest's answer first and then "
                               "second, so the judge's preference for a position cancels out: `correct` is 1 "
                               "when the answer is as good or better in both orders, 0 when worse in both, "
                               "0.5 when the orders disagree. `false`: one order (half the judge calls).",
                       True),
}, title="grading.judge")

_GRADING = Obj({
    "mode": Key(Str(enum=_GRADING_MODES), "`reference`: compare each answer to the row's `reference`; "
                                          "`judge`: a judge model grades it.", "reference"),
    "reference_grader": Key(Str(enum=REFERENCE_GRADERS), "`exact`, `normalised` (case, punctuation, articles "
                                                         "and spaces ignored), `number` (GSM8K: after `####`, "
                                                         "else the last number) or `choice` (a letter A-J).",
                            "normalised"),
    "judge": Key(_JUDGE, "The judge model (`mode: judge`).", None),
}, title="grading")

_RETRIES = Obj({
    "max_attempts": Key(Int(minimum=1, maximum=20), "Tries of one call on 429 and 5xx answers, the first "
                                                    "included.", DEFAULT_MAX_ATTEMPTS),
    "backoff_s": Key(Num(minimum=0), "Seconds before the first retry when the answer has no `Retry-After` "
                                     "(which is honoured); doubled on each further retry.", DEFAULT_BACKOFF_S),
}, title="retries")

LABEL_CONFIG_SCHEMA = Obj({
    "models": Key(MapOf(_MODEL, min_items=1), "The models to label: backend name (as `train` will know it) -> "
                                              "endpoint."),
    "grading": Key.section(_GRADING, "How answers are graded."),
    "retries": Key.section(_RETRIES, "Retries on 429 and 5xx answers."),
    "policy": Key(Str(min_length=1), "A policy file whose backends give each model's `model` name "
                                     "(base URLs still come from here).", None),
}, title="label config")


@dataclass(frozen=True)
class Endpoint:
    """One OpenAI-compatible model to call. ``api_key`` is never shown (``repr=False``)."""

    name: str
    base_url: str
    model: str
    price_in_per_million: float = 0.0
    price_out_per_million: float = 0.0
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_tokens: int | None = None
    api_key: str | None = field(default=None, repr=False)

    def cost(self, prompt_tokens: float, completion_tokens: float) -> float:
        """USD for one call of ``prompt_tokens`` in and ``completion_tokens`` out."""
        return (prompt_tokens * self.price_in_per_million + completion_tokens * self.price_out_per_million) / 1e6


@dataclass(frozen=True)
class JudgeConfig:
    endpoint: Endpoint
    mode: str
    prompt: str
    strongest: str | None = None
    both_orders: bool = True


@dataclass(frozen=True)
class Grading:
    mode: str = "reference"
    reference_grader: str = "normalised"
    judge: JudgeConfig | None = None


@dataclass(frozen=True)
class Retries:
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    backoff_s: float = DEFAULT_BACKOFF_S


@dataclass(frozen=True)
class LabelConfig:
    models: dict[str, Endpoint]
    grading: Grading
    retries: Retries
    source: str = "<config>"


def load_label_config(path: str | Path, *, need_keys: bool = True) -> LabelConfig:
    """Read and validate the label config at ``path``: :class:`PolicyError` listing every
    problem as ``file:line:column``. ``need_keys=False`` (``--dry-run``) reads no API key."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelError(f"Cannot read the label config {path}: {exc}.") from exc
    v = Validation(source)
    data = LABEL_CONFIG_SCHEMA.validate(compose_yaml(text, source), (), v)
    if data is None or v.problems:
        raise PolicyError(v.problems)
    config = _build(data, path.parent, v, need_keys)
    if v.problems:
        raise PolicyError(v.problems)
    return config


def _build(data: dict[str, Any], base_dir: Path, v: Validation, need_keys: bool) -> LabelConfig:
    policy_models = _policy_models(data["policy"], base_dir, v)
    models = {}
    for name, raw in data["models"].items():
        if raw is None:
            continue
        model = raw["model"] or policy_models.get(name)
        if model is None:
            hint = (f"the policy {data['policy']} has no backend `{name}`" if data["policy"]
                    else "or name a `policy:` whose backend gives it")
            v.problem(None, f"`models.{name}.model` is required ({hint}).", ("models", name))
            continue
        models[name] = _endpoint(name, raw, model, ("models", name), base_dir, v, need_keys)
    return LabelConfig(models=models, grading=_grading(data["grading"], models, base_dir, v, need_keys),
                       retries=Retries(**data["retries"]), source=v.source)


def _policy_models(policy: str | None, base_dir: Path, v: Validation) -> dict[str, str]:
    if policy is None:
        return {}
    from extproc import load_policy

    try:
        loaded = load_policy(base_dir / policy)
    except PolicyError as exc:
        v.problems.extend(exc.problems)
        return {}
    return {name: backend.model for name, backend in loaded.backends.items()}


def _endpoint(name: str, raw: dict[str, Any], model: str, path: tuple, base_dir: Path, v: Validation,
              need_keys: bool) -> Endpoint:
    if not raw["base_url"].startswith(("http://", "https://")):
        v.problem(None, f"`{'.'.join(map(str, path))}.base_url` must start with http:// or https://, "
                        f"got {raw['base_url']!r}.", path + ("base_url",))
    api_key = _api_key(raw, path, base_dir, v) if need_keys else None
    return Endpoint(
        name=name, base_url=raw["base_url"].rstrip("/"), model=model, api_key=api_key,
        price_in_per_million=float(raw["price_in_per_million"]),
        price_out_per_million=float(raw["price_out_per_million"]),
        max_concurrency=raw["max_concurrency"], timeout_s=float(raw["timeout_s"]), max_tokens=raw.get("max_tokens"),
    )


def _api_key(raw: dict[str, Any], path: tuple, base_dir: Path, v: Validation) -> str | None:
    where = ".".join(str(p) for p in path)
    env, file = raw["api_key_env"], raw["api_key_file"]
    if env is not None and file is not None:
        v.problem(None, f"`{where}` sets both `api_key_env` and `api_key_file`; keep one.", path + ("api_key_file",))
        return None
    if env is not None:
        value = os.environ.get(env)
        if not value:
            v.problem(None, f"`{where}.api_key_env` names {env}, which is not set (or empty) in the environment.",
                      path + ("api_key_env",))
        return value or None
    if file is not None:
        return _read_key_file(base_dir / file, f"{where}.api_key_file", path + ("api_key_file",), v)
    return None


def _read_key_file(key_path: Path, where: str, path: tuple, v: Validation) -> str | None:
    try:
        with open(key_path, "rb") as handle:
            value = handle.read(_MAX_KEY_FILE_BYTES).decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        v.problem(None, f"`{where}`: cannot read the key file {key_path}: {reason}.", path)
        return None
    if not value:
        v.problem(None, f"`{where}`: the key file {key_path} is empty.", path)
        return None
    return value


def _grading(raw: dict[str, Any], models: dict[str, Endpoint], base_dir: Path, v: Validation,
             need_keys: bool) -> Grading:
    judge = None
    if raw["mode"] == "judge":
        if raw["judge"] is None:
            v.problem(None, "`grading.mode` is `judge` but `grading.judge` is not set.", ("grading", "mode"))
        else:
            judge = _judge(raw["judge"], models, base_dir, v, need_keys)
    return Grading(mode=raw["mode"], reference_grader=raw["reference_grader"], judge=judge)


def _judge(raw: dict[str, Any], models: dict[str, Endpoint], base_dir: Path, v: Validation,
           need_keys: bool) -> JudgeConfig | None:
    from routers.labelling.graders import PROMPT_FIELDS, default_prompt

    path = ("grading", "judge")
    if raw["model"] is None:
        v.problem(None, "`grading.judge.model` is required.", path)
        return None
    mode, strongest = raw["mode"], raw["strongest"]
    if mode == "pairwise" and strongest is None:
        v.problem(None, "`grading.judge.mode` is `pairwise`: set `grading.judge.strongest` to the model every "
                        "answer is compared to.", path + ("mode",))
    if strongest is not None and strongest not in models:
        known = ", ".join(models) or "none"
        v.problem(None, f"`grading.judge.strongest` is {strongest!r}, which is not in `models` ({known}).",
                  path + ("strongest",))
    prompt = default_prompt(mode)
    if raw["prompt_file"] is not None:
        prompt = _read_prompt(base_dir / raw["prompt_file"], path + ("prompt_file",), v)
        missing = [f"{{{name}}}" for name in PROMPT_FIELDS[mode] if prompt and f"{{{name}}}" not in prompt]
        if missing:
            v.problem(None, f"`grading.judge.prompt_file` ({raw['prompt_file']}) lacks {', '.join(missing)}, "
                            f"needed in `{mode}` mode.", path + ("prompt_file",))
    endpoint = _endpoint("judge", raw, raw["model"], path, base_dir, v, need_keys)
    return JudgeConfig(endpoint=endpoint, mode=mode, prompt=prompt or "", strongest=strongest,
                       both_orders=raw["both_orders"])


def _read_prompt(prompt_path: Path, path: tuple, v: Validation) -> str | None:
    try:
        return prompt_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        v.problem(None, f"`grading.judge.prompt_file`: cannot read {prompt_path}: {reason}.", path)
        return None
